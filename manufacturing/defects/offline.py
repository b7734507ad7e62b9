"""Import ultralytics so that it never reaches for the network.

ultralytics reads `YOLO_CONFIG_DIR` once, at import, and on every dataset check looks for
`Arial.ttf` there, downloading it when missing. Pointing the config dir at a folder we own and
putting a bundled font in it (matplotlib ships DejaVuSans) keeps every run offline.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import ModuleType


def ultralytics_offline(config_dir: str | Path | None = None) -> ModuleType:
    """Return the `ultralytics` module, configured for offline use.

    Args:
        config_dir: folder for ultralytics' settings and fonts; only used when ultralytics has not
            been imported yet in this process (its config dir is fixed at import).
    """
    import sys

    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "ultralytics" not in sys.modules and not os.environ.get("YOLO_CONFIG_DIR"):
        config_dir = Path(config_dir or Path("runs") / "ultralytics-config").resolve()
        config_dir.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    import ultralytics
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR

    font_source = Path(__import__("matplotlib").get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = Path(USER_CONFIG_DIR) / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(font_source, target)
    # No usage analytics and no hub sync: neither may leave the machine.
    if SETTINGS.get("sync"):
        SETTINGS.update({"sync": False})
    return ultralytics
