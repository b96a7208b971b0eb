"""The interpreter of a sandbox session (sandbox_session.py), as CodeAct's Jupyter kernel: it runs cells one
after another in one namespace, so variables survive between them. Standard library only: it runs inside
the sandbox as `python -I -c SOURCE COMMANDS RESULTS`, where lmforge is not importable.

The protocol is on two private pipes whose numbers are the arguments (stdin stays /dev/null): a cell's code
arrives on COMMANDS as one frame, and when the cell is done the kernel flushes stdout and stderr and writes
one frame on RESULTS, {"error": the exception's name or null}. A frame is an 8-byte big-endian length, then
that many bytes of UTF-8. What the cell prints goes to stdout and stderr as usual, so no output of the
program can pass for a result frame. As in Jupyter, the value of a last expression is printed (its repr).

Between cells the kernel kills the processes the cell started (all of its process group but itself), so a
fork bomb's children do not outlive their cell; a process that left the group lives until the session ends.
When the session closes, the kernel's group is killed (by the keeper, below) wherever it is stuck.
"""

import ast
import contextlib
import json
import os
import select
import signal
import sys
import traceback


def read_frame(fd: int) -> bytes | None:
    """One frame from `fd`, or None at its end."""
    header = _read_exactly(fd, 8)
    return None if header is None else _read_exactly(fd, int.from_bytes(header, "big"))


def write_frame(fd: int, payload: bytes) -> None:
    data = len(payload).to_bytes(8, "big") + payload
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd: int, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def run_cell(code: str, namespace: dict, kernel: int) -> str | None:
    """Run `code` in `namespace`, printing a last expression's value; returns the name of the exception it
    raised (its traceback, without this function's frame, printed to stderr), or None. A child the cell
    forked that comes back here (its pid is not `kernel`) flushes what it printed and exits instead."""
    error = None
    try:
        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            if value is not None:
                print(repr(value))
    except BaseException as raised:  # SystemExit and KeyboardInterrupt too: the session goes on, as Jupyter's
        error = raised
    if os.getpid() != kernel:
        _flush()
        os._exit(0 if error is None else 1)
    if error is None:
        return None
    traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    return type(error).__name__


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # the cell closed it, or a limit refused the write
            stream.flush()


def main(commands: int, results: int) -> None:
    for fd in (commands, results):
        os.set_inheritable(fd, False)  # a program the cell runs does not get the protocol's pipes
    kernel = os.getpid()
    os.setpgid(0, 0)  # the cells' processes are in this group, killed after each cell
    keeper = _keeper(kernel, commands)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    while (frame := read_frame(commands)) is not None:
        error = run_cell(frame.decode("utf-8", "replace"), namespace, kernel)
        _flush()
        _kill_cell_processes(kernel, keeper)
        write_frame(results, json.dumps({"error": error}).encode())


def _keeper(kernel: int, commands: int) -> int:
    """An idle process in a process group of its own, for the kernel to stand in while it kills its own
    group (a group's id is its leader's pid, so the kernel can leave its group and come back). It also ends
    the kernel's group when the session closes its end of COMMANDS (or dies): where no pid namespace takes
    every process with it (`rlimits`), a kernel stuck in a cell would outlive the sandbox's launcher. It
    exits when the kernel does (the end of a pipe only the kernel's side holds)."""
    alive_read, alive_write = os.pipe()
    keeper = os.fork()
    if keeper == 0:
        os.close(alive_write)
        os.setpgid(0, 0)
        watch = select.poll()
        watch.register(alive_read, select.POLLIN)
        watch.register(commands, 0)  # no events asked: poll returns at a hang-up, the session's end closed
        watch.poll()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kernel, signal.SIGKILL)
        os._exit(0)
    os.close(alive_read)
    os.setpgid(keeper, keeper)  # in both processes, so it is done whichever runs first
    return keeper


def _kill_cell_processes(kernel: int, keeper: int) -> None:
    """SIGKILL what is left in the kernel's process group (the cell's children and theirs) and reap the
    kernel's own children among them (zombies count against the process limit)."""
    os.setpgid(0, keeper)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(kernel, signal.SIGKILL)
    while True:
        try:
            os.waitpid(-kernel, 0)
        except ChildProcessError:
            break
    os.setpgid(0, 0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
