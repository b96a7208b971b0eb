"""The sandbox for untrusted Python: each attack is stopped or refused, our process carries on, and a normal
program runs after it. Attacks whose protection is not in force at a level are skipped (a fork bomb without a
process limit would take the machine down), so each test is parametrized over the levels that run here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from lmforge.sandbox import (
    ISOLATIONS,
    SandboxConfig,
    SandboxError,
    choose_isolation,
    protections,
    run_command,
    run_python,
)


def _runs_here(isolation: str) -> bool:
    try:
        return run_python("print('ok')", SandboxConfig(isolation=isolation)).stdout == "ok\n"
    except SandboxError:
        return False


AVAILABLE = [isolation for isolation in ISOLATIONS if _runs_here(isolation)]


def config(isolation: str, protection: str | None = None, **limits) -> SandboxConfig:
    """A short-timeout config at `isolation`, skipping the test where that level does not run here or does
    not enforce `protection`."""
    if isolation not in AVAILABLE:
        pytest.skip(f"isolation {isolation} does not run here")
    if protection and protection not in protections(isolation):
        pytest.skip(f"isolation {isolation} does not enforce {protection} here")
    return SandboxConfig(isolation=isolation, **{"timeout": 5.0, **limits})


def still_works(cfg: SandboxConfig) -> None:
    result = run_python("print(6 * 7)", cfg)
    assert (result.returncode, result.stdout, result.reason) == (0, "42\n", None)


def leftover(marker: str) -> list[int]:
    """Pids of live processes whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_auto_picks_the_strongest_level_that_runs():
    assert AVAILABLE and AVAILABLE[-1] == "rlimits"
    assert choose_isolation() == AVAILABLE[0]
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        assert "namespaces" in AVAILABLE, "root on Linux should get namespaces; unshare failed here"
    with pytest.raises(ValueError, match="isolation"):
        SandboxConfig(isolation="docker")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_normal_program_gets_its_output_exit_code_and_a_private_directory(isolation):
    code = ("import os, sys\nopen('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read(), os.getcwd())\n"
            "print(sorted(os.environ), repr(sys.stdin.read()), file=sys.stderr)\nsys.exit(3)\n")
    result = run_python(code, config(isolation))
    assert (result.returncode, result.timed_out, result.reason, result.isolation) == (3, False, None, isolation)
    kept, workdir = result.stdout.split()
    assert kept == "kept" and workdir != os.getcwd() and not os.path.exists(workdir)  # deleted after
    env, stdin = result.stderr.rsplit(" ", 1)
    assert stdin.strip() == "''"  # no stdin
    assert set(eval(env)) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                              "MKL_NUM_THREADS", "LC_CTYPE"}  # our environment (tokens, keys) does not leak


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_an_infinite_loop_is_stopped_by_the_timeout_and_the_cpu_limit(isolation):
    cfg = config(isolation, timeout=1.0)
    result = run_python("while True:\n    pass\n", cfg)
    assert result.timed_out and result.reason == "timeout" and result.returncode == -signal.SIGKILL
    assert result.seconds < 4
    result = run_python("while True:\n    pass\n", config(isolation, cpu_seconds=1, timeout=20.0))
    assert (result.returncode, result.reason, result.timed_out) == (-signal.SIGXCPU, "cpu", False)
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_memory_hog_is_stopped(isolation):
    cfg = config(isolation, "memory", memory_bytes=256 << 20)
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n", cfg)
    assert result.returncode == 1 and result.reason == "memory" and "MemoryError" in result.stderr
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_fork_bomb_is_contained(isolation):
    cfg = config(isolation, "processes", max_processes=16, timeout=5.0)
    # First a bounded one (64 at most, should the limit fail), then the real thing only if the limit held
    counting = ("import os\nforks, errno = 0, 0\ntry:\n    while forks < 64:\n        if os.fork() == 0:\n"
                "            os.execv('/bin/sleep', ['sleep', '97.31'])\n        forks += 1\n"
                "except OSError as e:\n    errno = e.errno\nprint(forks, errno)\n")
    result = run_python(counting, cfg)
    forks, errno = map(int, result.stdout.split())
    assert forks < 16 and errno == 11  # EAGAIN at the limit (16 = init, the program and its children)
    assert not result.timed_out and leftover("97.31") == []  # the sleepers died with the pid namespace
    result = run_python("import os\nwhile True:\n    os.fork()\n", cfg)
    assert result.seconds < 6 and "Resource temporarily unavailable" in result.stderr
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_process_that_leaves_the_group_dies_with_the_sandbox(isolation):
    cfg = config(isolation, "pid namespace")
    code = "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '96.17'])\n"
    result = run_python(code, cfg)
    assert result.returncode == 0 and leftover("96.17") == []
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_writing_outside_its_directory_is_refused(isolation, tmp_path):
    cfg = config(isolation, "read-only filesystem")
    shared = tempfile.mkdtemp()  # world-writable, as /tmp is: permissions alone would not stop a stranger
    os.chmod(shared, 0o777)
    shm = f"/dev/shm/lmforge-escape-{os.getpid()}"
    targets = [str(tmp_path / "escape.txt"), os.path.join(shared, "escape.txt"), shm]
    try:
        code = (f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('x')\n"
                f"        print('wrote', path)\n    except OSError as e:\n        print('refused', e.errno)\n")
        result = run_python(code, cfg)
        lines = result.stdout.splitlines()
        assert lines[0].startswith("refused") and lines[1:] == ["refused 30", "refused 30"]  # EROFS: read-only
        assert not any(os.path.exists(path) for path in targets)
    finally:
        shutil.rmtree(shared)
        Path(shm).unlink(missing_ok=True)
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_socket_to_a_local_server_is_refused(isolation):
    cfg = config(isolation, "network")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                f"    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)\n")
        result = run_python(code, cfg)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody came
    assert result.stdout.startswith("refused")
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_huge_output_is_cut_and_the_program_killed(isolation):
    cfg = config(isolation, max_output_bytes=64 << 10)
    result = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 100_000)\n", cfg)
    assert result.truncated and result.reason == "output limit" and not result.timed_out
    assert result.stdout.startswith("x" * (64 << 10))
    assert result.stdout.endswith(f"[output truncated at {64 << 10} bytes]")
    assert len(result.stdout) < (64 << 10) + 100 and result.seconds < 3
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_too_large_file_is_refused(isolation):
    cfg = config(isolation, file_bytes=1 << 20)
    result = run_python("open('big', 'wb').write(b'x' * (2 << 20))\n", cfg)
    assert result.returncode == 1 and result.reason == "file size"
    still_works(cfg)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_killing_its_parent_or_us_does_not_kill_us(isolation):
    cfg = config(isolation)
    result = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('alive')\n", cfg)
    assert result.returncode is not None  # it ran; we are still here to see it
    if "pid namespace" in protections(isolation):  # our pid means nothing inside it
        result = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n", cfg)
        assert "ProcessLookupError" in result.stderr
    still_works(cfg)


def test_a_setup_failure_raises_rather_than_passing_for_the_programs_result(tmp_path):
    with pytest.raises(SandboxError, match="cannot run /nonexistent/python"):
        run_command(["/nonexistent/python"], str(tmp_path), SandboxConfig(timeout=5.0))
    fake = run_python("import sys\nprint('cannot run', file=sys.stderr)\nsys.exit(125)\n", SandboxConfig(timeout=5.0))
    assert fake.returncode == 125  # the program's own words are only its result
