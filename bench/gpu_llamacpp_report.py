"""The table of bench/gpu-llamacpp.sh: strata (each configuration it ran) against llama.cpp on the
same GGUF files, decode tokens/s at 1, 8 and 32 streams and prefill of a 512-token prompt; medians
over the rounds; whether any configuration changes a greedy token. Writes OUT/llamacpp.json.
Usage: python3 bench/gpu_llamacpp_report.py OUT_DIR
"""

import glob
import json
import os
import re
import statistics
import sys

out = sys.argv[1]


def json_lines(*paths):
    rows = []
    for path in paths:
        if os.path.exists(path):
            for line in open(path):
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return rows


def median(values):
    return statistics.median(values) if values else None


names = sorted({re.sub(r"^llama-bench-|\.json$", "", os.path.basename(p))
                for p in glob.glob(f"{out}/llama-bench-*.json")})
variants = [v.strip() for v in open(f"{out}/variants.txt") if v.strip()]
report, failed = [], False
for name in names:
    path = f"{out}/llama-bench-{name}.json"
    lb = json.load(open(path)) if os.path.getsize(path) else []
    llama = {"pp512": next((r["avg_ts"] for r in lb if r["n_prompt"] == 512 and r["n_gen"] == 0), None),
             1: next((r["avg_ts"] for r in lb if r["n_gen"] == 128 and r["n_prompt"] == 0), None)}
    for r in json_lines(f"{out}/llama-batched-{name}.jsonl", f"{out}/llama-batched-{name}.log"):
        if r.get("pl") in (8, 32):
            llama[r["pl"]] = r["speed_tg"]
    row = {"file": name, "llama_cpp": llama, "strata": {}}
    tokens = []
    for variant in variants:
        per = {1: [], 8: [], 32: [], "pp512": []}
        for path in sorted(glob.glob(f"{out}/strata-{name}-{variant}-*.json")):
            for r in json.load(open(path))["rows"]:
                # Decode only, as llama-batched-bench's S_TG (the bench's `aggregate` includes the
                # prompts).
                per[r["concurrency"]].append(r["decode_aggregate_tok_s"])
        for path in sorted(glob.glob(f"{out}/prefill-{name}-{variant}-*.json")):
            # The first request of a fresh worker includes one-time work; the rest are prefill.
            for g in json_lines(path)[1:]:
                if g["cached_tokens"] == 0:
                    per["pp512"].append(len(g["prompt_ids"]) / (g["ttft_ms"] / 1e3))
        row["strata"][variant] = {k: median(v) for k, v in per.items()}
        tokens += [[g["token_ids"] for g in json_lines(p)]
                   for p in sorted(glob.glob(f"{out}/tokens-{name}-{variant}-*.json"))]
    same = bool(tokens) and all(t == tokens[0] for t in tokens)
    row["greedy_tokens_identical"] = same
    failed |= not same
    report.append(row)

fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
ratio = lambda a, b: "-" if not a or not b else f"{a / b:.2f}×"  # noqa: E731
print("| file | column | llama.cpp | " + " | ".join(f"strata {v} | ÷ llama.cpp" for v in variants) + " |")
print("|---|---|---|" + "---|---|" * len(variants))
for row in report:
    for key, label in ((1, "decode, 1 stream"), (8, "decode, 8 streams"), (32, "decode, 32 streams"),
                       ("pp512", "prefill 512")):
        l = row["llama_cpp"].get(key)
        cells = []
        for v in variants:
            g = row["strata"][v].get(key)
            cells += [fmt(g), ratio(g, l)]
        print(f"| {row['file']} | {label} | {fmt(l)} | " + " | ".join(cells) + " |")
    print(f"| {row['file']} | greedy tokens the same in every configuration | {row['greedy_tokens_identical']} |")
json.dump(report, open(f"{out}/llamacpp.json", "w"), indent=1, default=str)
sys.exit(1 if failed or not report else 0)
