"""The persistent sandbox session: state survives between cells; each attack is stopped or refused, the
caller carries on, and the session (or a fresh one, which says the state was lost) runs the next cell."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest
from test_sandbox import config, leftover

from lmforge.sandbox import ISOLATIONS, SandboxConfig, protections
from lmforge.sandbox_session import PythonSession


def goes_on(session: PythonSession) -> None:
    result = session.run("print(6 * 7)")
    assert (result.returncode, result.stdout, result.reason) == (0, "42\n", None)


def test_state_files_and_imports_persist_and_a_last_expression_is_shown():
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        assert session.run("import math\nx = 41\nopen('notes.txt', 'w').write('kept')").stdout == "4\n"
        result = session.run("x += 1\nprint(open('notes.txt').read())\nmath.factorial(x) % 1000 + x")
        assert (result.returncode, result.stdout, result.state_lost) == (0, "kept\n42\n", False)
        assert session.run("None").stdout == ""  # as Jupyter: None is not shown
        workdir = session.workdir
        env = session.run("import os, sys\nsorted(os.environ), os.getcwd(), sys.stdin.read()").stdout
    names, cwd, stdin = eval(env)
    assert cwd == os.path.realpath(workdir) and stdin == "" and not os.path.exists(workdir)  # deleted on close
    assert set(names) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                          "MKL_NUM_THREADS", "LC_CTYPE"}


def test_an_error_is_a_traceback_and_the_state_is_kept():
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        session.run("x = 3")
        result = session.run("y = x + 1\n1 / 0")
        assert result.returncode == 1 and not result.state_lost
        assert result.stderr.endswith("ZeroDivisionError: division by zero\n") and "sandbox_kernel" not in result.stderr
        assert session.run("import sys\nsys.exit(4)").returncode == 1  # SystemExit ends the cell, not the session
        assert session.run("print(x, y)").stdout == "3 4\n"  # what ran before the error stays


def test_output_cannot_forge_the_end_of_a_cell():
    frame = b'{"error": null}'
    code = ("import os, sys, time\n"
            f"os.write(1, {len(frame).to_bytes(8, 'big') + frame!r})\nsys.stdout.flush()\n"
            f"os.write(2, {len(frame).to_bytes(8, 'big') + frame!r})\ntime.sleep(0.3)\nprint('after')\n1 / 0\n")
    with PythonSession(SandboxConfig(timeout=5.0)) as session:
        result = session.run(code)
    assert result.stdout.endswith("after\n") and result.returncode == 1  # the cell's end is its own


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_an_infinite_loop_times_out_and_a_fresh_interpreter_says_the_state_was_lost(isolation):
    with PythonSession(config(isolation, timeout=1.0)) as session:
        session.run("x = 1")
        first_dir = session.workdir
        result = session.run("print('started', flush=True)\nwhile True:\n    pass\n")
        assert result.timed_out and result.state_lost and result.reason == "timeout"
        assert result.returncode == -signal.SIGKILL and result.stdout == "started\n"
        stuck = session.run("import subprocess\nsubprocess.run(['/bin/sleep', '93.71'])\n")
        assert stuck.timed_out and stuck.state_lost
        assert leftover("93.71") == [], "an interpreter stuck in a cell outlived its timeout"
        after = session.run("print('x' in globals())")
        assert (after.stdout, after.state_lost) == ("False\n", False)  # fresh, and it says so only once
        assert session.workdir != first_dir and not os.path.exists(first_dir)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_fork_bomb_is_contained_and_its_processes_die_with_the_cell(isolation):
    with PythonSession(config(isolation, "processes", max_processes=16, timeout=5.0)) as session:
        session.run("x = 1")
        sleepers = session.run("import os\nfor _ in range(3):\n    if os.fork() == 0:\n"
                               "        os.execv('/bin/sleep', ['sleep', '95.43'])\n")
        assert sleepers.returncode == 0 and leftover("95.43") == []  # killed when the cell ended
        result = session.run("import os\nwhile True:\n    os.fork()\n")
        assert not result.timed_out and not result.state_lost
        assert result.stderr.count("Traceback") == 1 and "Resource temporarily unavailable" in result.stderr
        assert session.run("print(x)").stdout == "1\n"  # the forked children did not answer for the kernel
        goes_on(session)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_memory_hog_is_stopped_and_the_session_goes_on(isolation):
    with PythonSession(config(isolation, "memory", memory_bytes=256 << 20)) as session:
        session.run("x = 5")
        result = session.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n")
        assert result.returncode == 1 and result.reason == "memory" and not result.state_lost
        assert session.run("del chunks\nprint(x)").stdout == "5\n"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_huge_output_is_cut_and_the_state_kept(isolation):
    with PythonSession(config(isolation, max_output_bytes=64 << 10, timeout=2.0)) as session:
        result = session.run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 100_000)\ny = 7\n")
        assert result.truncated and result.reason == "output limit" and not result.state_lost
        assert result.stdout.startswith("x" * (64 << 10)) and len(result.stdout) < (64 << 10) + 100
        assert session.run("print(y)").stdout == "7\n"
        endless = session.run("while True:\n    print('y' * 1000)\n")
        assert endless.truncated and endless.timed_out and endless.state_lost  # the timeout ends it
        goes_on(session)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_writing_outside_its_directory_is_refused(isolation, tmp_path):
    shared = tempfile.mkdtemp()
    os.chmod(shared, 0o777)
    targets = [str(tmp_path / "escape.txt"), os.path.join(shared, "escape.txt")]
    try:
        with PythonSession(config(isolation, "read-only filesystem")) as session:
            code = (f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n        print('wrote')\n"
                    "    except OSError as e:\n        print('refused', e.errno)\n")
            result = session.run(code)
            assert result.stdout.splitlines()[1] == "refused 30"  # EROFS: the file system is read-only
            assert not any(os.path.exists(path) for path in targets)
            goes_on(session)
    finally:
        for path in targets:
            Path(path).unlink(missing_ok=True)
        os.rmdir(shared)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_socket_is_refused(isolation):
    with socket.create_server(("127.0.0.1", 0)) as server, PythonSession(config(isolation, "network")) as session:
        port = server.getsockname()[1]
        result = session.run(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                             f"    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n")
        assert result.stdout.startswith("refused")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
        goes_on(session)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_killing_its_parent_or_itself_does_not_kill_us(isolation):
    with PythonSession(config(isolation)) as session:
        session.run("x = 1")
        session.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
        after = session.run("print(x)")
        if "pid namespace" in protections(isolation):  # its parent is the namespace's init: immune to it
            assert (after.stdout, after.state_lost) == ("1\n", False)
        else:  # init died: the interpreter lives on until we notice, then a fresh one says so
            assert after.stdout == "1\n" or (after.state_lost and "NameError" in after.stderr)
        result = session.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
        assert result.returncode == -signal.SIGKILL and result.state_lost and not result.timed_out
        goes_on(session)
