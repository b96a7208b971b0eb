"""`lmforge agent` and the built-in CodeAct trajectories: the loop with a scripted policy (what it sends, runs,
keeps and stops on), through a real tiny model directory in-process, and through an OpenAI-compatible
endpoint (a stub server that checks what the agent sends); the trajectories' outputs are real and only the
assistant turns are trained on."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_engine import tokenizer  # noqa: F401  (a fixture)
from test_generate import model_dir  # noqa: F401  (a fixture: a saved tiny model with that tokenizer)

from lmforge.agent import find_action, run_agent
from lmforge.cli import main as lmforge
from lmforge.data.arithmetic import is_held_out
from lmforge.data.codeact import BoxProblem, make_problems, trajectory, write_codeact
from lmforge.data.sft import tokenize_conversation
from lmforge.sandbox import SandboxConfig
from lmforge.sandbox_session import CellResult, PythonSession
from lmforge.tokenizer import Tokenizer


def scripted(replies: list[str]):
    """A policy that answers with the given replies in turn, and records the conversations it was shown."""
    seen = []

    def policy(messages):
        seen.append([dict(m) for m in messages])
        return {"role": "assistant", "content": replies[len(seen) - 1]}

    return policy, seen


def test_the_action_is_the_first_code_block_or_python_tool_call():
    assert find_action({"content": "Let me compute.\n```python\nprint(1)\n```\nIt prints 1."}).code == "print(1)\n"
    hermes = '<tool_call>\n{"name": "python", "arguments": {"code": "print(2)"}}\n</tool_call>'
    assert find_action({"content": hermes + "\n```python\nprint(1)\n```"}).code == "print(2)"
    assert find_action({"content": "```python\nprint(1)\n```\n" + hermes}).code == "print(1)\n"
    call = {"id": "call_7", "type": "function", "function": {"name": "python", "arguments": '{"code": "x = 3"}'}}
    broken = {"id": "call_6", "type": "function", "function": {"name": "python", "arguments": '{"code": '}}
    action = find_action({"content": "", "tool_calls": [broken, call]})
    assert (action.code, action.call) == ("x = 3", call)
    for final in ("The answer is 42.\n#### 42", "<tool_call>{not json}</tool_call> #### 1",
                  '<tool_call>{"name": "search", "arguments": {"code": "x"}}</tool_call>', "```\nplain fence\n```"):
        assert find_action({"content": final}) is None


def test_the_loop_runs_code_keeps_state_and_stops_at_the_final_answer():
    policy, seen = scripted(["```python\nx = 12345 * 6789\n```\nThis prints 999.",  # an imagined output
                             "```python\nprint(x + 1)\n```", "The product plus one is 83810206.\n#### 83810206"])
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        result = run_agent(policy, "What is 12345 * 6789 + 1?", session, max_steps=5, system=None)
    assert (result.answer, result.steps, result.finished) == ("83810206", 2, True)
    roles = [m["role"] for m in result.messages]
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert result.messages[1]["content"] == "```python\nx = 12345 * 6789\n```"  # the imagined output is dropped
    assert result.messages[2]["content"] == "[no output]" and result.messages[4]["content"] == "83810206"
    assert seen[2] == result.messages[:5]  # the model saw the real output before answering


def test_errors_come_back_and_the_step_limit_stops_the_loop():
    policy, _ = scripted(["```python\nprint(undefined)\n```"] * 3)
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        result = run_agent(policy, "Loop forever.", session, max_steps=2, system="Be brief.")
    assert (result.steps, result.finished, result.answer) == (2, False, None)
    assert result.messages[0] == {"role": "system", "content": "Be brief."}
    assert result.messages[3]["content"].endswith("NameError: name 'undefined' is not defined")
    assert len(result.messages) == 7  # system, user, 2 x (action, output), the last reply unrun


def test_an_observation_says_what_the_sandbox_did_and_keeps_both_ends():
    lost = CellResult(-9, "partial\n", "", timed_out=True, reason="timeout", seconds=2.0, state_lost=True)
    assert lost.observation() == ("partial\n[timed out after 2 s]\n"
                                  "[the interpreter was restarted: variables from earlier steps are gone]")
    long = CellResult(1, "a" * 5000, "Traceback ...\nValueError: bad\n").observation(300)
    assert len(long) < 360 and long.startswith("a" * 200) and long.endswith("ValueError: bad")


def test_codeact_trajectories_hold_real_output_and_split_like_the_tasks(tmp_path):
    problems = make_problems(30, held_out=False, seed=1)
    assert len({p.question for p in problems}) == 30 and not any(is_held_out(p.question) for p in problems)
    assert all(is_held_out(p.question) for p in make_problems(5, held_out=True, seed=1))
    assert max(len(p.ops) for p in problems) == 3 and min(p.boxes for p in problems) >= 12
    problem = BoxProblem("Ava", "marbles", 347, 28, [("buy", 15, 64), ("give", 1205), ("split", 3)])
    assert problem.answer == (347 * 28 + 15 * 64 - 1205) // 3
    assert problem.solution.endswith(f"#### {problem.answer}")

    class Recording(PythonSession):  # the outputs come from running the code, not from the generator
        cells = []

        def run(self, code):
            self.cells.append(code)
            return super().run(code)

    with Recording(SandboxConfig(timeout=5.0)) as session:
        messages = trajectory(problem, session)
    assert Recording.cells == [problem.code] and messages[3] == {"role": "tool", "content": str(problem.answer)}
    assert messages[4]["content"].endswith(f"#### {problem.answer}")
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        session.run("print = lambda *a: None")  # a session that lies makes generation fail, not lie
        with pytest.raises(RuntimeError, match="expected"):
            trajectory(problem, session)

    paths = write_codeact(tmp_path, train=12, test=4, seed=0)
    rows = [json.loads(line) for line in paths["codeact_sft"].read_text().splitlines()]
    tests = [json.loads(line) for line in paths["codeact_test"].read_text().splitlines()]
    assert len(rows) == 12 and len(tests) == 4
    assert not {r["messages"][1]["content"] for r in rows} & {t["question"] for t in tests}


def test_only_the_assistant_turns_of_a_trajectory_are_trained_on(model_dir):  # noqa: F811
    tokenizer = Tokenizer.from_dir(model_dir)  # noqa: F811  (its chat template, as saved)
    problem = BoxProblem("Ben", "coins", 123, 45, [("give", 100)])
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        messages = trajectory(problem, session)
    sample, truncated = tokenize_conversation(tokenizer, messages, max_len=4096)
    trained = tokenizer.decode([t for t in sample.labels if t >= 0])
    assert not truncated and "5435" in trained  # the final answer
    assert "coins = 123 * 45" in trained and "How many" not in trained and "Solve the problem" not in trained
    assert "<tool_response>" not in trained and trained.count("5435") == 2  # not the tool's, only the answer's


def test_the_command_runs_a_real_model_directory_in_process(model_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "trajectories.jsonl"
    assert lmforge(["agent", "--model", str(model_dir), "--prompt", "What is 2 + 3?", "--max-steps", "1",
                    "--max-tokens", "12", "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["question"] == "What is 2 + 3?" and record["messages"][1]["content"] == "What is 2 + 3?"
    assert record["messages"][-1]["role"] == "assistant" and record["messages"][-1]["content"]  # a reply came
    assert "--- model" in capsys.readouterr().out
    assert lmforge(["agent", "--model", str(model_dir), "--prompt", "x", "--data", "q.jsonl"]) == 1
    assert "give one of --prompt" in capsys.readouterr().err


class StubEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions answering scripted messages in turn; records each request's body and key."""

    replies: list[dict] = []
    requests: list[tuple[dict, str]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubEndpoint.requests.append((body, self.headers.get("Authorization")))
        reply = StubEndpoint.replies[len(StubEndpoint.requests) - 1]
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": reply, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_the_command_drives_an_openai_compatible_endpoint(tmp_path, capsys):
    call = {"id": "call_1", "type": "function", "function": {"name": "python", "arguments": '{"code": "n = 2**20"}'}}
    StubEndpoint.replies = [{"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "assistant", "content": "```python\nprint(n % 1000)\n```"},
                            {"role": "assistant", "content": "It is 576.\n#### 576"}]
    StubEndpoint.requests = []
    data = tmp_path / "questions.jsonl"
    data.write_text(json.dumps({"question": "2**20 mod 1000?", "answer": "Compute it.\n#### 576"}) + "\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert lmforge(["agent", "--base-url", url, "--model", "remote-model", "--api-key", "sk-test", "--data",
                        str(data), "--out", str(tmp_path / "t.jsonl"), "--quiet"]) == 0
    finally:
        server.shutdown()
    assert "accuracy 1/1 = 1.000" in capsys.readouterr().out
    (first, key), (second, _), (third, _) = StubEndpoint.requests
    assert key == "Bearer sk-test" and first["model"] == "remote-model" and first["temperature"] == 0.0
    assert second["messages"][-2]["tool_calls"] == [call]
    assert second["messages"][-1] == {"role": "tool", "content": "[no output]", "tool_call_id": "call_1"}
    assert third["messages"][-1] == {"role": "user", "content": "<tool_response>\n576\n</tool_response>"}
    record = json.loads((tmp_path / "t.jsonl").read_text())
    assert (record["correct"], record["steps"], record["messages"][-2]["role"]) == (True, 2, "tool")
