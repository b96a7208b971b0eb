"""Run untrusted Python (a model's code) in a separate, fresh interpreter, with limits and, where the OS
allows, namespaces that keep it off the network, off the file system and away from other processes.

`run_python(code)` writes the code to `main.py` in a private temporary directory (deleted after) and runs
`python -I main.py` there with no stdin, an environment of PATH, LANG, HOME=TMPDIR=that directory and
one-thread settings for BLAS/OpenMP (they count against the process limit), and a wall-clock timeout after
which every process it started is killed. stdout and stderr are read up to `max_output_bytes` each; a
program that writes more is killed, so its output never fills our memory. `SandboxResult.protections`
names what was in force.

Three levels of isolation, the strongest that works here chosen once per process ("auto"):

| isolation         | where                              | adds to the limits below                         |
|-------------------|------------------------------------|--------------------------------------------------|
| `namespaces`      | Linux, as root (CI containers)     | network, pid and mount namespaces; every mount   |
|                   |                                    | read-only but the working directory; a fresh     |
|                   |                                    | unprivileged uid, so RLIMIT_NPROC holds and no   |
|                   |                                    | process outside can be signalled                 |
| `user-namespace`  | Linux with unprivileged user       | network and pid namespaces (the uid stays yours, |
|                   | namespaces (most distributions)    | so file permissions are yours; RLIMIT_NPROC      |
|                   |                                    | counts this namespace's processes when not root, |
|                   |                                    | on Linux >= 5.14)                                |
| `rlimits`         | anywhere else (macOS)              | nothing: the limits below and a process group    |

At `namespaces` the program can read what any user may read, and write only its working directory: the
mounts are remounted read-only in its own mount namespace (nothing propagates back), and a directory others
may not enter on the way to the interpreter (root's 0700 home holding a pyenv Python) is covered by an empty
tmpfs into which only the interpreter's directory is bind-mounted. At `rlimits` it can do whatever our uid
can: write our files, reach the network, signal our processes by pid; a child that calls setsid() escapes
the kill at the timeout. Use it only for code you would run anyway.

Limits, in every level: the wall-clock timeout (SIGKILL to the process group, and with a pid namespace to
its init, which takes every process inside with it), RLIMIT_CPU (SIGXCPU, then SIGKILL a second later),
RLIMIT_AS (Linux only; macOS ignores it; per process, so the total is up to max_processes times it),
RLIMIT_FSIZE, RLIMIT_NOFILE, no core files, and the output cap. RLIMIT_NPROC only where noted: the kernel
exempts root from it, so without namespaces root's fork bomb is stopped only by the timeout.

Processes: our Python -> launcher (`python -I -S sandbox.py SPEC`, which creates the namespaces) -> init
(pid 1 of the pid namespace: mounts, drops to the uid, sets the limits, reaps orphans, reports the
program's exit status) -> the program. The program's parent is never our process, so killing its parent
cannot kill us. Setup errors come back on a pipe of their own and raise SandboxError; the program's own
output cannot forge them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import resource
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

ISOLATIONS = ("namespaces", "user-namespace", "rlimits")
SETUP_FAILED = 125  # the launcher's exit code when it or init could not set up (the message is on the error pipe)
# The unprivileged uids (and gids) of the `namespaces` level: this base plus the launcher's pid, so every
# live sandbox has its own uid and RLIMIT_NPROC counts its processes alone. No account has such ids.
UID_BASE = 2_000_000_000
# linux/sched.h and linux/mount.h
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG = 1


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not an error of the program it runs)."""


@dataclass(frozen=True)
class SandboxConfig:
    timeout: float = 10.0  # wall-clock seconds for the whole run
    cpu_seconds: int = 10  # per process (RLIMIT_CPU)
    memory_bytes: int = 512 << 20  # address space per process (RLIMIT_AS); Python itself takes ~30 MB
    file_bytes: int = 16 << 20  # the largest file it may write (RLIMIT_FSIZE)
    max_processes: int = 32  # processes and threads (RLIMIT_NPROC), where enforced
    max_open_files: int = 256
    max_output_bytes: int = 256 << 10  # per stream; more kills the program
    isolation: str = "auto"  # "auto" (the strongest that works here) or one of ISOLATIONS

    def __post_init__(self):
        if self.isolation != "auto" and self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation={self.isolation!r}: must be 'auto' or one of {', '.join(ISOLATIONS)}")
        for name in ("timeout", "cpu_seconds", "memory_bytes", "file_bytes", "max_processes", "max_open_files",
                     "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")


@dataclass
class SandboxResult:
    returncode: int | None  # negative: killed by that signal (subprocess's convention)
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False  # output went past max_output_bytes (the text says where it was cut)
    reason: str | None = None  # why it stopped early: timeout, cpu, memory, file size, output limit; None if not
    isolation: str = "rlimits"
    protections: tuple[str, ...] = field(default_factory=tuple)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.truncated


def run_python(code: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `code` as `main.py` in a fresh interpreter in the sandbox (see the module's docstring)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as workdir:
        path = os.path.join(workdir, "main.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        os.chmod(path, 0o644)  # whatever our umask: the sandbox's uid reads it, and may not change it
        return run_command([sys.executable, "-I", "main.py"], workdir, config)


def run_command(argv: list[str], workdir: str, config: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run `argv` (argv[0] an absolute path) in the sandbox with `workdir` as its writable working directory
    (at the `namespaces` level it is chowned to the sandbox's uid; the files in it stay ours)."""
    isolation = choose_isolation() if config.isolation == "auto" else config.isolation
    start = time.monotonic()
    proc, errors = start_launcher(argv, workdir, config, isolation)
    try:
        out, err, timed_out, truncated = _collect(proc, config)
    finally:
        kill_launcher(proc)
        setup_error = read_and_close(errors)
    if setup_error:
        raise SandboxError(f"sandbox ({isolation}): {setup_error.strip()}")
    stdout, stderr = (output_text(b, config.max_output_bytes) for b in (out, err))
    reason = stop_reason(proc.returncode, stderr, timed_out, truncated)
    return SandboxResult(proc.returncode, stdout, stderr, timed_out, truncated, reason, isolation,
                         protections(isolation), time.monotonic() - start)


def protections(isolation: str) -> tuple[str, ...]:
    """What a run at this isolation level enforces on this OS (see the table in the module's docstring)."""
    names = ["timeout", "cpu time", "file size", "open files", "output size"]
    if sys.platform.startswith("linux"):
        names.append("memory")
    if isolation == "namespaces":
        names += ["processes", "network", "pid namespace", "read-only filesystem", "unprivileged uid"]
    elif isolation == "user-namespace":
        names += ["network", "pid namespace"] + (["processes"] if os.geteuid() != 0 else [])
    return tuple(names)


@functools.cache
def choose_isolation() -> str:
    """The strongest isolation level that runs a program here (probed once per process): `namespaces` needs
    root (or CAP_SYS_ADMIN) and mounts it may change; `user-namespace` needs unprivileged user namespaces."""
    candidates = ISOLATIONS if sys.platform.startswith("linux") else ISOLATIONS[-1:]
    if os.geteuid() != 0:
        candidates = tuple(c for c in candidates if c != "namespaces")
    for isolation in candidates[:-1]:
        try:
            if run_python("print('ok')", SandboxConfig(isolation=isolation)).stdout == "ok\n":
                return isolation
        except SandboxError:
            pass
    return candidates[-1]


# -- our side: start the launcher, read its output, kill it ---------------------------------------------


def start_launcher(argv: list[str], workdir: str, config: SandboxConfig, isolation: str,
                   pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, int]:
    """Start the launcher in a session of its own; returns it and the read end of its setup-error pipe.
    `pass_fds` reach the program open, with their numbers (sandbox_session.py's private pipes)."""
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
                   "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    spec = {"argv": argv, "workdir": os.path.realpath(workdir), "isolation": isolation, "limits": asdict(config),
            "expose": sorted({os.path.realpath(p) for p in (argv[0], sys.base_prefix, sys.prefix)})}
    errors_read, errors_write = os.pipe()
    try:
        spec["error_fd"] = errors_write  # pass_fds keeps its number in the launcher
        proc = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(spec)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(errors_write, *pass_fds), env=environment, cwd=workdir,
                                start_new_session=True)
    except BaseException:
        os.close(errors_read)
        raise
    finally:
        os.close(errors_write)
    return proc, errors_read


def _collect(proc: subprocess.Popen, config: SandboxConfig) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close, the timeout, or one passes the cap (keeping cap + 1 bytes
    of it, so the caller can tell). Returns (stdout, stderr, timed_out, truncated)."""
    deadline = time.monotonic() + config.timeout
    cap = config.max_output_bytes
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), True, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                buffer = buffers[key.fd]
                buffer += chunk[:cap + 1 - len(buffer)]
                if len(buffer) > cap:
                    return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), False, True
    return bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()]), False, False


def kill_launcher(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (launcher, init, the program unless it left the group; with a
    pid namespace, init's death kills the rest) and reap the launcher. The launcher is not reaped before
    this, so its pid, which is the group's id, cannot have been reused."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def read_and_close(fd: int) -> str:
    """What is in the setup-error pipe now (its writers are dead or will never write), and close it."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 1 << 16):
            data += chunk
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return data.decode("utf-8", "replace")


def output_text(data: bytes, cap: int) -> str:
    text = data[:cap].decode("utf-8", "replace")
    return text + f"\n[output truncated at {cap} bytes]" if len(data) > cap else text


def stop_reason(returncode: int | None, stderr: str, timed_out: bool, truncated: bool) -> str | None:
    """Why the program stopped early, from how it ended: the limits kill with SIGXCPU / SIGXFSZ, and Python
    turns a failed allocation into MemoryError and an oversized write into OSError 'File too large'."""
    last_line = stderr.rstrip().rsplit("\n", 1)[-1]
    if timed_out:
        return "timeout"
    if truncated:
        return "output limit"
    if returncode == -signal.SIGXCPU:
        return "cpu"
    if returncode == -signal.SIGXFSZ or "File too large" in last_line:
        return "file size"
    if last_line.startswith("MemoryError"):
        return "memory"
    return None


# -- the launcher and init (run as `python -I -S sandbox.py SPEC`; standard library only) -------------------


def _launch(spec: dict) -> None:
    """The launcher: create the namespaces, fork init, wait for the program's status and end as it did."""
    errors = spec["error_fd"]
    try:
        if spec["isolation"] == "namespaces":
            _unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID)
        elif spec["isolation"] == "user-namespace":
            own_uid, own_gid = os.geteuid(), os.getegid()  # mapped to themselves: the program stays us
            _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{own_uid} {own_uid} 1"),
                               ("gid_map", f"{own_gid} {own_gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        status_read, status_write = os.pipe()
        uid = UID_BASE + os.getpid()
        init = os.fork()
    except OSError as e:
        _fail(errors, f"launcher: {e}")
    if init == 0:
        os.close(status_read)
        _init(spec, uid, status_write)
    os.close(status_write)
    os.close(errors)
    report = b""
    while chunk := os.read(status_read, 64):
        report += chunk
    _, init_status = os.waitpid(init, 0)
    _end_like(int(report) if report else init_status)


def _init(spec: dict, uid: int, status_write: int) -> None:
    """Init: private file system, unprivileged `uid`, limits; then fork the program and reap until it ends."""
    errors = spec["error_fd"]
    try:
        namespaces = spec["isolation"] == "namespaces"
        if namespaces:
            _private_filesystem(spec["workdir"], spec["expose"])
        os.chdir(spec["workdir"])  # after the mounts: the writable directory is the bind mount
        if namespaces:
            os.chown(spec["workdir"], uid, uid)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        if spec["isolation"] != "rlimits":  # a pid namespace's init: die with the launcher, and all with it
            _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # RLIMIT_NPROC binds a uid that is not root; in a user namespace it counts that namespace's processes
        _set_limits(spec["limits"], nproc=spec["isolation"] != "rlimits" and os.geteuid() != 0)
        program = os.fork()
    except OSError as e:
        _fail(errors, f"init: {e}")
    if program == 0:
        os.close(status_write)
        for number in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores them; the program starts as usual
            signal.signal(number, signal.SIG_DFL)
        os.set_inheritable(errors, False)  # closed by a successful exec: errors after it are the program's
        try:
            os.execve(spec["argv"][0], spec["argv"], os.environ)
        except OSError as e:
            _fail(errors, f"cannot run {spec['argv'][0]}: {e}")
    os.close(errors)
    while True:  # as pid 1, orphans are reparented to us: reap them too
        pid, status = os.wait()
        if pid == program:
            os.write(status_write, str(status).encode())
            os._exit(0)


def _private_filesystem(workdir: str, expose: list[str]) -> None:
    """In the new mount namespace (as root): nothing propagates back to the host; /proc of the new pid
    namespace; the interpreter reachable by any uid; every mount read-only except a bind of `workdir`."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _expose(expose)
    _mount(workdir, workdir, None, MS_BIND | MS_REC)
    with open("/proc/self/mountinfo") as f:
        mount_points = [_unescape(line.split()[4]) for line in f]
    for mount_point in mount_points:
        if mount_point == workdir or mount_point.startswith(workdir + "/"):
            continue
        try:
            flags = os.statvfs(mount_point).f_flag
        except OSError:  # under a mount that covers it (the old /proc's): nothing can reach it
            continue
        kept = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
        kept |= MS_RELATIME if flags & os.ST_RELATIME else 0
        try:
            _mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError as e:
            if e.errno != errno.EINVAL:  # the path is no longer a mount point (covered by a later mount)
                raise


def _expose(paths: list[str]) -> None:
    """Make each path reachable by any uid in this mount namespace: a directory on the way that others may
    not enter (root's 0700 home holding a pyenv Python) is covered by an empty tmpfs, into which the
    entries on the way are bind-mounted back (the rest of it stays hidden)."""
    while True:
        blocked: dict[str, set[str]] = {}
        for path in paths:
            parts = path.split("/")[1:]
            for i in range(len(parts)):  # every ancestor, the path's own parent included
                parent = "/" + "/".join(parts[:i])
                if not os.path.isdir(parent):  # a path that does not exist: running it fails by name later
                    break
                if not os.stat(parent).st_mode & stat.S_IXOTH:
                    blocked.setdefault(parent, set()).add(parts[i])
                    break
        if not blocked:
            return
        for parent, names in blocked.items():
            kept = {name: os.open(os.path.join(parent, name), os.O_PATH) for name in names}
            _mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k")
            for name, fd in kept.items():
                entry = os.path.join(parent, name)
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    os.mkdir(entry)
                else:
                    open(entry, "x").close()
                _mount(f"/proc/self/fd/{fd}", entry, None, MS_BIND | MS_REC)
                os.close(fd)


def _set_limits(limits: dict, nproc: bool) -> None:
    cpu = limits["cpu_seconds"]
    wanted = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_FSIZE, limits["file_bytes"]),
              (resource.RLIMIT_NOFILE, limits["max_open_files"]), (resource.RLIMIT_CORE, 0)]
    if sys.platform.startswith("linux"):  # macOS refuses RLIMIT_AS
        wanted.append((resource.RLIMIT_AS, limits["memory_bytes"]))
    if nproc:
        wanted.append((resource.RLIMIT_NPROC, limits["max_processes"]))
    for kind, soft, *hard in wanted:
        resource.setrlimit(kind, (soft, hard[0] if hard else soft))


def _end_like(status: int) -> None:
    """Exit as the program did: with its exit code, or killed by the same signal."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if number not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status))


def _fail(errors: int, message: str) -> None:
    try:
        os.write(errors, message.encode())
    finally:
        os._exit(SETUP_FAILED)


def _unshare(flags: int) -> None:
    if _libc().unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = (lambda s: None if s is None else s.encode())
    if _libc().mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"mount {source} on {target}: {os.strerror(number)}")


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _unescape(path: str) -> str:
    """A path as /proc/self/mountinfo writes it (space, tab, newline, backslash as octal escapes)."""
    for escape, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escape, char)
    return path


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
