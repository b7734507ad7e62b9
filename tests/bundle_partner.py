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
        values = [np.nan if v is None else v for v in vectors["inputs"][spec.name]]
        feeds[spec.name] = np.array(values, dtype=np.float64).reshape(-1, 1)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    expected, tol = vectors["expected"], vectors["tolerances"]
    problems = []
    if "pd" in expected:  # credit
        error = float(np.max(np.abs(got["pd"][:, 0] - np.array(expected["pd"]))))
        if not error <= tol["pd"]:
            problems.append(f"pd error {error}")
        if not np.max(np.abs(got["points"][:, 0] - np.array(expected["points"]))) <= tol["points"] + 1e-9:
            problems.append("points")
        if not np.array_equal(got["decision"][:, 0], np.array(expected["decision"])):
            problems.append("decision")
        if not np.array_equal(got["reasons"], np.array(expected["reasons"], dtype=np.int64)):
            problems.append("reasons")
    print(json.dumps({"family": card["model"]["family"], "rows": vectors["rows"], "problems": problems,
                      "onnxruntime": ort.__version__}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
