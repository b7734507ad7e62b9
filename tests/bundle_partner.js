// A partner in another language: runs a moeworks bundle's test vectors with onnxruntime-node.
// Usage: node bundle_partner.js BUNDLE_DIR (NODE_PATH names the folder holding onnxruntime-node).
// Prints one JSON line; exit code 0 conformant, 1 not.
const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-node");

async function main(bundle) {
  const vectors = JSON.parse(fs.readFileSync(path.join(bundle, "test_vectors.json"), "utf8"));
  const card = JSON.parse(fs.readFileSync(path.join(bundle, "card.json"), "utf8"));
  const session = await ort.InferenceSession.create(path.join(bundle, "model.onnx"));
  const rows = vectors.rows;
  const feeds = {};
  for (const name of session.inputNames) {
    const values = Float64Array.from(vectors.inputs[name], (v) => (v === null ? NaN : v));
    feeds[name] = new ort.Tensor("float64", values, [rows, 1]);
  }
  const got = await session.run(feeds);
  const expected = vectors.expected;
  const tol = vectors.tolerances;
  const problems = [];
  if ("pd" in expected) {
    let error = 0;
    let pointsError = 0;
    for (let i = 0; i < rows; i++) {
      error = Math.max(error, Math.abs(got.pd.data[i] - expected.pd[i]));
      pointsError = Math.max(pointsError, Math.abs(got.points.data[i] - expected.points[i]));
      if (Number(got.decision.data[i]) !== expected.decision[i]) problems.push(`decision row ${i}`);
    }
    if (!(error <= tol.pd)) problems.push(`pd error ${error}`);
    if (!(pointsError <= tol.points + 1e-9)) problems.push(`points error ${pointsError}`);
    const k = got.reasons.dims[1];
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < k; j++) {
        if (Number(got.reasons.data[i * k + j]) !== expected.reasons[i][j]) problems.push(`reasons row ${i}`);
      }
    }
  }
  console.log(JSON.stringify({ family: card.model.family, rows, problems: problems.slice(0, 10) }));
  return problems.length ? 1 : 0;
}

main(process.argv[2]).then((code) => process.exit(code), (error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
