"""Requests that share a prompt prefix sent at once, with the prefix cache and without: an `n = 4`
chat request, and a burst of 4 requests with one system prompt and different questions. The same
requests go to two `strata serve`s, one started with `--prefix-cache-entries 0`, in alternated
order, round after round (each round its own system prompt, so no round starts on another's
caches). Prints, per case, the median time until every answer is complete and until the first
token of the slowest answer, and the cached prompt tokens; JSON last.

Run: python3 bench/shared_prefill.py --warm 127.0.0.1:8000 --cold 127.0.0.1:8001 --key KEY [--rounds 3]
"""

import concurrent.futures
import json
import statistics
import time

from prefix_cache import QUESTIONS as CHAT_QUESTIONS, warm_and_cold

SYSTEM = ("You are the front-desk assistant of the Harbour Street public library. The library opens "
          "at nine and closes at eight on weekdays, at five on Saturdays, and stays closed on Sundays. "
          "Members may borrow twelve books at a time for three weeks, renew twice online, and reserve "
          "study rooms up to a week ahead. The children's floor has story time on Wednesday mornings. "
          "The reading room on the second floor is silent; the café on the ground floor is not. "
          "Lost cards cost two pounds to replace; late books cost ten pence a day. "
          "Answer briefly and politely, and say so when you do not know something.")
QUESTIONS = CHAT_QUESTIONS[:4]


def one(client, messages, n, max_tokens, start):
    """One streamed request: (s to its last choice's first token, s to its end, cached tokens)."""
    firsts = {}
    usage = None
    stream = client.chat.completions.create(
        model="", messages=messages, temperature=0.8, seed=1, n=n, max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                firsts.setdefault(choice.index, time.perf_counter() - start)
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return max(firsts.values()), time.perf_counter() - start, cached


def case(client, name, system, max_tokens):
    """(slowest first token, all done, cached tokens of each request) for one case, in s."""
    start = time.perf_counter()
    if name == "n4":
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": QUESTIONS[0]}]
        results = [one(client, messages, 4, max_tokens, start)]
    else:
        with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
            futures = [pool.submit(one, client, [{"role": "system", "content": system},
                                                 {"role": "user", "content": q}],
                                   1, max_tokens, start) for q in QUESTIONS]
            results = [f.result() for f in futures]
    return (max(r[0] for r in results), max(r[1] for r in results), [r[2] for r in results])


def main():
    a, clients = warm_and_cold(max_tokens=16)
    cases = ["n4", "burst4"]
    times = {c: {s: {"first": [], "done": []} for s in clients} for c in cases}
    cached = {c: [] for c in cases}
    for r in range(a.rounds):
        for i, c in enumerate(cases):
            system = f"Session {r + 1}, case {c}. {SYSTEM}"
            order = ["warm", "cold"] if (r + i) % 2 == 0 else ["cold", "warm"]
            for server in order:
                first, done, hits = case(clients[server], c, system, a.max_tokens)
                times[c][server]["first"].append(round(first, 4))
                times[c][server]["done"].append(round(done, 4))
                if server == "warm":
                    cached[c].append(hits)
            print(f"round {r} {c}: warm first {times[c]['warm']['first'][-1] * 1e3:.0f} ms, done "
                  f"{times[c]['warm']['done'][-1] * 1e3:.0f} ms; cold first "
                  f"{times[c]['cold']['first'][-1] * 1e3:.0f} ms, done "
                  f"{times[c]['cold']['done'][-1] * 1e3:.0f} ms; cached {cached[c][-1]}",
                  flush=True)
    median = {c: {s: {k: round(statistics.median(v), 4) for k, v in per.items()}
                  for s, per in by_server.items()} for c, by_server in times.items()}
    ratio = {c: {k: round(m["warm"][k] / m["cold"][k], 3) for k in ["first", "done"]}
             for c, m in median.items()}
    print(json.dumps({"times_s": times, "median_s": median, "warm_over_cold": ratio,
                      "cached_tokens": cached}))


if __name__ == "__main__":
    main()
