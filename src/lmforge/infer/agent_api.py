"""The web chat's agent mode (`lmforge serve --agent true`): the sandbox behind two routes, so the page can run
the CodeAct loop of `lmforge agent` (agent.py) over the server's own chat API.

    GET    /v1/agent                     {"enabled", "system_prompt", "max_steps"}: what the page needs
    POST   /v1/agent/step                {"session", "reply"} -> {"content", "code", "observation", "state_lost"}
                                         or {"content": reply, "code": null}: the reply is the answer
    DELETE /v1/agent/session/{session}   the conversation's interpreter ends (New chat)

A step finds the reply's action as `lmforge agent` does (agent.find_action: a ```python block or a `python`
tool call), cuts the reply after it (`content`, what the conversation keeps), and runs the code as the next cell
of the conversation's PythonSession (sandbox_session.py: its variables survive between steps); the page shows the
code and its output, adds the tool message and asks the model again, up to `max_steps` actions.

The routes are under /v1, so `--api-key` guards them as it guards the model: whoever can use the model can
run code in the sandbox. Sessions are bounded: at most `max_sessions` interpreters (the one idle longest is
closed for a new one, its next step says the state was lost), each closed after `idle_seconds` without a step;
a step runs in a worker thread, so a cell that runs to its timeout holds up no other request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request

from lmforge.agent import find_action
from lmforge.data.codeact import SYSTEM_PROMPT
from lmforge.infer.openai_api import APIError, Schema, parse_request
from lmforge.sandbox import SandboxConfig
from lmforge.sandbox_session import PythonSession


class StepRequest(Schema):
    session: str
    reply: str


@dataclass
class AgentSettings:
    max_steps: int = 5
    max_sessions: int = 8
    idle_seconds: float = 600.0
    max_observation_chars: int = 2000
    cell_timeout: float = 10.0


class Sessions:
    """The conversations' interpreters, by the id the page chose (at most max_sessions, idle ones closed). A
    session runs one cell at a time (its lock): two steps of one conversation sent together run in turn."""

    def __init__(self, settings: AgentSettings):
        self.settings = settings
        self.sessions: dict[str, tuple[PythonSession, threading.Lock, float]] = {}
        self.lock = threading.Lock()

    def take(self, key: str) -> tuple[PythonSession, threading.Lock]:
        now = time.monotonic()
        with self.lock:
            stale = [k for k, (*_, used) in self.sessions.items() if now - used > self.settings.idle_seconds]
            if key not in self.sessions and len(self.sessions) - len(stale) >= self.settings.max_sessions:
                stale.append(min(self.sessions, key=lambda k: self.sessions[k][2]))
            closing = [self.sessions.pop(k) for k in set(stale) if k != key]
            session, lock, _ = self.sessions.get(key) or (
                PythonSession(SandboxConfig(timeout=self.settings.cell_timeout)), threading.Lock(), now)
            self.sessions[key] = (session, lock, now)
        for old, old_lock, _ in closing:
            with old_lock:  # after its running cell, if any
                old.close()
        return session, lock

    def close(self, key: str) -> bool:
        with self.lock:
            entry = self.sessions.pop(key, None)
        if entry is not None:
            with entry[1]:
                entry[0].close()
        return entry is not None

    def close_all(self) -> None:
        for key in list(self.sessions):
            self.close(key)

    def step(self, req: StepRequest) -> dict:
        action = find_action({"content": req.reply})
        if action is None:
            return {"content": req.reply, "code": None}
        session, lock = self.take(req.session)
        with lock:
            result = session.run(action.code)
        return {"content": req.reply[:action.end], "code": action.code, "state_lost": result.state_lost,
                "observation": result.observation(self.settings.max_observation_chars)}


def add_agent_routes(app: FastAPI, settings: AgentSettings | None) -> Sessions | None:
    """The routes of the module's docstring; without settings, GET /v1/agent says the mode is off."""
    sessions = Sessions(settings) if settings is not None else None

    @app.get("/v1/agent")
    async def agent_info():
        if settings is None:
            return {"enabled": False}
        return {"enabled": True, "system_prompt": SYSTEM_PROMPT, "max_steps": settings.max_steps}

    @app.post("/v1/agent/step")
    async def agent_step(http_request: Request):
        if sessions is None:
            raise APIError(404, "The agent is off: start the server with --agent true.", code="not_found")
        req = parse_request(StepRequest, await http_request.body())
        if not 1 <= len(req.session) <= 64:
            raise APIError(400, "Invalid 'session': 1 to 64 characters.", "session", "invalid_value")
        return await asyncio.to_thread(sessions.step, req)

    @app.delete("/v1/agent/session/{key}")
    async def agent_close(key: str):
        if sessions is None:
            raise APIError(404, "The agent is off: start the server with --agent true.", code="not_found")
        closed = await asyncio.to_thread(sessions.close, key)
        return {"closed": closed}

    return sessions
