"""The OpenAI-compatible HTTP API, driven by the official `openai` client against a real
`strata serve` (two worker processes and a coordinator) on loopback ports.

Checks: completions and streamed chat completions give the same greedy text as `strata generate`
(and `strata generate --chat`); logprobs (chat and completions, streamed and not) equal `strata
generate --json`'s; `n` gives n choices, streamed and not; penalties and logit_bias reach the sampler
as `strata generate`'s flags do; the next turn of a chat reports the prompt tokens the prefix cache
gave it; a wrong key, and the cluster's token, get 401 in OpenAI's error
shape; `/metrics` takes only its scrape token, parses with prometheus_client's OpenMetrics parser
and its counters move by exactly what one request did, under the key's name.

Run: STRATA_BIN=target/release/strata python3 cli/tests/python/openai_api.py (cargo test runs it: cli/tests/openai_api.rs)
"""

import json
import os
import subprocess
import sys
import tempfile
import unittest
import urllib.request

import openai
from prometheus_client.openmetrics.parser import text_string_to_metric_families

STRATA = os.environ.get("STRATA_BIN", "target/release/strata")
TOKEN = "openai-api-test-token-0123456789abcdef"  # the cluster's, between nodes
API_KEY = "openai-api-client-key-0123456789abcdef"  # the client's
SCRAPE_TOKEN = "openai-api-scrape-token-0123456789"
PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 24


def start_server(scrape_token_file):
    env = dict(os.environ, STRATA_AUTH_TOKEN=TOKEN, STRATA_API_KEY=API_KEY, RUST_LOG="warn")
    proc = subprocess.Popen(
        [STRATA, "serve", "--local", "2", "--listen", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--threads", "1", "--announce",
         "--metrics-token-file", scrape_token_file],
        stdout=subprocess.PIPE, env=env, text=True)
    line = proc.stdout.readline()
    if not line.startswith("STRATA_LISTENING "):
        proc.kill()
        raise RuntimeError(f"strata serve did not start: {line!r}")
    grpc, http = line.split()[1:3]
    return proc, grpc, http


def strata_generate_json(grpc, prompt, chat=False, extra=()):
    """`strata generate --json` for `prompt` (greedy unless `extra` says otherwise), from the
    same coordinator over gRPC."""
    args = [STRATA, "generate", "--coordinator", f"http://{grpc}", "--prompt", prompt,
            "--max-tokens", str(MAX_TOKENS), "--temperature", "0", "--json", *extra]
    if chat:
        args.append("--chat")
    out = subprocess.run(args, check=True, capture_output=True, text=True,
                         env=dict(os.environ, STRATA_API_KEY=API_KEY)).stdout
    return json.loads(out)


def strata_generate(grpc, prompt, chat=False):
    """`strata generate`'s greedy text for `prompt`."""
    return strata_generate_json(grpc, prompt, chat)["text"]


def scrape(http, token=SCRAPE_TOKEN):
    request = urllib.request.Request(f"http://{http}/metrics",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class OpenAiApiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.scratch = tempfile.TemporaryDirectory()
        scrape_file = os.path.join(cls.scratch.name, "scrape-token")
        with open(scrape_file, "w") as f:
            f.write(SCRAPE_TOKEN + "\n")
        cls.proc, cls.grpc, cls.http = start_server(scrape_file)
        cls.client = openai.OpenAI(base_url=f"http://{cls.http}/v1", api_key=API_KEY)
        cls.model = cls.client.models.list().data[0].id

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=30)
        cls.scratch.cleanup()

    def test_completion_matches_strata_generate(self):
        r = self.client.completions.create(model=self.model, prompt=PROMPT,
                                           max_tokens=MAX_TOKENS, temperature=0)
        expected = strata_generate(self.grpc, PROMPT)
        self.assertTrue(expected, "strata generate produced no text")
        self.assertEqual(r.choices[0].text, expected)
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.usage.completion_tokens, MAX_TOKENS)

    def test_streamed_chat_matches_strata_generate_chat(self):
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True})
        pieces, finish, usage, roles = [], None, None, []
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.role:
                    roles.append(choice.delta.role)
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
        text = "".join(pieces)
        self.assertGreater(len(pieces), 1, "the reply came in one piece: not streamed")
        self.assertEqual(roles, ["assistant"])
        self.assertEqual(text, strata_generate(self.grpc, QUESTION, chat=True))
        self.assertIn(finish, ("stop", "length"))
        self.assertIsNotNone(usage)
        self.assertGreater(usage.prompt_tokens, 10, "the chat template was not applied")
        whole = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=MAX_TOKENS, temperature=0)
        self.assertEqual(whole.choices[0].message.content, text)
        self.assertEqual(whole.choices[0].message.role, "assistant")

    def test_chat_logprobs_match_strata_generate(self):
        # The first run parks the prompt's caches; both compared runs then start on them alike (a
        # run that starts on a copy computes its last positions in another shape than a cold one,
        # which rounds differently).
        strata_generate_json(self.grpc, QUESTION, chat=True)
        expected = strata_generate_json(self.grpc, QUESTION, chat=True)
        r = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=5)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), len(expected["logprobs"]))
        for got, want, want_top in zip(content, expected["logprobs"], expected["top_logprobs"]):
            self.assertAlmostEqual(got.logprob, want, places=5)
            self.assertEqual(len(got.top_logprobs), 5)
            for alt, w in zip(got.top_logprobs, want_top):
                self.assertAlmostEqual(alt.logprob, w["logprob"], places=5)
            # Greedy: the chosen token is the most likely one.
            self.assertEqual(got.token, got.top_logprobs[0].token)
            self.assertEqual(bytes(got.bytes).decode("utf-8", "replace"), got.token)
        self.assertEqual("".join(t.token for t in content), r.choices[0].message.content)
        # Streamed, every token's logprobs arrive with its chunk.
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        streamed = [t for chunk in stream for c in chunk.choices if c.logprobs
                    for t in c.logprobs.content]
        self.assertEqual([t.token for t in streamed], [t.token for t in content])
        for s, c in zip(streamed, content):
            self.assertAlmostEqual(s.logprob, c.logprob, places=6)
            self.assertEqual(len(s.top_logprobs), 2)

    def test_completion_logprobs_match_strata_generate(self):
        expected = strata_generate_json(self.grpc, PROMPT)
        r = self.client.completions.create(model=self.model, prompt=PROMPT,
                                           max_tokens=MAX_TOKENS, temperature=0, logprobs=3)
        lp = r.choices[0].logprobs
        self.assertEqual(len(lp.token_logprobs), MAX_TOKENS)
        for got, want in zip(lp.token_logprobs, expected["logprobs"]):
            self.assertAlmostEqual(got, want, places=5)
        self.assertTrue(all(len(top) >= 1 for top in lp.top_logprobs))
        self.assertEqual(lp.text_offset[0], 0)
        self.assertEqual("".join(lp.tokens), r.choices[0].text)

    def test_n_gives_n_choices(self):
        r = self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=8,
                                           temperature=1.0, seed=7, n=3)
        self.assertEqual([c.index for c in r.choices], [0, 1, 2])
        # The three choices' tokens together (each at most 8).
        self.assertGreaterEqual(r.usage.completion_tokens, 3)
        self.assertLessEqual(r.usage.completion_tokens, 24)
        # Choice i is seeded seed + i: choice 0 is the same request with n = 1.
        one = self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=8,
                                             temperature=1.0, seed=7)
        self.assertEqual(one.choices[0].text, r.choices[0].text)
        self.assertGreater(len({c.text for c in r.choices}), 1, "three draws, one text")
        # Streamed: each choice's chunks carry its index and add up to the same texts.
        stream = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8, temperature=1.0, seed=7, n=3, stream=True)
        texts, finishes = ["", "", ""], [None, None, None]
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finishes[c.index] = c.finish_reason or finishes[c.index]
        whole = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8, temperature=1.0, seed=7, n=3)
        self.assertEqual(texts, [c.message.content for c in whole.choices])
        self.assertTrue(all(finishes), finishes)

    def test_the_next_chat_turn_reports_its_cached_prompt_tokens(self):
        system = ("You answer questions about a small mountain village of four hundred people, "
                  "with one school, two bakeries and a railway station on the line to the city.")
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": "How many people live there?"}]
        first = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=16, temperature=0)
        self.assertEqual(first.usage.prompt_tokens_details.cached_tokens, 0)
        messages += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Is there a station?"}]
        second = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=16, temperature=0)
        cached = second.usage.prompt_tokens_details.cached_tokens
        # The first turn's prompt is copied; its answer and the new question are computed.
        self.assertGreaterEqual(cached, first.usage.prompt_tokens - 2)
        self.assertLess(cached, second.usage.prompt_tokens)
        # Streamed, with usage: the same turn again, the same answer, more of it cached.
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, usage = "", None
        for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.delta.content or "" for c in chunk.choices)
        self.assertEqual(text, second.choices[0].message.content)
        self.assertEqual(usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens - 2)

    def test_penalties_and_bias_reach_the_sampler(self):
        plain = strata_generate_json(self.grpc, PROMPT)
        cases = [
            ({"presence_penalty": 1.5}, ["--presence-penalty", "1.5"]),
            ({"frequency_penalty": 1.0}, ["--frequency-penalty", "1"]),
            ({"extra_body": {"repetition_penalty": 1.5}}, ["--repetition-penalty", "1.5"]),
            ({"logit_bias": {str(plain["token_ids"][0]): -100}},
             ["--logit-bias", f"{plain['token_ids'][0]}=-100"]),
        ]
        for options, flags in cases:
            with self.subTest(options=options):
                r = self.client.completions.create(model=self.model, prompt=PROMPT,
                                                   max_tokens=MAX_TOKENS, temperature=0, **options)
                want = strata_generate_json(self.grpc, PROMPT, extra=flags)
                self.assertEqual(r.choices[0].text, want["text"])
                self.assertNotEqual(want["token_ids"], plain["token_ids"],
                                    f"{flags} changed nothing")
        banned = plain["token_ids"][0]
        r = strata_generate_json(self.grpc, PROMPT, extra=["--logit-bias", f"{banned}=-100"])
        self.assertNotEqual(r["token_ids"][0], banned)
        # Penalties on repeats make the greedy text repeat less.
        rep = strata_generate_json(self.grpc, PROMPT, extra=["--frequency-penalty", "2"])
        self.assertGreaterEqual(len(set(rep["token_ids"])), len(set(plain["token_ids"])))

    def test_wrong_key_gets_401_in_openai_shape(self):
        bad = openai.OpenAI(base_url=f"http://{self.http}/v1", api_key="not-the-token-at-all")
        with self.assertRaises(openai.AuthenticationError) as caught:
            bad.completions.create(model=self.model, prompt=PROMPT, max_tokens=4)
        self.assertEqual(caught.exception.status_code, 401)
        body = caught.exception.body
        self.assertEqual(body["type"], "invalid_request_error")
        self.assertEqual(body["message"], "unknown API key")
        # The cluster's token is no client's key.
        member = openai.OpenAI(base_url=f"http://{self.http}/v1", api_key=TOKEN)
        with self.assertRaises(openai.AuthenticationError):
            member.completions.create(model=self.model, prompt=PROMPT, max_tokens=4)
        # /metrics takes its scrape token only: neither a wrong one nor a client's key.
        for token in ("wrong-token-wrong-token", API_KEY, TOKEN):
            with self.assertRaises(urllib.error.HTTPError) as scraped:
                scrape(self.http, token=token)
            self.assertEqual(scraped.exception.code, 401)

    def test_bad_requests_get_400_in_openai_shape(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=4,
                                           temperature=-1)
        self.assertIn("temperature", caught.exception.body["message"])
        with self.assertRaises(openai.NotFoundError) as caught:
            self.client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
        self.assertEqual(caught.exception.body["code"], "model_not_found")
        for options, name in [
            ({"n": 0}, "n"), ({"n": 17}, "n"), ({"presence_penalty": 3}, "presence_penalty"),
            ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"999999": 1}}, "logit_bias"),
            ({"logprobs": 21}, "logprobs"),
        ]:
            with self.subTest(options=options):
                with self.assertRaises(openai.BadRequestError) as caught:
                    self.client.completions.create(model=self.model, prompt=PROMPT,
                                                   max_tokens=4, **options)
                self.assertIn(name, caught.exception.body["message"])
        with self.assertRaises(openai.BadRequestError) as caught:
            self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": QUESTION}],
                max_tokens=4, top_logprobs=3)
        self.assertIn("top_logprobs needs logprobs", caught.exception.body["message"])

    def test_metrics_move_by_one_request(self):
        before = scrape(self.http)
        r = self.client.completions.create(model=self.model, prompt=PROMPT,
                                           max_tokens=MAX_TOKENS, temperature=0)
        after = scrape(self.http)

        def delta(name, **labels):
            return sample(after, name, **labels) - sample(before, name, **labels)

        n = r.usage.completion_tokens
        self.assertEqual(
            delta("strata_requests_total", api="openai", key="env", outcome="length"), 1)
        self.assertEqual(delta("strata_generated_tokens_total"), n)
        self.assertEqual(delta("strata_prompt_tokens_total"), r.usage.prompt_tokens)
        self.assertEqual(delta("strata_time_to_first_token_seconds_count"), 1)
        self.assertEqual(delta("strata_inter_token_latency_seconds_count"), n - 1)
        self.assertEqual(delta("strata_request_duration_seconds_count"), 1)
        for stage in ("0", "1"):
            # One step per token (the prompt fits one step), each on every stage.
            self.assertEqual(delta("strata_stage_forward_seconds_count", stage=stage), n)
            self.assertEqual(delta("strata_stage_hop_seconds_count", stage=stage), n)
            self.assertGreater(delta("strata_stage_forward_seconds_sum", stage=stage), 0)
        ups = [k for k in after if k[0] == "strata_worker_up"]
        self.assertEqual(len(ups), 2)
        self.assertTrue(all(after[k] == 1 for k in ups))
        self.assertEqual(sample(after, "strata_active_sequences"), 0)
        self.assertEqual(sample(after, "strata_queue_depth"), 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
