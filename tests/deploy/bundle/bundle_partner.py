"""A partner's conformance check of a moeworks bundle, with nothing but onnxruntime and numpy.

Usage: python bundle_partner.py BUNDLE_DIR. Runs model.onnx on test_vectors.json and compares with
the expected outputs at the card's tolerances; prints one JSON line; exit 0 conformant, 1 not.
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main(bundle: Path) -> int:
    vectors = json.loads((bundle / "test_vectors.json").read_text())
    card = json.loads((bundle / "card.json").read_text())
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for spec in session.get_inputs():  # every graph input is a raw field the card describes
        values = vectors["inputs"][spec.name]
        if spec.type == "tensor(string)":
            feeds[spec.name] = np.array(values, dtype=object).reshape(-1, 1)
        elif spec.type == "tensor(uint8)":  # camera frames (N, H, W, 3)
            feeds[spec.name] = np.array(values, dtype=np.uint8)
        else:  # a list is an [N, 1] input; a list of lists an [N, T] one (RUL: engines x cycles)
            array = np.array(values, dtype=object)
            array = np.where(array == None, np.nan, array).astype(np.float64)  # noqa: E711 (elementwise)
            feeds[spec.name] = array.reshape(-1, 1) if array.ndim == 1 else array
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    problems = []
    for name, values in vectors["expected"].items():  # a tolerance of 0 means identical
        want = np.array(values)
        if got[name].size != want.size:  # e.g. a detection more or less
            problems.append(f"{name} shape {list(got[name].shape)}")
            continue
        have = got[name].reshape(want.shape)
        tolerance = vectors["tolerances"][name]
        if want.size == 0:
            continue
        if tolerance == 0:
            if not np.array_equal(have, want):
                problems.append(f"{name} differs")
        else:
            error = float(np.max(np.abs(have - want)))
            if not error <= tolerance + 1e-12:
                problems.append(f"{name} error {error}")
    print(json.dumps({"family": card["model"]["family"], "rows": vectors["rows"], "problems": problems,
                      "onnxruntime": ort.__version__}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
