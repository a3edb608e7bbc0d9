"""Writes a random-weight Llama GGUF of a real shape (f16 weights, f32 norms), for llama-quantize
to turn into the formats people download, so strata and llama.cpp can be timed on the same files on
a host that cannot receive real models.

The tokenizer is strata's synthetic byte-level one (`strata make-model`): `<s>`, `</s>`, the 256
byte symbols, filler tokens, and one merge (both engines' BPE loaders want at least one). q and k
are stored in GGML's interleaved order, as `convert_hf_to_gguf.py` stores a Hugging Face Llama.

Usage: python3 bench/gguf_random.py SHAPE OUT.gguf [--gguf-py DIR] [--layers N]
SHAPE: tinyllama-1.1b or llama-3-8b. Draws on the GPU when PyTorch has one (seconds for 8B).
"""

import argparse
import sys

import numpy as np

SHAPES = {
    "tinyllama-1.1b": dict(layers=22, hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=32000,
                           context=2048, theta=10000.0),
    "llama-3-8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256,
                       context=8192, theta=500000.0),
}


def normal_source(seed):
    """Returns draw(shape, std, mean) giving an f16 array (f32 for norms) of normal samples."""
    try:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(seed)

        def draw(shape, std, mean=0.0, dtype=np.float16):
            t = torch.randn(shape, generator=gen, device=device) * std + mean
            return t.to(torch.float16 if dtype == np.float16 else torch.float32).cpu().numpy()
    except ImportError:
        rng = np.random.default_rng(seed)

        def draw(shape, std, mean=0.0, dtype=np.float16):
            return (rng.standard_normal(shape, dtype=np.float32) * std + mean).astype(dtype)
    return draw


def interleave(w, heads):
    """Hugging Face's rotate-half order to GGML's pairwise order, as convert_hf_to_gguf.py does."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--gguf-py", help="llama.cpp's gguf-py directory, if gguf is not installed")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    if args.gguf_py:
        sys.path.insert(0, args.gguf_py)
    import gguf

    s = dict(SHAPES[args.shape])
    if args.layers:
        s["layers"] = args.layers
    hidden, heads, kv_heads = s["hidden"], s["heads"], s["kv_heads"]
    head_dim = hidden // heads
    draw = normal_source(args.seed)

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"random {args.shape}")
    w.add_context_length(s["context"])
    w.add_embedding_length(hidden)
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    # The byte symbols in the order GPT-2's byte-level mapping sorts them, as strata's synthetic
    # tokenizer lists them.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    tokens = ["<s>", "</s>"] + sorted(symbols)
    tokens += [f"Ġw{i}" for i in range(len(tokens), s["vocab"] - 1)] + ["ĠĠ"]
    types = [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (len(tokens) - 2)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)

    ones = lambda n: draw((n,), 0.1, 1.0, np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", draw((s["vocab"], hidden), 1.0))
    for i in range(s["layers"]):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones(hidden))
        w.add_tensor(b + "attn_q.weight", interleave(draw((hidden, hidden), 0.02), heads))
        w.add_tensor(b + "attn_k.weight", interleave(draw((kv_heads * head_dim, hidden), 0.02), kv_heads))
        w.add_tensor(b + "attn_v.weight", draw((kv_heads * head_dim, hidden), 0.02))
        w.add_tensor(b + "attn_output.weight", draw((hidden, hidden), 0.02))
        w.add_tensor(b + "ffn_norm.weight", ones(hidden))
        w.add_tensor(b + "ffn_gate.weight", draw((s["ffn"], hidden), 0.02))
        w.add_tensor(b + "ffn_up.weight", draw((s["ffn"], hidden), 0.02))
        w.add_tensor(b + "ffn_down.weight", draw((hidden, s["ffn"]), 0.02))
    w.add_tensor("output_norm.weight", ones(hidden))
    w.add_tensor("output.weight", draw((s["vocab"], hidden), 0.02))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(args.out)


if __name__ == "__main__":
    main()
