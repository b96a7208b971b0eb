"""`lmforge serve --agent true`'s sandbox routes (infer/agent_api.py): a step runs the reply's code in the
conversation's own interpreter (its variables kept), an answer runs nothing, the API key guards the routes, the
sessions are bounded, and a server without --agent refuses them."""

from __future__ import annotations

import httpx
import pytest
from test_server import LiveServer, build_model_dir

from lmforge.infer.agent_api import AgentSettings
from lmforge.infer.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = Engine.from_pretrained(build_model_dir(tmp_path_factory.mktemp("agent-api")), max_batch_size=2)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def served(engine):
    servers = []

    def serve(**options) -> LiveServer:
        servers.append(LiveServer.start(engine, **options))
        return servers[-1]

    yield serve
    for server in servers:
        server.close()
        sessions = server.server.config.app.state.agent_sessions
        if sessions is not None:
            sessions.close_all()


def step(server, session: str, reply: str, key: str | None = None) -> httpx.Response:
    return httpx.post(server.url + "/v1/agent/step", json={"session": session, "reply": reply}, timeout=60,
                      headers={"Authorization": f"Bearer {key}"} if key else {})


def test_steps_run_in_the_conversations_interpreter(served):
    server = served(agent=AgentSettings(max_steps=4))
    info = httpx.get(server.url + "/v1/agent").json()
    assert info["enabled"] and info["max_steps"] == 4 and "#### " in info["system_prompt"]
    first = step(server, "a", "I will set it.\n```python\nx = 6 * 7\nprint('set')\n```\nimagined output").json()
    assert first == {"content": "I will set it.\n```python\nx = 6 * 7\nprint('set')\n```",
                     "code": "x = 6 * 7\nprint('set')\n", "observation": "set", "state_lost": False}
    assert step(server, "a", "```python\nprint(x + 1)\n```").json()["observation"] == "43"  # x survived
    other = step(server, "b", "```python\nprint(x)\n```").json()  # another conversation: its own interpreter
    assert "NameError" in other["observation"]
    answer = step(server, "a", "It is 42.\n#### 42").json()
    assert answer == {"content": "It is 42.\n#### 42", "code": None}
    assert httpx.delete(server.url + "/v1/agent/session/a").json() == {"closed": True}
    assert httpx.delete(server.url + "/v1/agent/session/a").json() == {"closed": False}


def test_sessions_are_bounded(served):
    server = served(agent=AgentSettings(max_sessions=1))
    step(server, "a", "```python\nx = 1\n```")
    step(server, "b", "```python\ny = 2\n```")  # the one session slot goes to b; a's interpreter is closed
    again = step(server, "a", "```python\nprint(x)\n```").json()
    assert "NameError" in again["observation"]


def test_the_api_key_guards_the_sandbox_and_a_plain_server_has_none(served):
    locked = served(api_key="sekret", agent=AgentSettings())
    assert step(locked, "a", "```python\nprint(1)\n```").status_code == 401
    assert step(locked, "a", "```python\nprint(1)\n```", key="sekret").json()["observation"] == "1"
    plain = served()
    assert httpx.get(plain.url + "/v1/agent").json() == {"enabled": False}
    refused = step(plain, "a", "```python\nprint(1)\n```")
    assert refused.status_code == 404 and "--agent true" in refused.json()["error"]["message"]
    bad = step(locked, "", "x", key="sekret")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session"
