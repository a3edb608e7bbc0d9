"""Tenants stay apart (issue #43), driven by the official `openai` client against real `strata serve`
clusters with two named API keys in a keys file.

Checks: key B sending key A's exact prompt gets `cached_tokens` 0, no prefix-cache hit in
`/metrics`, and a first token no sooner than a cold prefill's; key A's repeat still hits its own
cache; with `--share-prefix-cache` both hit. Removing a key beside a malformed line revokes it
within 2 s while the other key keeps working; deleting the keys file revokes every key.

Run: STRATA_BIN=target/release/strata python3 cli/tests/python/tenants.py (cargo test runs it:
cli/tests/tenants.rs)
"""

import os
import subprocess
import tempfile
import time
import unittest
import urllib.request

import openai

STRATA = os.environ.get("STRATA_BIN", "target/release/strata")
KEY_A = "tenant-alice-key-0123456789abcdef"
KEY_B = "tenant-bob-key-0123456789abcdef01"
SCRAPE = "tenant-scrape-token-0123456789ab"
# A long system prompt, so a cold prefill takes far longer than a cached one.
SYSTEM = " ".join(f"Rule {i}: answer in plain words and never mention the number {i * 7}." for i in range(40))


def start(keys_file, scrape_file, *extra):
    env = dict(os.environ, RUST_LOG="warn")
    env.pop("STRATA_API_KEY", None)
    proc = subprocess.Popen(
        [STRATA, "serve", "--local", "1", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
         "--threads", "2", "--announce", "--api-keys", keys_file, "--metrics-token-file", scrape_file,
         *extra],
        stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    if not line.startswith("STRATA_LISTENING "):
        proc.kill()
        raise RuntimeError(f"strata serve did not start: {line!r}")
    return proc, line.split()[2]


def client(http, key):
    return openai.OpenAI(base_url=f"http://{http}/v1", api_key=key, max_retries=0)


def ask(c, question, system=SYSTEM):
    """A streamed greedy chat turn: (time to first token, cached_tokens)."""
    start = time.monotonic()
    first = None
    cached = None
    stream = c.chat.completions.create(
        model="", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - start
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return (first if first is not None else time.monotonic() - start), cached


def prefix_hits(http):
    req = urllib.request.Request(f"http://{http}/metrics", headers={"Authorization": f"Bearer {SCRAPE}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("strata_prefix_cache_hits_total "):
            return float(line.split()[1])
    raise AssertionError(f"no strata_prefix_cache_hits_total in /metrics:\n{text}")


class Tenants(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.keys = os.path.join(self.dir.name, "api-keys")
        with open(self.keys, "w") as f:
            f.write(f"alice {KEY_A}\nbob {KEY_B}\n")
        self.scrape = os.path.join(self.dir.name, "scrape")
        with open(self.scrape, "w") as f:
            f.write(SCRAPE + "\n")
        self.proc = None

    def tearDown(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc.stdout.close()
        self.dir.cleanup()

    def test_another_keys_prompt_is_never_a_hit(self):
        self.proc, http = start(self.keys, self.scrape)
        alice, bob = client(http, KEY_A), client(http, KEY_B)
        ask(alice, "Warm up.", system="Be brief.")  # the first request pays for one-time setup
        cold, cached = ask(alice, "What is the capital of France?")
        self.assertEqual(cached, 0)
        hits = prefix_hits(http)
        theirs, cached = ask(bob, "What is the capital of France?")
        self.assertEqual(cached, 0, "Bob read the length of Alice's cached prompt")
        self.assertEqual(prefix_hits(http), hits, "Bob's request copied Alice's entry")
        again, cached = ask(alice, "What is the capital of France?")
        self.assertGreater(cached, 0, "Alice's repeat missed her own cache")
        self.assertEqual(prefix_hits(http), hits + 1)
        print(f"first token: Alice cold {cold:.3f} s, Bob {theirs:.3f} s, Alice cached {again:.3f} s")
        # Bob's first token came no sooner than a cold prefill's (with room for noise), while a
        # hit is several times faster.
        self.assertGreater(theirs, 0.5 * cold, (cold, theirs, again))
        self.assertLess(again, 0.5 * cold, (cold, theirs, again))

    def test_a_shared_cache_serves_every_key(self):
        self.proc, http = start(self.keys, self.scrape, "--share-prefix-cache")
        alice, bob = client(http, KEY_A), client(http, KEY_B)
        _, cached = ask(alice, "What is the capital of Spain?")
        self.assertEqual(cached, 0)
        _, cached = ask(bob, "What is the capital of Spain?")
        self.assertGreater(cached, 0)
        _, cached = ask(alice, "What is the capital of Spain?")
        self.assertGreater(cached, 0)

    def test_keys_fail_closed(self):
        self.proc, http = start(self.keys, self.scrape)
        alice, bob = client(http, KEY_A), client(http, KEY_B)
        for c in (alice, bob):
            c.models.list()
        # Alice's line goes, and a typo comes in beside it: she is out, Bob stays.
        with open(self.keys, "w") as f:
            f.write(f"bob {KEY_B}\ncarol\n")
        time.sleep(2.2)
        with self.assertRaises(openai.AuthenticationError):
            alice.models.list()
        bob.models.list()
        # No file: no key at all, until it is back.
        os.remove(self.keys)
        time.sleep(2.2)
        with self.assertRaises(openai.AuthenticationError):
            bob.models.list()
        with open(self.keys, "w") as f:
            f.write(f"bob {KEY_B}\n")
        time.sleep(2.2)
        bob.models.list()


if __name__ == "__main__":
    unittest.main()
