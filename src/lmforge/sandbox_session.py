"""A persistent Python interpreter in the sandbox, one per conversation, as CodeAct's Jupyter kernel: each
`run(code)` is a cell in the same interpreter, so variables, imports and files survive between steps.

    with PythonSession(SandboxConfig(timeout=10)) as session:
        session.run("x = 6 * 7")
        session.run("print(x)").stdout      # '42\\n'

The interpreter (sandbox_kernel.py) runs under sandbox.py's launcher and init, so a session gets the same
isolation level and limits as `run_python`, for its whole life: namespaces (no network, a read-only file
system but its private working directory, an unprivileged uid, a pid namespace), memory, processes, file
size and open files, a scrubbed environment, no stdin. Per cell:
- `timeout` is the cell's wall clock: past it the whole sandbox is killed, and a fresh interpreter (in a
  fresh directory) runs the next cell; the result says `state_lost`. So does a cell that kills the
  interpreter (os._exit, a signal, its init at the `rlimits` level).
- `max_output_bytes` caps each stream's text in the result; the rest of the cell's output is read and
  dropped, so a long print costs the text, not the state (an endless one ends at the timeout).
- the processes a cell starts are killed when it ends (the kernel's process group).
`cpu_seconds` (RLIMIT_CPU) counts the interpreter's CPU time over its life, not per cell.

A cell's code goes to the kernel and its end comes back on two private pipes, never on stdout or stderr, so
nothing the program prints can pass for the end of a cell or its result. Code in the interpreter can of
course write to those pipes itself; it can then lie only about its own cell.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge.sandbox import (
    SandboxConfig,
    SandboxError,
    SandboxResult,
    choose_isolation,
    kill_launcher,
    output_text,
    protections,
    read_and_close,
    start_launcher,
    stop_reason,
)

KERNEL_SOURCE = (Path(__file__).parent / "sandbox_kernel.py").read_text(encoding="utf-8")
POLL_SECONDS = 0.05  # how often a cell checks that the interpreter is still alive while it waits
STOP_SECONDS = 2.0  # how long a stop waits for the interpreter to be gone (killed: it is at once, unloaded)


@dataclass
class CellResult(SandboxResult):
    """A cell's result: returncode 0 (it ran), 1 (it raised: the traceback is in stderr), or how the
    interpreter ended when it died; `state_lost` when the next cell runs in a fresh interpreter."""

    state_lost: bool = False

    def observation(self, max_chars: int = 2000) -> str:
        """What a model reads after its code ran (agent.py): stdout, stderr, and what the sandbox did, cut to
        max_chars (the head and the tail kept: a traceback's last line is what matters)."""
        parts = [text.rstrip("\n") for text in (self.stdout, self.stderr) if text.strip()]
        if self.timed_out:
            parts.append(f"[timed out after {self.seconds:.0f} s]")
        elif self.reason and self.reason not in ("memory", "file size"):  # those two show their traceback
            parts.append(f"[stopped: {self.reason}]")
        if self.state_lost:
            parts.append("[the interpreter was restarted: variables from earlier steps are gone]")
        text = "\n".join(parts) or "[no output]"
        if len(text) > max_chars:
            head = max_chars * 2 // 3
            tail = text[len(text) - (max_chars - head):]
            text = f"{text[:head]}\n[... {len(text) - max_chars} characters cut ...]\n{tail}"
        return text


class PythonSession:
    """One persistent interpreter in the sandbox (see the module's docstring). Started on the first cell;
    `close()` (or leaving the `with` block) kills it and deletes its directory."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config = config or SandboxConfig()
        self.isolation = choose_isolation() if config.isolation == "auto" else config.isolation
        self._proc = None
        self.workdir: str | None = None

    def __enter__(self) -> PythonSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, code: str) -> CellResult:
        """Run one cell; its stdout and stderr (each cut at max_output_bytes), and how it ended."""
        lost_before = self._proc is not None and self._proc.poll() is not None  # died between cells
        if lost_before:
            self._stop()
        if self._proc is None:
            self._start()
        start = time.monotonic()
        out, err, error, timed_out, truncated = self._exchange(code.encode("utf-8", "replace"))
        state_lost = error is None or lost_before
        if error is None:  # the interpreter died or overran: kill what is left, a fresh one runs the next cell
            returncode = self._stop()
        else:
            returncode = 0 if error["error"] is None else 1
        stdout, stderr = (output_text(data, self.config.max_output_bytes) for data in (out, err))
        reason = stop_reason(returncode, stderr, timed_out, truncated)
        return CellResult(returncode, stdout, stderr, timed_out, truncated, reason, self.isolation,
                          protections(self.isolation), time.monotonic() - start, state_lost)

    def close(self) -> None:
        if self._proc is not None:
            self._stop()

    def _start(self) -> None:
        self.workdir = tempfile.mkdtemp(prefix="lmforge-session-")
        command_read, self._commands = os.pipe()
        self._results, result_write = os.pipe()
        argv = [sys.executable, "-I", "-c", KERNEL_SOURCE, str(command_read), str(result_write)]
        try:
            self._proc, self._errors = start_launcher(argv, self.workdir, self.config, self.isolation,
                                                      pass_fds=(command_read, result_write))
        except BaseException:
            for fd in (self._commands, self._results):
                os.close(fd)
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        finally:
            os.close(command_read)
            os.close(result_write)
        for fd in (self._commands, self._proc.stdout.fileno(), self._proc.stderr.fileno(), self._results):
            os.set_blocking(fd, False)

    def _exchange(self, code: bytes) -> tuple[bytes, bytes, dict | None, bool, bool]:
        """Send a cell and read its output until the kernel's result frame, the timeout, or the end of the
        interpreter. Returns (stdout, stderr, the result frame or None, timed_out, truncated)."""
        deadline = time.monotonic() + self.config.timeout
        cap = self.config.max_output_bytes
        pending = len(code).to_bytes(8, "big") + code
        frame = bytearray()
        streams = {self._proc.stdout.fileno(): bytearray(), self._proc.stderr.fileno(): bytearray()}
        truncated = False
        with selectors.DefaultSelector() as selector:
            selector.register(self._commands, selectors.EVENT_WRITE)
            selector.register(self._results, selectors.EVENT_READ)
            for fd in streams:
                selector.register(fd, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    out, err, more = self._drain(streams, cap)
                    return out, err, None, True, truncated or more
                for key, _ in selector.select(min(remaining, POLL_SECONDS)):
                    if key.fd == self._commands:
                        with contextlib.suppress(BlockingIOError, BrokenPipeError):
                            pending = pending[os.write(key.fd, pending):]
                        if not pending:
                            selector.unregister(key.fd)
                        continue
                    chunk = _read_some(key.fd)
                    if chunk == b"":  # its end: every writer is gone
                        selector.unregister(key.fd)
                    elif key.fd == self._results:
                        frame += chunk or b""
                    elif chunk:
                        truncated |= _append(streams[key.fd], chunk, cap)
                if len(frame) >= 8 and len(frame) >= 8 + int.from_bytes(frame[:8], "big"):
                    out, err, more = self._drain(streams, cap)
                    return out, err, json.loads(frame[8:].decode()), False, truncated or more
                if self._proc.poll() is not None:  # the interpreter (or its init) is gone
                    out, err, more = self._drain(streams, cap)
                    return out, err, None, False, truncated or more

    def _drain(self, streams: dict[int, bytearray], cap: int) -> tuple[bytes, bytes, bool]:
        """What is already in the output pipes: written before the kernel's frame, so all of the cell's."""
        truncated = False
        for fd, buffer in streams.items():
            while chunk := _read_some(fd):
                truncated |= _append(buffer, chunk, cap)
        out, err = streams.values()
        return bytes(out), bytes(err), truncated

    def _stop(self) -> int | None:
        """Kill the sandbox, close our pipes, delete the directory; returns how the launcher ended (as the
        program did). A setup failure (the error pipe's message) is a SandboxError."""
        proc, self._proc = self._proc, None
        kill_launcher(proc)
        setup_error = read_and_close(self._errors)
        os.close(self._commands)  # the kernel's keeper kills its group at this (the `rlimits` level's cleanup)
        _wait_for_end(self._results, STOP_SECONDS)  # the kernel and its keeper hold it: gone when it ends
        os.close(self._results)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if setup_error:
            raise SandboxError(f"sandbox session ({self.isolation}): {setup_error.strip()}")
        return proc.returncode


def _wait_for_end(fd: int, seconds: float) -> None:
    """Read and drop what `fd` holds until its end (every writer gone), at most `seconds`."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while (remaining := deadline - time.monotonic()) > 0:
            if selector.select(remaining) and _read_some(fd) == b"":
                return


def _read_some(fd: int) -> bytes | None:
    """What a non-blocking pipe holds now: b"" at its end, None when it is empty but open."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None


def _append(buffer: bytearray, chunk: bytes, cap: int) -> bool:
    """Keep up to cap + 1 bytes of a stream (so the text can say it was cut); True when some were dropped."""
    buffer += chunk[:cap + 1 - len(buffer)]
    return len(buffer) > cap
