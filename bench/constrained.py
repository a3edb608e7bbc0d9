"""Aggregate decode tok/s of 8 concurrent chat streams, grammar-constrained (response_format
json_schema) against unconstrained, alternated in rounds on one `strata serve`; prints JSON.
Every constrained reply is checked against the schema: the report counts the replies that
validate, those cut by max_tokens (`finish_reason: length`, which may not), and those that neither
validate nor were cut (a bug: there must be none).

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


def validates(text):
    """Whether `text` is valid under SCHEMA (its keywords only: types and required keys)."""
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return (isinstance(v, dict) and isinstance(v.get("name"), str)
            and isinstance(v.get("facts"), list) and all(isinstance(f, str) for f in v["facts"]))


def one(client, city, constrained, max_tokens):
    """(completion tokens, what the reply was: "valid", "cut", "invalid", or None unconstrained)."""
    kw = {}
    if constrained:
        kw["response_format"] = {"type": "json_schema",
                                 "json_schema": {"name": "c", "schema": SCHEMA}}
    r = client.chat.completions.create(
        model="", messages=[{"role": "user", "content": f"Tell me about {city} in JSON."}],
        temperature=0, max_tokens=max_tokens, **kw)
    verdict = None
    if constrained:
        choice = r.choices[0]
        if validates(choice.message.content or ""):
            verdict = "valid"
        elif choice.finish_reason == "length":
            verdict = "cut"
        else:
            verdict = "invalid"
    return r.usage.completion_tokens, verdict


def round_(client, constrained, streams, max_tokens, verdicts):
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda c: one(client, c, constrained, max_tokens),
                                CITIES[:streams]))
    for _, verdict in results:
        if verdict:
            verdicts[verdict] += 1
    tokens = sum(t for t, _ in results)
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
    verdicts = {"valid": 0, "cut": 0, "invalid": 0}
    round_(client, True, a.streams, 8, dict(verdicts))  # builds the vocabulary's trie once
    rates = {"constrained": [], "unconstrained": []}
    for r in range(a.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        for constrained in order:
            rate, tokens = round_(client, constrained, a.streams, a.max_tokens, verdicts)
            key = "constrained" if constrained else "unconstrained"
            rates[key].append(round(rate, 2))
            print(f"round {r} {key}: {rate:.1f} tok/s ({tokens} tokens)", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    uncut = verdicts["valid"] + verdicts["invalid"]
    print(json.dumps({"rounds": rates, "median": med,
                      "ratio": round(med["constrained"] / med["unconstrained"], 3),
                      "replies": verdicts,
                      "valid_of_uncut": round(verdicts["valid"] / uncut, 3) if uncut else None}))
    if verdicts["invalid"]:
        raise SystemExit(f"{verdicts['invalid']} constrained replies neither validate nor were cut")


if __name__ == "__main__":
    main()
