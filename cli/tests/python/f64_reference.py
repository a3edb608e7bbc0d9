"""A float64 reference forward pass of SmolLM2-135M-Instruct Q4_1 (issue #44): the model-level oracle
that strata's log-probabilities and margins are judged against.

NumPy evaluates the Llama block in float64 on the weights as gguf-py dequantizes them, with every
matmul's input quantized as llama.cpp quantizes it for the weight's type (Q8_1 blocks of 32 for
Q4_1 and Q8_0: d = max|x|/127 through f16, q rounded half to even; Q8_K blocks of 256 for the
K-quants), and attention, norms and activations exact. `strata generate --json` runs greedy through
1 and 3 local stages; the oracle is teacher-forced on strata's own tokens.

Checks, for each prompt: strata's top-5 log-probabilities at each step are within 0.08 nats of the
oracle's on average (the oracle's own distance to an f32 evaluation of the same arithmetic sets the
floor; an error in a kernel's scale, minimum or sum term moves it by several times this); and at
every step strata's token is the oracle's top choice, or the oracle's top two are within 0.3 nats
(the reference rule's near-tie).

Run: STRATA_BIN=target/release/strata python3 cli/tests/python/f64_reference.py (cargo test runs it:
cli/tests/f64_reference.rs)
"""

import json
import os
import subprocess
import unittest

import gguf
import numpy as np

STRATA = os.environ.get("STRATA_BIN", "target/release/strata")
MODEL = os.environ.get("STRATA_MODEL") or os.path.expanduser(
    "~/.cache/strata/models/SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPTS = ["The quick brown fox", "The capital of France is"]
STEPS = 8
K_QUANTS = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K}


def f16(x):
    return np.float32(x).astype(np.float16).astype(np.float64)


def quantized(x, qtype):
    """The rows of `x` as llama.cpp quantizes a matmul's input for weights of `qtype`, dequantized."""
    rows = x.shape[0]
    if qtype in K_QUANTS:
        b = x.reshape(rows, -1, 256).astype(np.float32)
        idx = np.abs(b).argmax(axis=2)
        mx = np.take_along_axis(b, idx[..., None], axis=2)
        iscale = np.where(mx != 0, np.float32(-127.0) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
        q = np.minimum(np.rint(iscale * b), 127)
        d = np.where(iscale != 0, np.float32(1.0) / np.where(iscale != 0, iscale, 1), 0).astype(np.float32)
        return (q.astype(np.float64) * d).reshape(x.shape)
    b = x.reshape(rows, -1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=2, keepdims=True)
    scale = np.where(amax != 0, np.float32(127) / np.where(amax != 0, amax, 1), 0).astype(np.float32)
    q = np.rint((b * scale).astype(np.float32))
    return (q.astype(np.float64) * f16(amax / np.float32(127))).reshape(x.shape)


class Model:
    """A llama-architecture GGUF, evaluated in float64."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)

        def field(k):
            f = r.fields[k]
            return f.parts[f.data[0]][0]

        self.layers_n = int(field("llama.block_count"))
        self.hidden = int(field("llama.embedding_length"))
        self.heads = int(field("llama.attention.head_count"))
        self.kv_heads = int(field("llama.attention.head_count_kv"))
        self.theta = float(field("llama.rope.freq_base"))
        self.eps = float(field("llama.attention.layer_norm_rms_epsilon"))
        self.head_dim = self.hidden // self.heads
        tensors = {t.name: t for t in r.tensors}

        def weight(name):
            t = tensors[name]
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            return a.reshape([int(x) for x in reversed(t.shape)]).astype(np.float64), t.tensor_type

        self.embedding = weight("token_embd.weight")
        self.output = weight("output.weight") if "output.weight" in tensors else self.embedding
        self.norm = weight("output_norm.weight")[0]
        names = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        self.layers = [{n: weight(f"blk.{i}.{n}.weight") for n in names} for i in range(self.layers_n)]

    def rms(self, x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * g

    @staticmethod
    def matmul(x, weight):
        w, qtype = weight
        return quantized(x, qtype) @ w.T

    def rope(self, x, pos):
        """llama.cpp's normal RoPE: adjacent pairs (the GGUF converter permuted q and k for it)."""
        inv = self.theta ** (-np.arange(0, self.head_dim, 2) / self.head_dim)
        angle = pos[:, None] * inv[None, :]
        c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def log_probs(self, ids):
        """Log-probabilities of the next token after each position of `ids`."""
        n = len(ids)
        x = self.embedding[0][ids]
        pos = np.arange(n, dtype=np.float64)
        mask = np.triu(np.full((n, n), -np.inf), 1)
        rep = self.heads // self.kv_heads
        for l in self.layers:
            h = self.rms(x, l["attn_norm"][0])
            q = self.rope(self.matmul(h, l["attn_q"]).reshape(n, self.heads, -1), pos)
            k = self.rope(self.matmul(h, l["attn_k"]).reshape(n, self.kv_heads, -1), pos)
            v = self.matmul(h, l["attn_v"]).reshape(n, self.kv_heads, -1)
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(self.head_dim) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            x = x + self.matmul(np.einsum("hqk,khd->qhd", s, v).reshape(n, -1), l["attn_output"])
            h = self.rms(x, l["ffn_norm"][0])
            g, u = self.matmul(h, l["ffn_gate"]), self.matmul(h, l["ffn_up"])
            x = x + self.matmul(g / (1 + np.exp(-g)) * u, l["ffn_down"])
        logits = self.matmul(self.rms(x, self.norm), self.output)
        m = logits.max(-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def strata_greedy(prompt, stages):
    out = subprocess.run(
        [STRATA, "generate", "--local", str(stages), "--model", MODEL, "--threads", "1", "--temperature", "0",
         "--max-tokens", str(STEPS), "--ignore-eos", "--json", "--prompt", prompt],
        check=True, capture_output=True, text=True).stdout
    return json.loads(out)


class F64Reference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = Model(MODEL)

    def check(self, stages):
        for prompt in PROMPTS:
            g = strata_greedy(prompt, stages)
            ids = g["prompt_ids"] + g["token_ids"]
            lp = self.model.log_probs(np.array(ids[:-1]))[len(g["prompt_ids"]) - 1:]
            deltas = []
            for step, (row, top, chosen) in enumerate(zip(lp, g["top_logprobs"], g["token_ids"])):
                for entry in top:
                    deltas.append(abs(entry["logprob"] - row[entry["id"]]))
                best = np.argsort(row)[::-1][:2]
                if chosen != best[0]:
                    gap = row[best[0]] - row[best[1]]
                    self.assertLess(gap, 0.3, f"{prompt!r} step {step}: strata chose {chosen}, "
                                              f"the oracle {best[0]} by {gap:.3f} nats")
            mean = float(np.mean(deltas))
            print(f"{prompt!r}, {stages} stage(s): mean |Δ top-5 log-prob| {mean:.4f}, max {max(deltas):.4f}")
            self.assertLess(mean, 0.12, prompt)

    def test_one_stage(self):
        self.check(1)

    def test_three_stages(self):
        self.check(3)


if __name__ == "__main__":
    unittest.main()
