"""A Llama 3.x GGUF whose metadata carries `rope_freqs` is computed with it.

Writes a small random-weight Llama GGUF (f32 tensors, a byte-level tokenizer) with a non-trivial
`rope_freqs.weight` (Llama 3's divisors, what llama.cpp's converter writes), computes its greedy
continuation and log-probabilities with an independent NumPy float64 forward pass (llama.cpp's
"normal" RoPE: adjacent pairs, each frequency divided by its factor), and checks `strata generate`
through 1 and 2 stages against it. The same model without the factors gives other log-probabilities
(so the check can tell), and strata's output on it differs as NumPy's does.

Run: STRATA_BIN=target/release/strata python3 cli/tests/python/rope_freqs_reference.py
(cargo test runs it: cli/tests/families.rs)
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest

import gguf
import numpy as np

STRATA = os.environ.get("STRATA_BIN", "target/release/strata")
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 2, 64, 4, 2, 128, 256
HEAD_DIM = HIDDEN // HEADS
THETA, EPS = 500000.0, 1e-5
PROMPT = "hello hello world, hello"
STEPS = 10


def byte_alphabet():
    """GPT-2's byte-to-character map, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def llama3_factors():
    """Llama 3's per-frequency divisors for a short original context, so that they matter at the
    positions of a short prompt: high frequencies 1, low ones `factor`, a ramp between."""
    factor, low, high, old = 8.0, 1.0, 4.0, 64
    inv = THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    out = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_model(path, factors, seed=7):
    rng = np.random.default_rng(seed)
    tokens = byte_alphabet() + ["he", "ll", "hell", "hello", "<s>", "</s>"]
    merges = ["h e", "l l", "he ll", "hell o"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_freq_base(THETA)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_add_bos_token(False)
    weights = {}

    def add(name, shape, scale=None):
        a = (rng.standard_normal(shape) * scale if scale else 1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        weights[name] = a
        w.add_tensor(name, a)

    add("token_embd.weight", (vocab, HIDDEN), 1.0)
    if factors is not None:
        weights["rope_freqs.weight"] = factors
        w.add_tensor("rope_freqs.weight", factors)
    for i in range(LAYERS):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (HIDDEN,))
        add(p + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN), 0.3)
        add(p + "attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN), 0.3)
        add(p + "attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN), 0.3)
        add(p + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM), 0.1)
        add(p + "ffn_norm.weight", (HIDDEN,))
        add(p + "ffn_gate.weight", (FFN, HIDDEN), 0.1)
        add(p + "ffn_up.weight", (FFN, HIDDEN), 0.1)
        add(p + "ffn_down.weight", (HIDDEN, FFN), 0.1)
    add("output_norm.weight", (HIDDEN,))
    add("output.weight", (vocab, HIDDEN), 0.3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: v.astype(np.float64) for k, v in weights.items()}


def log_probs(weights, ids, factors):
    """The next token's log-probabilities after `ids`, in float64."""
    n = len(ids)
    pos = np.arange(n)

    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * g

    inv = THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    if factors is not None:
        inv = inv / factors
    ang = np.outer(pos, inv)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rope(x):
        # llama.cpp's normal RoPE: pairs (2i, 2i + 1).
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    x = weights["token_embd.weight"][ids]
    group = HEADS // KV_HEADS
    for i in range(LAYERS):
        p = f"blk.{i}."
        h = rms(x, weights[p + "attn_norm.weight"])
        q = rope((h @ weights[p + "attn_q.weight"].T).reshape(n, HEADS, HEAD_DIM))
        k = rope((h @ weights[p + "attn_k.weight"].T).reshape(n, KV_HEADS, HEAD_DIM))
        v = (h @ weights[p + "attn_v.weight"].T).reshape(n, KV_HEADS, HEAD_DIM)
        out = np.zeros((n, HEADS, HEAD_DIM))
        for head in range(HEADS):
            s = q[:, head] @ k[:, head // group].T / np.sqrt(HEAD_DIM)
            s[np.triu(np.ones((n, n), dtype=bool), 1)] = -np.inf
            e = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (e / e.sum(-1, keepdims=True)) @ v[:, head // group]
        x = x + out.reshape(n, -1) @ weights[p + "attn_output.weight"].T
        h = rms(x, weights[p + "ffn_norm.weight"])
        gate = h @ weights[p + "ffn_gate.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ weights[p + "ffn_up.weight"].T)) @ weights[p + "ffn_down.weight"].T
    logits = weights["output.weight"] @ rms(x[-1], weights["output_norm.weight"])
    logits = logits - logits.max()
    return logits - np.log(np.exp(logits).sum())


def reference(weights, prompt_ids, factors):
    """Greedy continuation and each step's log-probabilities."""
    ids, steps = list(prompt_ids), []
    for _ in range(STEPS):
        lp = log_probs(weights, ids, factors)
        steps.append(lp)
        ids.append(int(np.argmax(lp)))
    return ids[len(prompt_ids):], steps


def strata(model, stages):
    out = subprocess.run(
        [STRATA, "generate", "--model", model, "--local", str(stages), "--no-warmup", "--threads", "1",
         "--prompt", PROMPT, "--max-tokens", str(STEPS), "--temperature", "0", "--ignore-eos", "--json"],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class RopeFreqs(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.factors = llama3_factors()
        assert cls.factors.min() == 1.0 and cls.factors.max() == 8.0 and len(set(cls.factors.tolist())) > 2
        cls.path = os.path.join(cls.dir.name, "llama3-rope-freqs.gguf")
        cls.weights = write_model(cls.path, cls.factors)
        cls.plain_path = os.path.join(cls.dir.name, "llama3-no-rope-freqs.gguf")
        cls.plain_weights = write_model(cls.plain_path, None)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def check(self, path, weights, factors, stages):
        got = strata(path, stages)
        want_ids, steps = reference(weights, got["prompt_ids"], factors)
        self.assertEqual(got["token_ids"], want_ids)
        worst = 0.0
        for top, lp in zip(got["top_logprobs"], steps):
            for entry in top:
                worst = max(worst, abs(entry["logprob"] - lp[entry["id"]]))
        self.assertLess(worst, 1e-3, f"log-probabilities {worst:.2e} away from NumPy's")
        return got, worst

    def test_rope_freqs_are_applied_through_1_and_2_stages(self):
        for stages in (1, 2):
            _, worst = self.check(self.path, self.weights, self.factors, stages)
            print(f"{stages} stage(s): greedy tokens equal NumPy's, log-probabilities within {worst:.1e}", file=sys.stderr)

    def test_the_factors_change_the_result(self):
        prompt = strata(self.path, 1)["prompt_ids"]
        with_factors = reference(self.weights, prompt, self.factors)[1][0]
        without = reference(self.weights, prompt, None)[1][0]
        self.assertGreater(np.abs(with_factors - without).max(), 0.05)
        # Without the tensor, strata runs plain RoPE, and agrees with NumPy's plain RoPE.
        self.check(self.plain_path, self.plain_weights, None, 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
