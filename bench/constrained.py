"""Aggregate decode tok/s of 8 concurrent chat streams, grammar-constrained (response_format
json_schema) against unconstrained, alternated in rounds on one `strata serve`; prints JSON.

Run: python3 bench/constrained.py --http 127.0.0.1:8000 --key KEY [--rounds 3] [--streams 8]
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "facts"],
}
CITIES = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Hanoi", "Quito", "Lisbon", "Seoul",
          "Rome", "Accra", "Dhaka", "Sofia", "Perth", "Havana"]


def one(client, city, constrained, max_tokens):
    kw = {}
    if constrained:
        kw["response_format"] = {"type": "json_schema",
                                 "json_schema": {"name": "c", "schema": SCHEMA}}
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": f"Tell me about {city} in JSON."}],
        temperature=0, max_tokens=max_tokens, **kw)
    return r.usage.completion_tokens


def round_(client, constrained, streams, max_tokens):
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(lambda c: one(client, c, constrained, max_tokens),
                              CITIES[:streams]))
    return tokens / (time.perf_counter() - start), tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=f"http://{a.http}/v1", api_key=a.key, timeout=600)
    round_(client, True, a.streams, 8)  # builds the vocabulary's trie once
    rates = {"constrained": [], "unconstrained": []}
    for r in range(a.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        for constrained in order:
            rate, tokens = round_(client, constrained, a.streams, a.max_tokens)
            key = "constrained" if constrained else "unconstrained"
            rates[key].append(round(rate, 2))
            print(f"round {r} {key}: {rate:.1f} tok/s ({tokens} tokens)", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"rounds": rates, "median": med,
                      "ratio": round(med["constrained"] / med["unconstrained"], 3)}))


if __name__ == "__main__":
    main()
