"""Time to first token of each turn of a scripted 5-turn chat, with the prefix cache and without:
the same messages go to two `strata serve`s, one started with `--prefix-cache-entries 0`, in
alternated order, round after round (each round its own chat, so no round starts on another's
caches). Checks whether both answer every turn with the same tokens and, where they part, how near
a tie the two servers' top two candidates were there (from `top_logprobs`); prints JSON.

Run: python3 bench/prefix_cache.py --warm 127.0.0.1:8000 --cold 127.0.0.1:8001 --key KEY [--rounds 3]
"""

import argparse
import json
import statistics
import time

import openai

SYSTEM = ("You are the front-desk assistant of the Harbour Street public library. The library opens "
          "at nine and closes at eight on weekdays, at five on Saturdays, and stays closed on Sundays. "
          "Members may borrow twelve books at a time for three weeks, renew twice online, and reserve "
          "study rooms up to a week ahead. The children's floor has story time on Wednesday mornings. "
          "Answer briefly and politely, and say so when you do not know something.")
QUESTIONS = [
    "When are you open on Saturday?",
    "How many books can I borrow at once?",
    "Can I renew them online, and how often?",
    "Is there anything for children during the week?",
    "How far ahead can I book a study room?",
]


def turn(client, messages, max_tokens):
    """One streamed turn: (time to first token in s, answer text, prompt tokens, cached tokens,
    [(token, top-2 gap in nats)] for each generated token)."""
    start = time.perf_counter()
    ttft = None
    text = ""
    usage = None
    tokens = []
    stream = client.chat.completions.create(
        model="", messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
        logprobs=True, top_logprobs=2, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                ttft = ttft or time.perf_counter() - start
                text += choice.delta.content
            for t in (choice.logprobs.content or []) if choice.logprobs else []:
                top = [c.logprob for c in t.top_logprobs]
                tokens.append((t.token, top[0] - top[1] if len(top) > 1 else float("inf")))
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ttft, text, usage.prompt_tokens, cached, tokens


def departure(warm, cold):
    """Where two answers' tokens part, with each server's top-2 gap there; None if they do not."""
    for i, (w, c) in enumerate(zip(warm, cold)):
        if w[0] != c[0]:
            return {"token": i, "warm_gap": round(w[1], 4), "cold_gap": round(c[1], 4)}
    return None


def warm_and_cold(max_tokens):
    """The command line shared with `shared_prefill.py`, and an OpenAI client for each server."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--warm", required=True, help="HTTP address of the serve with the cache")
    ap.add_argument("--cold", required=True, help="HTTP address of the serve without it")
    ap.add_argument("--key", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    a = ap.parse_args()
    clients = {name: openai.OpenAI(base_url=f"http://{addr}/v1", api_key=a.key, timeout=600)
               for name, addr in [("warm", a.warm), ("cold", a.cold)]}
    return a, clients


def main():
    a, clients = warm_and_cold(max_tokens=48)
    ttfts = {"warm": [[] for _ in QUESTIONS], "cold": [[] for _ in QUESTIONS]}
    cached = [[] for _ in QUESTIONS]
    prompt_tokens = [0] * len(QUESTIONS)
    mismatches = []
    for r in range(a.rounds):
        messages = [{"role": "system", "content": f"Session {r + 1}. {SYSTEM}"}]
        for t, question in enumerate(QUESTIONS):
            messages.append({"role": "user", "content": question})
            order = ["warm", "cold"] if (r + t) % 2 == 0 else ["cold", "warm"]
            answers = {}
            tokens = {}
            for name in order:
                ttft, text, prompt, hit, toks = turn(clients[name], messages, a.max_tokens)
                ttfts[name][t].append(round(ttft, 4))
                answers[name] = text
                tokens[name] = toks
                if name == "warm":
                    cached[t].append(hit)
                    prompt_tokens[t] = prompt
            if answers["warm"] != answers["cold"]:
                mismatches.append({"round": r, "turn": t + 1,
                                   "at": departure(tokens["warm"], tokens["cold"]),
                                   "warm": answers["warm"], "cold": answers["cold"]})
            print(f"round {r} turn {t + 1}: prompt {prompt_tokens[t]} tokens, cached "
                  f"{cached[t][-1]}, ttft warm {ttfts['warm'][t][-1] * 1e3:.0f} ms, "
                  f"cold {ttfts['cold'][t][-1] * 1e3:.0f} ms", flush=True)
            messages.append({"role": "assistant", "content": answers["warm"]})
    median = {name: [round(statistics.median(v), 4) for v in per_turn]
              for name, per_turn in ttfts.items()}
    ratio = [round(w / c, 3) for w, c in zip(median["warm"], median["cold"])]
    # The reference rule's bound: a departure is a near-tie where a top-2 gap is under 0.3 nats.
    gaps = [max(m["at"]["warm_gap"], m["at"]["cold_gap"]) for m in mismatches if m["at"]]
    print(json.dumps({"ttft_s": ttfts, "median_ttft_s": median, "warm_over_cold": ratio,
                      "prompt_tokens": prompt_tokens, "cached_tokens": cached,
                      "identical": not mismatches, "departures_at_near_ties": all(
                          g < 0.3 for g in gaps) and len(gaps) == len(mismatches),
                      "largest_departure_gap": max(gaps, default=None),
                      "mismatches": mismatches}))


if __name__ == "__main__":
    main()
