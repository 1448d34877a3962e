#!/usr/bin/env bash
# The `flashmla` CLI on the hopper backend (run by scripts/gpu-run.sh's cli step on the device machine):
#   1. `demo --backend hopper` per dtype and for a grouped-query shape: each is checked against the CPU reference
#      inside the demo (upstream tolerances) and exits non-zero on failure;
#   2. `decode --backend hopper` and `decode --backend cpu` on the same saved .npy problem, compared here
#      (anomaly positions equal, cos_diff, max abs error) with numpy;
#   3. a short `bench --backend hopper` at upstream's batch size.
set -uo pipefail
FM="${1:-gpu-bin/flashmla}"
W=$(mktemp -d)
fail=0
"$FM" info
for args in "--dtype bf16" "--dtype fp16" "--dtype e4m3" "--dtype bf16 --h-kv 2 --h-q 18 --s-q 3" \
            "--dtype e4m3 --h-kv 3 --h-q 9 --s-q 4 --no-causal"; do
  echo "== demo --backend hopper $args"
  "$FM" demo --backend hopper --batch 64 --seqlen 3000 $args || fail=1
done
echo "== decode: hopper vs cpu on the same .npy files"
"$FM" demo --backend cpu --dtype bf16 --batch 16 --seqlen 1500 --h-q 32 --s-q 2 --save "$W/p" >/dev/null || fail=1
for be in hopper cpu; do
  "$FM" decode --backend "$be" --dtype bf16 --causal --q "$W/p/q.npy" --kv-cache "$W/p/kv.npy" \
    --block-table "$W/p/block_table.npy" --seqlens "$W/p/seqlens.npy" --out "$W/out_$be.npy" --lse "$W/lse_$be.npy" || fail=1
done
python3 - "$W" <<'PY' || fail=1
import sys, numpy as np
w = sys.argv[1]
for name, tol in (("out", 5e-6), ("lse", 1e-7)):
    a, b = np.load(f"{w}/{name}_hopper.npy").astype(np.float64), np.load(f"{w}/{name}_cpu.npy").astype(np.float64)
    assert a.shape == b.shape, (name, a.shape, b.shape)
    same = np.array_equal(~np.isfinite(a), ~np.isfinite(b)) and np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)])
    a, b = np.where(np.isfinite(a), a, 0), np.where(np.isfinite(b), b, 0)
    cos = 1 - 2 * (a * b).sum() / max((a * a + b * b).sum(), 1e-12)
    print(f"  {name}: shape {a.shape}, anomalies equal {same}, cos_diff {cos:.2e}, max abs {np.abs(a - b).max():.2e}")
    assert same and cos < tol, name
print("  decode hopper == cpu within upstream tolerances")
PY
echo "== bench --backend hopper"
"$FM" bench --backend hopper --grid upstream --batch 128 --seqlen 4096 --h-q 16,128 --s-q 1 --dtype bf16 --iters 20 || fail=1
rm -rf "$W"
[ "$fail" = 0 ] && echo "PASS: cli on hopper" || { echo "FAIL: cli on hopper"; exit 1; }
