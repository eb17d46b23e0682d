"""Run untrusted Python (model-written HumanEval solutions + their tests) in a fenced subprocess.

First line of defence, enforced by the OS on the child:
  - a fresh interpreter (`python -I`: no user site, no PYTHON* variables), stdin closed
  - its own session / process group, SIGKILLed as a whole on timeout and after it exits
  - rlimits: address space (memory), CPU seconds, file size, process count, no core dumps
  - a scrubbed environment (no secrets inherited) and a fresh temp dir as cwd, deleted afterwards
  - stdout/stderr capped: past the cap the process group is killed
Second line, inside the child before the code runs: process-spawning, signalling, exiting and
destructive filesystem functions are replaced (os.system, os.fork, subprocess, os.kill, os._exit,
shutil.rmtree, os.remove/unlink/rmdir/rename/chmod and writes via open() outside the temp dir, ...).
A program that calls sys.exit() before the end counts as failed, so exiting early cannot pass tests.

This is a guard against buggy and careless code, not a security boundary: there is no network or
syscall isolation (ctypes can reach libc). Run it as an unprivileged user on a machine you own.

    result = execute("assert 1 + 1 == 2", timeout=5)
    result.success  # True
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

DONE_MARK = b"picochat-sandbox-done"

# Runs inside the child: argv = [-c, <done fd>, <sandbox dir>]. Installs the guards, runs
# solution.py, and writes DONE_MARK to the done fd only if the program ran to its end.
_RUNNER = r'''
import builtins, io, os, shutil, signal, subprocess, sys

DONE_FD, ROOT = int(sys.argv[1]), os.path.realpath(sys.argv[2])
_write = os.write
_exit = os._exit


def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else ".")
    except (TypeError, ValueError):
        return False
    return p == ROOT or p.startswith(ROOT + os.sep)


def _refuse(name):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refused


def _inside_only(name, fn, nargs=1):
    def guarded(*args, **kwargs):
        if not all(_inside(a) for a in args[:nargs]):
            raise PermissionError(f"{name} outside the sandbox directory is disabled")
        return fn(*args, **kwargs)
    return guarded


_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+") and not isinstance(file, int) and not _inside(file):
        raise PermissionError("writing outside the sandbox directory is disabled")
    return _open(file, mode, *args, **kwargs)


_os_open = os.open
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & _WRITE_FLAGS and not _inside(path):
        raise PermissionError("writing outside the sandbox directory is disabled")
    return _os_open(path, flags, *args, **kwargs)


builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "chown", "lchown", "mkfifo", "mknod"):
    if hasattr(os, _name):
        setattr(os, _name, _inside_only("os." + _name, getattr(os, _name)))
for _name in ("rename", "renames", "replace", "link", "symlink"):
    setattr(os, _name, _inside_only("os." + _name, getattr(os, _name), nargs=2))
shutil.rmtree = _inside_only("shutil.rmtree", shutil.rmtree)
shutil.move = _inside_only("shutil.move", shutil.move, nargs=2)
for _name in ("system", "popen", "fork", "forkpty", "vfork", "kill", "killpg", "setsid", "setpgid", "setpgrp",
              "chdir", "fchdir", "chroot", "_exit", "abort", "putenv", "unsetenv", "posix_spawn", "posix_spawnp",
              "execl", "execle", "execlp", "execlpe", "execv", "execve", "execvp", "execvpe",
              "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
              "register_at_fork", "setuid", "setgid", "setresuid", "setresgid", "plock"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse("os." + _name))
for _name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, _name, _refuse("subprocess." + _name))
try:
    import _posixsubprocess
    _posixsubprocess.fork_exec = _refuse("_posixsubprocess.fork_exec")
except ImportError:
    pass
signal.pthread_kill = _refuse("signal.pthread_kill")
shutil.chown = _refuse("shutil.chown")

_source = _open(os.path.join(ROOT, "solution.py"), encoding="utf-8").read()
try:
    exec(compile(_source, "solution.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except SystemExit as e:
    sys.stderr.write(f"\nSystemExit({e.code!r}): the program exited before its end\n")
    sys.stderr.flush()
    _exit(3)
_write(DONE_FD, b"picochat-sandbox-done")
'''


@dataclass
class ExecResult:
    success: bool  # ran to its end with exit status 0, within every limit
    stdout: str
    stderr: str
    timeout: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    returncode: int | None = None


def _limits(memory_bytes: int, cpu_seconds: int, max_file_bytes: int, max_processes: int):
    """preexec_fn for the child: rlimits that hold even if every in-process guard is bypassed."""
    def apply() -> None:
        for limit, value in (
            (resource.RLIMIT_AS, memory_bytes),
            (resource.RLIMIT_DATA, memory_bytes),
            (resource.RLIMIT_CPU, cpu_seconds),
            (resource.RLIMIT_FSIZE, max_file_bytes),
            (resource.RLIMIT_NPROC, max_processes),
            (resource.RLIMIT_CORE, 0),
        ):
            try:
                resource.setrlimit(limit, (value, value))
            except (ValueError, OSError):
                pass  # e.g. RLIMIT_NPROC above the hard limit; the other limits still apply
    return apply


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reader(stream, sink: bytearray, cap: int, over_cap: threading.Event) -> None:
    """Copy a pipe into `sink` up to `cap` bytes; past the cap, flag it and stop reading."""
    while True:
        chunk = stream.read1(1 << 16)
        if not chunk:
            return
        room = cap - len(sink)
        sink.extend(chunk[: max(room, 0)])
        if len(chunk) > room:
            over_cap.set()
            return


def _remove_tree(path: Path) -> None:
    """rmtree that also copes with files or folders the program made read-only."""
    def make_writable_and_retry(func, p, _exc):
        os.chmod(p, 0o700)
        parent = os.path.dirname(p)
        os.chmod(parent, 0o700)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)


def execute(code: str, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1 << 20,
            max_file_mb: int = 16, max_processes: int = 64) -> ExecResult:
    """Run `code` in a fenced subprocess; never raises for anything the code does."""
    root = Path(tempfile.mkdtemp(prefix="picochat-sandbox-"))
    (root / "solution.py").write_text(code, encoding="utf-8")
    done_read, done_write = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(root),
           "TMPDIR": str(root), "PYTHONIOENCODING": "utf-8"}
    stdout, stderr = bytearray(), bytearray()
    over_cap = threading.Event()
    timed_out = False
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", _RUNNER, str(done_write), str(root)],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(done_write,), start_new_session=True, close_fds=True,
            # Only setrlimit calls run between fork and exec (no imports or locks), so threads are safe.
            preexec_fn=_limits(memory_mb << 20, max(1, math.ceil(timeout)) + 1, max_file_mb << 20,  # noqa: PLW1509
                               max_processes),
        )
        os.close(done_write)
        done_write = -1
        readers = [threading.Thread(target=_reader, args=(s, buf, max_output_bytes, over_cap), daemon=True)
                   for s, buf in ((proc.stdout, stdout), (proc.stderr, stderr))]
        for t in readers:
            t.start()
        deadline_hit = not _wait(proc, timeout, over_cap)
        timed_out = deadline_hit and not over_cap.is_set()
        # Kill the whole group: the program on timeout / too much output, and any children it left.
        _kill_group(proc.pid)
        proc.wait()
        for t in readers:
            t.join(timeout=2.0)
        proc.stdout.close()
        proc.stderr.close()
        os.set_blocking(done_read, False)
        try:
            finished = os.read(done_read, len(DONE_MARK)) == DONE_MARK
        except BlockingIOError:
            finished = False
    finally:
        os.close(done_read)
        if done_write >= 0:
            os.close(done_write)
        _remove_tree(root)
    out, err = stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")
    memory_exceeded = "MemoryError" in err
    success = (finished and proc.returncode == 0 and not timed_out and not over_cap.is_set()
               and not memory_exceeded)
    return ExecResult(success=success, stdout=out, stderr=err, timeout=timed_out, memory_exceeded=memory_exceeded,
                      output_truncated=over_cap.is_set(), returncode=proc.returncode)


def _wait(proc: subprocess.Popen, timeout: float, over_cap: threading.Event) -> bool:
    """True if the process exited by itself within `timeout` (checking the output cap meanwhile)."""
    step = 0.02
    waited = 0.0
    while waited < timeout:
        if over_cap.is_set():
            return False
        try:
            proc.wait(timeout=step)
            return True
        except subprocess.TimeoutExpired:
            waited += step
            step = min(step * 2, 0.2)
    return False
