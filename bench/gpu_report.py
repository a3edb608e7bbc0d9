"""One table of issue #5's GPU figures from the files gpu.sh's parts wrote; also $OUT/gpu.json.
Targets are checked and printed; the exit code is non-zero if one is missed."""

import json
import os
import sys

out = sys.argv[1]
speed = f"{out}/speed"


def load(path, default=None):
    return json.load(open(path)) if os.path.exists(path) else default


strata = {}
for name in ("one-stage-bf16", "one-stage-f32", "two-stage-one-gpu-bf16", "two-stage-two-gpus-bf16"):
    data = load(f"{speed}/strata-{name}.json")
    if data:
        strata[name] = {r["concurrency"]: r for r in data["rows"]}
candle = {d: {r["batch"]: r["decode_tok_s"] for r in load(f"{speed}/candle-llama-{d}.json", [])} for d in ("f32", "bf16")}
hf = {(r["dtype"], r["batch"]): r["aggregate_tok_s"] for r in load(f"{speed}/transformers.json", [])}
warm = [json.loads(l) for l in open(f"{out}/warmup/warmup.jsonl")] if os.path.exists(f"{out}/warmup/warmup.jsonl") else []
bandwidth = load(f"{speed}/bandwidth.json", {}).get("copy_read_bytes_per_s")
gpus = open(f"{out}/gpus.txt").read().strip() if os.path.exists(f"{out}/gpus.txt") else "?"

print(f"\nGPU: {gpus}")
print(f"{'engine':38s} {'c=1 decode':>11s} {'c=8 agg':>9s} {'c=32 agg':>9s}   (tokens/s)")
table = []
for name, rows in strata.items():
    c1 = rows.get(1, {}).get("per_stream_tok_s")
    row = [f"strata {name}", c1, rows.get(8, {}).get("aggregate_tok_s"), rows.get(32, {}).get("aggregate_tok_s")]
    table.append(row)
for d, rows in candle.items():
    table.append([f"candle llama {d} (same-length batch)", rows.get(1), rows.get(8), rows.get(32)])
for d in ("bfloat16", "float32"):
    if (d, 1) in hf:
        table.append([f"transformers {d} sdpa", hf.get((d, 1)), None, hf.get((d, 32))])
fmt = lambda v: f"{v:9.1f}" if isinstance(v, (int, float)) else f"{'-':>9s}"
for name, *vals in table:
    print(f"{name:38s} {fmt(vals[0]):>11s} {fmt(vals[1])} {fmt(vals[2])}")

checks = []


def check(what, value, target, ok):
    checks.append({"what": what, "value": value, "target": target, "met": ok})
    v = f"{value:.2f}" if isinstance(value, float) else str(value)
    print(f"  {'met   ' if ok else 'MISSED'} {what}: {v} (target {target})")


print("\nTargets:")
one = strata.get("one-stage-bf16", {})
if one and candle["bf16"]:
    r = one[1]["per_stream_tok_s"] / candle["bf16"][1]
    check("batch-1 decode, strata 1-stage bf16 / candle llama bf16", r, ">= 1.5", r >= 1.5)
if one and ("bfloat16", 1) in hf:
    r = one[1]["per_stream_tok_s"] / hf[("bfloat16", 1)]
    check("batch-1 decode, strata 1-stage bf16 / transformers bf16 sdpa", r, ">= 3", r >= 3)
two = strata.get("two-stage-one-gpu-bf16", {})
if one and two:
    r = two[1]["per_stream_tok_s"] / one[1]["per_stream_tok_s"]
    print(f"  info   batch-1 decode, 2 stages on one GPU / 1 stage in the table's single runs: {r:.2f}")
# The alternated pairs (gpu-stages.sh): 1 stage then 2 stages, round after round.
pairs = []
for n in range(1, 100):
    a, b = load(f"{speed}/stages/strata-one-stage-{n}.json"), load(f"{speed}/stages/strata-two-stage-{n}.json")
    if not (a and b):
        break
    pairs.append((a["rows"][0]["per_stream_tok_s"], b["rows"][0]["per_stream_tok_s"]))
stage_pairs = {"one_stage": [p[0] for p in pairs], "two_stages": [p[1] for p in pairs]}
if pairs:
    ratios = sorted(b / a for a, b in pairs)
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    stage_pairs["ratios"] = [b / a for a, b in pairs]
    print("  info   pairs (1 stage, 2 stages, ratio): "
          + ", ".join(f"{a:.0f}/{b:.0f}={b / a:.2f}" for a, b in pairs))
    check(f"batch-1 decode, 2 stages on one GPU / 1 stage, median of {len(pairs)} alternated pairs",
          median, ">= 0.9", median >= 0.9)
if one and candle["bf16"].get(32):
    r = one[32]["aggregate_tok_s"] / candle["bf16"][32]
    check("c=32 mixed-length aggregate, strata bf16 / candle bf16 same-length batch 32", r, ">= 1.0", r >= 1.0)
warm_ttft = [w["first_ttft_ms"] for w in warm if w["mode"] == "warm"]
if warm_ttft:
    check("first-request TTFT after warmup on a fresh worker, ms", max(warm_ttft), "< 100", max(warm_ttft) < 100)
weights = 1_100_048_384 * 2  # TinyLlama-1.1B parameters in bf16
if one and bandwidth:
    frac = one[1]["per_stream_tok_s"] * weights / bandwidth
    print(f"  info   batch-1 bf16 reads {frac:.1%} of the copy bandwidth ({bandwidth / 1e12:.2f} TB/s read)")
fidelity = load(f"{out}/fidelity/fidelity.json")
json.dump({"gpus": gpus, "strata": strata, "candle": candle, "transformers": {f"{d} b{b}": v for (d, b), v in hf.items()},
           "warmup": warm, "stage_pairs": stage_pairs if pairs else None, "copy_read_bytes_per_s": bandwidth, "checks": checks, "fidelity": fidelity},
          open(f"{out}/gpu.json", "w"), indent=1)
sys.exit(0 if all(c["met"] for c in checks) else 1)
