"""Compares strata's greedy tokens and reported log-probabilities with transformers fp32 (and
transformers bf16 as the yardstick for bf16 error) on the same weights. Called by gpu-fidelity.sh."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

model_dir, out, configs = sys.argv[1], sys.argv[2], sys.argv[3:]
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# Soft-capped attention (Gemma 2) is only computed by transformers' eager path: SDPA drops the cap.
config = json.load(open(f"{model_dir}/config.json"))
attention = "eager" if config.get("attn_logit_softcapping") else "sdpa"
hf = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.float32, attn_implementation=attention
).cuda().eval()
hf_bf16 = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.bfloat16, attn_implementation=attention
).cuda().eval()


def rel_l2(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


report = {}
for name in configs:
    rows = [json.loads(l) for l in open(f"{out}/{name}.jsonl")]
    results = []
    for r in rows:
        prompt, tokens = r["prompt_ids"], r["token_ids"]
        ids = torch.tensor([prompt + tokens], device="cuda")
        with torch.no_grad():
            logits = hf(ids).logits[0].float()
            free = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=len(tokens),
                               min_new_tokens=len(tokens), do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
            bf16_logits = hf_bf16(ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        # Position len(prompt)-1+t predicts generated token t.
        first = len(prompt) - 1
        max_lp_diff = 0.0
        for t, top in enumerate(r["top_logprobs"]):
            for alt in top:
                ref = float(logprobs[first + t, alt["id"]])
                max_lp_diff = max(max_lp_diff, abs(ref - alt["logprob"]))
        teacher_forced = logits[first:first + len(tokens)].argmax(-1).tolist()
        last = first + len(tokens) - 1
        results.append({
            "prompt_tokens": len(prompt),
            "identical_to_transformers_generate": free == tokens,
            "first_difference": next((i for i, (x, y) in enumerate(zip(free, tokens)) if x != y), None),
            "teacher_forced_argmax_agree": sum(int(x == y) for x, y in zip(teacher_forced, tokens)),
            "max_abs_logprob_diff_top5": max_lp_diff,
            "transformers_bf16_vs_fp32_rel_l2_last": rel_l2(bf16_logits[last], logits[last]),
        })
    report[name] = results
    same = sum(r["identical_to_transformers_generate"] for r in results)
    print(f"{name:10s} greedy 32 tokens identical to transformers fp32: {same}/{len(results)} prompts; "
          f"teacher-forced argmax agreement {[r['teacher_forced_argmax_agree'] for r in results]}/32; "
          f"max |logprob diff| over reported top-5: {max(r['max_abs_logprob_diff_top5'] for r in results):.2e}")
print("transformers' own bf16 vs fp32 logits, rel L2 at the last position:",
      [round(r["transformers_bf16_vs_fp32_rel_l2_last"], 4) for r in report[configs[0]]])

# Whole last-position logits from `strata bench logits` against transformers fp32 (and bf16).
prompts = json.load(open(f"{out}/logit-prompts.json"))
ref, ref_bf16 = [], []
with torch.no_grad():
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        ref.append(hf(ids).logits[0, -1].float().cpu())
        ref_bf16.append(hf_bf16(ids).logits[0, -1].float().cpu())
hf_bf16_err = [rel_l2(b, r) for b, r in zip(ref_bf16, ref)]
logit_report = {"transformers_bf16": hf_bf16_err}
failures = []
for name in ("f32-one-stage", "f32-two-stage", "f32-mixed", "bf16-one-stage", "bf16-two-stage", "bf16-mixed"):
    rows = json.load(open(f"{out}/logits-{name}.json"))
    errs = [rel_l2(torch.tensor(row), r) for row, r in zip(rows, ref)]
    logit_report[name] = errs
    if name.startswith("f32"):
        ok = max(errs) <= 1e-3
        target = "<= 1e-3"
    else:
        ratios = [e / h for e, h in zip(errs, hf_bf16_err)]
        logit_report[name + "_over_transformers_bf16"] = ratios
        ok = max(ratios) <= 1.5
        target = f"<= 1.5x transformers bf16 (ratios {[round(x, 2) for x in ratios]})"
    print(f"logits {name:15s} rel L2 vs transformers fp32: {[f'{e:.2e}' for e in errs]}  target {target}: {'ok' if ok else 'MISSED'}")
    if not ok:
        failures.append(name)
print("transformers bf16 vs fp32, rel L2:", [f"{e:.2e}" for e in hf_bf16_err])
for name, results in report.items():
    if not all(r["identical_to_transformers_generate"] for r in results):
        failures.append(name + " tokens")
report["logits"] = logit_report
json.dump(report, open(f"{out}/fidelity.json", "w"), indent=1)
if failures:
    print("FIDELITY TARGETS MISSED:", failures)
    sys.exit(1)
