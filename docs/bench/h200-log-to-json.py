"""Converts the table printed by `flashmla bench --backend hopper` (a run's log) into the JSON `--json` writes,
with the anchors of anchors-h200.json, so `flashmla bench --from-json` can plot a run whose JSON was not kept.

Usage: python3 h200-log-to-json.py RUN.log ANCHORS.json > RUN.json
"""
import json
import re
import sys

log, anchors_path = sys.argv[1], sys.argv[2]
anchors = json.load(open(anchors_path))
rows = [r for r in anchors["rows"] if "first kernel" not in r["kernel"]]
lines = open(log).read().splitlines()
device = lines[0].split("device: ", 1)[1].split(",")[0]
copy = float(re.search(r"copy ceiling: (\d+) GB/s", "\n".join(lines)).group(1))
results = []
for line in lines:
    f = line.split()
    if len(f) != 12 or f[0] not in ("bf16", "fp16", "e4m3"):
        continue
    dtype, s_k, h_q, s_q, mode, causal = f[0], int(f[1]), int(f[2]), int(f[3]), f[4], f[5] == "1"
    ms, tflops, gbs = float(f[6]), float(f[7]), float(f[8])
    match = [r for r in rows if (r["dtype"], r["s_k"], r["h_q"], r["s_q"], r["varlen"], r["causal"])
             == (dtype, s_k, h_q, s_q, mode == "varlen", causal)]
    anchor = match[0]["ms"] if match else None
    results.append({"grid": "upstream", "dtype": dtype, "batch": 128, "h_q": h_q, "h_kv": 1, "s_q": s_q, "s_k": s_k,
                    "mode": mode, "causal": causal, "ms": ms, "tflops": tflops, "gbs": gbs, "anchor_ms": anchor,
                    "ratio": round(anchor / ms, 4) if anchor else None})
json.dump({"backend": "hopper", "device": device, "ceilings": {"copy_gbs": copy},
           "anchors": anchors_path.rsplit("/", 1)[-1], "results": results}, sys.stdout, indent=2)
print()
