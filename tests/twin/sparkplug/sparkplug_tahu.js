// Eclipse Tahu's JavaScript Sparkplug B payload codec (npm `sparkplug-payload`) against ours.
// Usage: node sparkplug_tahu.js < IN.json  (NODE_PATH names the folder holding sparkplug-payload)
// IN: {"decode": {label: base64 payload}, "encode": {label: payload object as Tahu's encodePayload takes it}}
// Prints one JSON line: {"decoded": {label: Tahu's decoding}, "encoded": {label: base64 bytes}}.
// Longs (timestamps, seq, Int64/UInt64 values) are written as decimal strings so nothing rounds.
const { get } = require("sparkplug-payload");
const Long = require("long");

const codec = get("spBv1.0");

function plain(value) {
  if (Long.isLong(value)) return value.toString();
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [key, item] of Object.entries(value)) out[key] = plain(item);
    return out;
  }
  return value;
}

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const job = JSON.parse(input);
  const decoded = {};
  for (const [label, b64] of Object.entries(job.decode || {})) {
    decoded[label] = plain(codec.decodePayload(new Uint8Array(Buffer.from(b64, "base64"))));
  }
  const encoded = {};
  for (const [label, payload] of Object.entries(job.encode || {})) {
    for (const metric of payload.metrics || []) {
      // 64-bit values travel as strings in JSON; Tahu takes Long for them
      if (typeof metric.value === "string" && /Int64|UInt64|DateTime/.test(metric.type)) {
        metric.value = Long.fromString(metric.value, metric.type === "UInt64");
      }
    }
    if (typeof payload.timestamp === "string") payload.timestamp = Long.fromString(payload.timestamp, true);
    encoded[label] = Buffer.from(codec.encodePayload(payload)).toString("base64");
  }
  process.stdout.write(JSON.stringify({ decoded, encoded }) + "\n");
});
