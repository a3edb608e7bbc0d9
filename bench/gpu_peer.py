"""transformers' greedy generation speed on a model directory: batch 1 and batch 32, 16-token
prompts, 128 new tokens, bf16 and fp32 (sdpa attention, its default). Called by gpu-speed.sh."""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, out = sys.argv[1], sys.argv[2]
torch.backends.cuda.matmul.allow_tf32 = False
results = []
for dtype in (torch.bfloat16, torch.float32):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()
    for batch in (1, 32):
        ids = torch.randint(2, 32000, (batch, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

        def run(n):
            with torch.no_grad():
                return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)

        run(8)  # warm up
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(128)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        r = {"engine": "transformers", "dtype": str(dtype).split(".")[-1], "batch": batch,
             "aggregate_tok_s": round(batch * 128 / elapsed, 1)}
        print(r)
        results.append(r)
    del model
    torch.cuda.empty_cache()
json.dump(results, open(out, "w"), indent=1)
