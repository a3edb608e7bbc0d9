"""`strata serve --model qwen2.5-coder-1.5b` through the official `openai` client: a chat request
rendered with the model's own ChatML template (from its GGUF metadata) asks for a Python function,
and the code in the reply parses as Python and defines it.

Run: STRATA_BIN=target/release/strata python3 cli/tests/python/openai_qwen_chat.py
(cargo test runs it: cli/tests/families.rs)
"""

import ast
import os
import re
import subprocess
import sys
import unittest

import openai

STRATA = os.environ.get("STRATA_BIN", "target/release/strata")
TOKEN = "openai-qwen-test-token-0123456789abcdef"


class QwenChat(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
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
        cls.proc.terminate()
        cls.proc.wait(timeout=30)

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


if __name__ == "__main__":
    unittest.main(verbosity=2)
