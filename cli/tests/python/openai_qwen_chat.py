"""`strata serve --model qwen2.5-coder-1.5b` through the official `openai` client: a chat request
rendered with the model's own ChatML template (from its GGUF metadata) asks for a Python function,
and the code in the reply parses as Python and defines it. Tool calls make the round trip (the model
asks for `get_weather`, a `tool` message answers, the model uses the answer), streamed and not, and
`tool_choice` forces a call; `response_format` with a JSON Schema gives output that validates on 10
different prompts.

Run: STRATA_BIN=target/release/strata python3 cli/tests/python/openai_qwen_chat.py
(cargo test runs it: cli/tests/families.rs)
"""

import ast
import json
import os
import re
import subprocess
import sys
import unittest

import jsonschema
import openai

STRATA = os.environ.get("STRATA_BIN", "target/release/strata")
TOKEN = "openai-qwen-test-token-0123456789abcdef"


class QwenChat(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if getattr(cls, "proc", None) is not None:
            return
        env = dict(os.environ, STRATA_API_KEY=TOKEN, RUST_LOG="warn")
        cls.proc = subprocess.Popen(
            [STRATA, "serve", "--model", "qwen2.5-coder-1.5b", "--local", "2",
             "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--announce", "--no-warmup"],
            stdout=subprocess.PIPE, env=env, text=True)
        line = cls.proc.stdout.readline()
        if not line.startswith("STRATA_LISTENING "):
            cls.proc.kill()
            raise RuntimeError(f"strata serve did not start: {line!r}")
        http = line.split()[2]
        cls.client = openai.OpenAI(base_url=f"http://{http}/v1", api_key=TOKEN, timeout=600)

    @classmethod
    def tearDownClass(cls):
        # QwenTools runs on the same server; the module's teardown stops it.
        pass

    def test_a_python_function_comes_back_as_python(self):
        model = self.client.models.list().data[0].id
        reply = self.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content":
                       "Write a Python function `is_prime(n)` that returns whether n is prime. "
                       "Reply with the code only."}],
            temperature=0, max_tokens=200)
        text = reply.choices[0].message.content
        self.assertEqual(reply.choices[0].finish_reason, "stop", text)
        # The reply is code, fenced or not.
        fenced = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
        code = fenced.group(1) if fenced else text
        tree = ast.parse(code)
        names = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        self.assertIn("is_prime", names, code)
        # The function it wrote works.
        scope = {}
        exec(compile(tree, "<reply>", "exec"), scope)
        self.assertEqual([n for n in range(20) if scope["is_prime"](n)], [2, 3, 5, 7, 11, 13, 17, 19], code)
        print(f"reply ({reply.usage.completion_tokens} tokens):\n{text}", file=sys.stderr)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
QUESTION = {"role": "user", "content": "What is the weather in Paris right now?"}
ANSWER = json.dumps({"city": "Paris", "temperature_celsius": 18, "sky": "sunny"})


def streamed(stream):
    """A streamed reply gathered as the openai client's users do: content, and tool calls built up
    from their deltas by index."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


class QwenTools(unittest.TestCase):
    client = None

    @classmethod
    def setUpClass(cls):
        cls.client = QwenChat.client
        cls.model = cls.client.models.list().data[0].id

    def ask(self, messages, **kw):
        return self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=0, **{"max_tokens": 120, **kw})

    def check_call(self, name, arguments):
        self.assertEqual(name, "get_weather")
        self.assertEqual(json.loads(arguments)["city"], "Paris")

    def follow_up(self, call_id, arguments):
        return [QUESTION,
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function",
                     "function": {"name": "get_weather", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": call_id, "content": ANSWER}]

    def test_a_tool_call_round_trip(self):
        reply = self.ask([QUESTION], tools=[WEATHER])
        choice = reply.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls", choice.message)
        [call] = choice.message.tool_calls
        self.check_call(call.function.name, call.function.arguments)
        self.assertTrue(call.id.startswith("call_"), call.id)
        # Offered the tool again, this 1.5B model calls it again; `tool_choice: none` (the tools
        # still sent, as clients send them) asks for the answer.
        final = self.ask(self.follow_up(call.id, call.function.arguments), tools=[WEATHER],
                         tool_choice="none")
        text = final.choices[0].message.content
        self.assertEqual(final.choices[0].finish_reason, "stop", text)
        self.assertFalse(final.choices[0].message.tool_calls)
        self.assertIn("18", text)
        print(f"tool round trip: {call.function.arguments} -> {text!r}", file=sys.stderr)

    def test_a_streamed_tool_call_round_trip(self):
        content, calls, reason = streamed(self.ask([QUESTION], tools=[WEATHER], stream=True))
        self.assertEqual(reason, "tool_calls", content)
        self.assertEqual(content.strip(), "")
        [call] = calls
        self.check_call(call["name"], call["arguments"])
        content, calls, reason = streamed(self.ask(
            self.follow_up(call["id"], call["arguments"]), tools=[WEATHER], tool_choice="none",
            stream=True))
        self.assertEqual((reason, calls), ("stop", []), content)
        self.assertIn("18", content)

    def test_tool_choice_forces_a_call_and_none_forbids_one(self):
        unrelated = [{"role": "user", "content": "Paris. Say hello to me."}]
        forced = self.ask(unrelated, tools=[WEATHER],
                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
        [call] = forced.choices[0].message.tool_calls
        self.assertEqual(call.function.name, "get_weather")
        self.assertIsInstance(json.loads(call.function.arguments)["city"], str)
        plain = self.ask([QUESTION], tools=[WEATHER], tool_choice="none", max_tokens=40)
        self.assertFalse(plain.choices[0].message.tool_calls)
        self.assertTrue(plain.choices[0].message.content)
        with self.assertRaises(openai.BadRequestError) as e:
            self.ask([QUESTION], tools=[WEATHER],
                     tool_choice={"type": "function", "function": {"name": "nope"}})
        self.assertIn("not among the tools", str(e.exception))

    def test_json_schema_output_validates_on_ten_prompts(self):
        schema = {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "country": {"type": "string"},
                "population_millions": {"type": "number"},
                "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            },
            "required": ["name", "country", "population_millions", "landmarks"],
            "additionalProperties": False,
        }
        cities = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Hanoi", "Quito",
                  "Lisbon", "Seoul"]
        for city in cities:
            reply = self.ask(
                [{"role": "user", "content": f"Describe {city} briefly."}], max_tokens=150,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "city", "schema": schema}})
            text = reply.choices[0].message.content
            self.assertEqual(reply.choices[0].finish_reason, "stop", text)
            value = json.loads(text)
            jsonschema.validate(value, schema)
            self.assertEqual(value["name"].split(",")[0], city, text)
        reply = self.ask([{"role": "user", "content": "List two colors."}], max_tokens=60,
                         response_format={"type": "json_object"})
        self.assertIsInstance(json.loads(reply.choices[0].message.content), dict)


def setUpModule():
    QwenChat.setUpClass()


def tearDownModule():
    QwenChat.proc.terminate()
    QwenChat.proc.wait(timeout=30)


if __name__ == "__main__":
    unittest.main(verbosity=2)
