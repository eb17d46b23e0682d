"""Run untrusted Python (model-written HumanEval solutions) so that only the harness can pass it.

    result = check_function(solution="def add(a, b):\\n    return a + b\\n",
                            tests="def check(f):\\n    assert f(2, 3) == 5\\n", entry_point="add")
    result.success  # True
    execute("print(1 + 1)", timeout=5).stdout  # "2\\n": run a whole program, no verdict

How the verdict is made (check_function). Three processes:
  harness (this module) -> supervisor (`sandbox_child.py judge`) -> solution (`sandbox_child.py solution`)
The solution process loads the model's code and then only answers call requests on a pipe. The
supervisor runs the task's tests itself and hands them a stand-in `candidate` that sends the
arguments to the solution and returns its reply. Both directions carry plain data only (None,
bool, int, float, str, bytes, complex, list, tuple, set, frozenset, dict, by exact type; the
standard library's Counter, OrderedDict and defaultdict arrive as dict), so an object with a
rigged `__eq__` cannot reach the tests. The verdict is "the tests returned without
an exception, within the limits", decided in the supervisor, where the solution's code never runs.

The supervisor reports to the harness over its stdout. Before it starts the solution it makes
itself non-dumpable (other processes can no longer open its /proc/<pid>/mem or fd/), draws a
32-byte nonce and sends only its sha256; the verdict line carries the nonce itself. The solution
never had the nonce in its memory and cannot read the supervisor's, so a verdict it writes into
the harness's pipe (e.g. through /proc/<harness>/fd) does not verify and counts as a failure.
Exiting early, faking a done marker, or killing the supervisor all end in "failed".

What holds the solution in, outside its own interpreter:
  - a fresh interpreter (`python -I`), stdin closed, a scrubbed environment (no variables of the
    harness; the supervisor, its parent, has a scrubbed environment too), a fresh temp dir as cwd
  - rlimits: address space, CPU seconds, file size, process count, no core dumps; no_new_privs
  - as root: the solution drops to uid/gid 65534 (nobody) after loading the stdlib modules tasks
    use (random, math, collections, itertools, re, heapq, string, hashlib, ...), before its code
    runs, so it cannot write outside its temp dir and world-writable places, nor read other
    processes' /proc/<pid>/environ, mem or fd, nor signal them; its process count limit applies
  - new PID, network and IPC namespaces where the kernel allows (root, or unprivileged user
    namespaces): the solution is the PID namespace's init, so when it is killed the kernel
    kills everything it started; it has no network (127.0.0.1 refuses). Elsewhere the
    supervisor is a child subreaper: every descendant, `setsid` daemons included, is found
    under it in /proc and killed. Either way the supervisor sets a watchdog at the timeout, and
    a supervisor still running `GRACE_S` past it is stopped here, everything below it killed, then
    its process group (a process that left the group with setsid is still below it).
  - stdout/stderr capped: past the cap the program is killed
  - second line, in-process: careless calls (os.system, os.fork, subprocess, os.remove outside
    the temp dir, ...) raise PermissionError. These are easy to get around (posix, _io, ctypes);
    the fence is the list above.

What it does not promise. It is not a container. As root, the program can still read what
nobody may read (world-readable files), write to world-writable directories (/tmp, /dev/shm),
use CPU and memory up to the limits, and call the kernel directly (ctypes is allowed). Without
root and without user namespaces, it runs as your uid: it can then read and write your files,
read your other processes' environments and signal them, and open sockets; the verdict still
cannot be faked, but nothing else holds. For untrusted code at scale, run the evaluator in a
container with gVisor (runsc) or a VM, with no network and a read-only root.

execute() runs a whole program and reports whether it exited 0 after reaching its end. That
report comes from the program's own process, so a hostile program can fake it; use it for
programs you trust to be honest, and check_function for a verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

CHILD_SCRIPT = Path(__file__).with_name("sandbox_child.py")
# The child script's /proc helpers and process hunt, loaded by path: this module imports nothing from
# the package (the two files may be copied on their own to run a harness as nobody).
_spec = importlib.util.spec_from_file_location("picochat_sandbox_child", CHILD_SCRIPT)
_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_child)
GRACE_S = 15.0  # supervisor start-up and clean-up on top of the program's timeout
SUPERVISOR_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}


@dataclass
class ExecResult:
    success: bool  # execute: ran to its end with exit status 0; check_function: the tests passed
    stdout: str
    stderr: str
    timeout: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False
    returncode: int | None = None
    isolated: bool = False  # ran in its own PID and network namespaces


def execute(code: str, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1 << 20,
            max_file_mb: int = 16, max_processes: int = 64, namespaces: bool = True) -> ExecResult:
    """Run `code` as a program in the sandbox; never raises for anything the code does."""
    job = {"mode": "program"}
    return _run(job, code, timeout, memory_mb, max_output_bytes, max_file_mb, max_processes, namespaces)


def check_function(solution: str, tests: str, entry_point: str, prelude: str = "", timeout: float = 5.0,
                   memory_mb: int = 256, max_output_bytes: int = 1 << 20, max_file_mb: int = 16,
                   max_processes: int = 64, namespaces: bool = True) -> ExecResult:
    """Load `solution` in the sandbox and pass if the trusted `tests` (which define `check(candidate)`,
    run after the trusted `prelude`) pass when `candidate` is the solution's `entry_point`."""
    job = {"mode": "function", "tests": tests, "prelude": prelude, "entry_point": entry_point}
    return _run(job, solution, timeout, memory_mb, max_output_bytes, max_file_mb, max_processes, namespaces)


def _run(job: dict, code: str, timeout: float, memory_mb: int, max_output_bytes: int, max_file_mb: int,
         max_processes: int, namespaces: bool) -> ExecResult:
    root = Path(tempfile.mkdtemp(prefix="picochat-sandbox-"))
    try:
        (root / "solution.py").write_text(code, encoding="utf-8")
        if os.geteuid() == 0:  # the solution runs as nobody and works in this directory
            os.chown(root, _child.NOBODY, _child.NOBODY)
        job.update(root=str(root), timeout=timeout, max_output_bytes=max_output_bytes, namespaces=namespaces,
                   limits={"memory_bytes": memory_mb << 20, "cpu_seconds": max(1, math.ceil(timeout)) + 1,
                           "file_bytes": max_file_mb << 20, "processes": max_processes})
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(CHILD_SCRIPT), "judge"], env=SUPERVISOR_ENV,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=timeout + GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_supervisor(proc.pid)
            out, err = proc.communicate()
            return ExecResult(False, "", "sandbox: the supervisor did not finish in time", timeout=True)
    finally:
        if root.exists():
            shutil.rmtree(root, onerror=_make_writable_and_retry)
    return _verdict(out, err.decode("utf-8", "replace"))


def _kill_supervisor(pid: int) -> None:
    """SIGKILL a supervisor that did not finish in time, every process below it and its process group.

    The supervisor leads its own session and group (start_new_session), but the solution runs in a
    session of its own, and a program's processes may call setsid: killing the group alone would
    leave them running. The supervisor is a child subreaper, so while it lives every one of them is
    below it in /proc, orphans included; stopped first, it reaps and starts nothing while they are
    killed, and only then goes itself (killed first, it would hand them to init, out of reach)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGSTOP)
    _child.kill_descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _verdict(out: bytes, supervisor_err: str) -> ExecResult:
    """The supervisor's verdict, if its nonce matches the hash it committed to first; else a failure."""
    lines = out.split(b"\n")
    head = lines[0].decode("ascii", "replace").split()
    if len(head) == 2 and head[0] == "hash":
        for line in reversed(lines[1:]):
            try:
                verdict = json.loads(line)
                nonce = bytes.fromhex(verdict["nonce"])
            except (ValueError, TypeError, KeyError):
                continue
            if hashlib.sha256(nonce).hexdigest() == head[1]:
                result = {f.name: verdict[f.name] for f in fields(ExecResult)}
                return ExecResult(**{**result, "success": verdict["success"] is True})
    return ExecResult(False, "", f"sandbox: no verified verdict from the supervisor\n{supervisor_err[-2000:]}")


def _make_writable_and_retry(func, path, _exc) -> None:
    """rmtree's error handler: a file or folder the program made read-only is made writable, then removed."""
    os.chmod(path, 0o700)
    os.chmod(os.path.dirname(path), 0o700)
    func(path)
