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
    const values = vectors.inputs[name];
    // a list is an [N, 1] input; nested lists keep their shape ([N, T] RUL cycles, [N, H, W, 3] frames)
    const dims = [];
    for (let v = values; Array.isArray(v); v = v[0]) dims.push(v.length);
    if (dims.length === 1) dims.push(1);
    const dtype = (vectors.dtypes || {})[name] || "float64";  // the detector's frames are uint8
    if (typeof values[0] === "string") feeds[name] = new ort.Tensor("string", values, dims);
    else if (dtype === "uint8") feeds[name] = new ort.Tensor("uint8", Uint8Array.from(values.flat(Infinity)), dims);
    else feeds[name] = new ort.Tensor("float64", Float64Array.from(values.flat(Infinity), (v) => (v === null ? NaN : v)), dims);
  }
  const got = await session.run(feeds);
  const problems = [];
  for (const [name, values] of Object.entries(vectors.expected)) {
    const want = values.flat();  // row-major, as the tensor's data
    const have = Array.from(got[name].data, Number);
    const tolerance = vectors.tolerances[name];
    if (have.length !== want.length) { problems.push(`${name} shape`); continue; }
    let error = 0;
    for (let i = 0; i < want.length; i++) error = Math.max(error, Math.abs(have[i] - want[i]));
    if (tolerance === 0 ? error !== 0 : !(error <= tolerance + 1e-12)) problems.push(`${name} error ${error}`);
  }
  console.log(JSON.stringify({ family: card.model.family, rows, problems: problems.slice(0, 10) }));
  return problems.length ? 1 : 0;
}

main(process.argv[2]).then((code) => process.exit(code), (error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
