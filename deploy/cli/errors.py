"""One rule for every command: bad input is one line on stderr and exit code 2, never a traceback.

Commands raise `UserInputError` for a mistake they find themselves; the verticals raise their own
ValueError subclasses (CreditDataError, MaintenanceDataError, ...). `deploy/cli/main.py` is the one
place that turns either into `error: <one line>` and exit code 2 (`user_error_types`, `one_line`).
"""

from __future__ import annotations

import sys


class UserInputError(ValueError):
    """A mistake in what the user gave (a flag, a path, a file's content); one line, exit code 2."""


# The verticals' user-input errors, "module:Class". Only modules already imported are looked at: an
# error of a class whose module was never imported cannot have been raised, and importing it here
# would load torch or pandas into every command. tests/deploy/cli/test_cli_errors.py imports each.
VERTICAL_ERRORS = (
    "core.bundle_signing:BundleIntegrityError",
    "core.data_quality.table:DataCheckError",
    "core.lora:AdapterError",
    "core.model_files:ModelFilesError",
    "deploy.bundle.credit_features:BundleError",
    "deploy.edge.inference:EdgeModelError",
    "deploy.edge.model_slot:ModelError",
    "deploy.edge.sources:SourceError",
    "deploy.twin_demo:DemoOutputError",
    "finance.errors:CreditDataError",
    "finance.sequence.tokens:SequenceDataError",
    "manufacturing.defects.errors:DefectDataError",
    "manufacturing.maintenance.errors:MaintenanceDataError",
    "twin.auth:AuthError",
    "twin.mqtt.broker_passwd:BrokerPasswdError",
    "twin.mqtt.mosquitto_config:MosquittoConfigError",
    "twin.mqtt.security:MQTTSecurityError",
    "twin.domain.plant:PlantConfigError",
    "twin.rollout.manager:RolloutError",
    "twin.scaleout.worker:ScaleOutError",
    "twin.mqtt.embedded_broker:BrokerError",
    "twin.store.history:StoreError",
)

# A path that is missing, a folder where a file belongs, or unreadable: the user's to fix.
FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def user_error_types() -> tuple[type[BaseException], ...]:
    """UserInputError, the file errors and every imported vertical's user-input error."""
    found: list[type[BaseException]] = [UserInputError, *FILE_ERRORS]
    for spec in VERTICAL_ERRORS:
        module, name = spec.split(":")
        if module in sys.modules and hasattr(sys.modules[module], name):
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def one_line(error: BaseException, limit: int = 1000) -> str:
    """The error's message on one line (a multi-line message joined), at most `limit` characters."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
