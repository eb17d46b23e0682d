"""The two processes behind picochat/sandbox.py; run as a script (sandbox.py loads its /proc helpers).

`python -I -B sandbox_child.py judge` is the supervisor. It reads a job (JSON) on stdin, starts
the untrusted program as `sandbox_child.py solution ...`, enforces the limits, kills everything
the program started, and writes the verdict on stdout. In "function" mode it is also the judge:
it runs the trusted tests itself and calls the untrusted function over a pipe, passing only
plain data both ways. See the docstring of sandbox.py for why this design holds.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import ctypes
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC = 0x10000000, 0x20000000, 0x40000000, 0x08000000
NOBODY = 65534
MAX_MESSAGE_BYTES = 16 << 20  # one argument list or return value on the function pipe
KILL_ROUNDS_S = 5.0  # how long a hunt for a program's processes lasts (the supervisor's, or the harness's)
_libc = ctypes.CDLL(None, use_errno=True)

# Imported before the solution runs: once the uid is dropped, an interpreter installed under a
# private home (e.g. /root/.pyenv) can no longer be read, so later imports would fail.
PRELOAD = ("array", "bisect", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime",
           "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math",
           "numbers", "operator", "random", "re", "statistics", "string", "struct", "textwrap", "time", "typing",
           "unicodedata")


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


# --- plain data across the function pipe -------------------------------------------------
def encode(value: object) -> object:
    """A JSON-ready form of plain data; exact types only, so no object with a hostile __eq__ leaves.
    The standard library's dicts (Counter, OrderedDict, defaultdict) go as plain dicts: each
    compares equal to a dict with the same items, as the tests expect."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind in (list, tuple, set, frozenset):
        return {{list: "l", tuple: "t", set: "s", frozenset: "f"}[kind]: [encode(v) for v in value]}
    if kind in (dict, collections.Counter, collections.OrderedDict, collections.defaultdict):
        return {"d": [[encode(k), encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    raise TypeError(f"a value of type {kind.__name__} cannot cross the sandbox boundary; return plain data")


def decode(data: object) -> object:
    """The inverse of `encode`, strict about its input (which may come from the untrusted side)."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is dict and len(data) == 1:
        (tag, items), = data.items()
        if tag in ("l", "t", "s", "f") and type(items) is list:
            return {"l": list, "t": tuple, "s": set, "f": frozenset}[tag](decode(v) for v in items)
        if tag == "d" and type(items) is list and all(type(p) is list and len(p) == 2 for p in items):
            return {decode(k): decode(v) for k, v in items}
        if tag == "b" and type(items) is str:
            return bytes.fromhex(items)
        if tag == "c" and type(items) is list and len(items) == 2 and all(type(x) is float for x in items):
            return complex(*items)
    raise ValueError("malformed value on the sandbox pipe")


def read_message(stream) -> dict:
    line = stream.readline(MAX_MESSAGE_BYTES + 1)
    if not line:
        raise EOFError("the solution process ended")
    if len(line) > MAX_MESSAGE_BYTES or not line.endswith(b"\n"):
        raise ValueError("a message on the sandbox pipe was too long")
    try:
        message = json.loads(line)
    except RecursionError:  # nested past the interpreter's limit: as malformed as any other bad line
        raise ValueError("a message on the sandbox pipe was nested too deeply") from None
    if type(message) is not dict:
        raise ValueError("malformed message on the sandbox pipe")
    return message


def write_message(stream, message: dict) -> None:
    stream.write(json.dumps(message).encode() + b"\n")
    stream.flush()


# --- the solution process -----------------------------------------------------------------
def solution_main(mode: str, request_fd: int, reply_fd: int, root: str, uid: int, entry_point: str) -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    with open(os.path.join(root, "solution.py"), encoding="utf-8") as f:
        source = f.read()
    if uid >= 0:  # as root: become nobody before any untrusted code runs (no_new_privs is already set)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a change of uid clears it
    os.chdir(root)
    replies = os.fdopen(reply_fd, "wb")
    requests = os.fdopen(request_fd, "rb")
    exit_now = os._exit
    install_guards(os.path.realpath(root))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(source, "solution.py", "exec"), namespace)  # noqa: S102 - running it is the point
    except SystemExit as e:
        sys.stderr.write(f"\nSystemExit({e.code!r}): the program exited before its end\n")
        sys.stderr.flush()
        exit_now(3)
    if mode == "program":
        sys.stdout.flush()
        reap(block=True)  # a program has ended when every process it started has ended
        replies.write(b"done\n")  # the program's own claim: see the end of sandbox.py's docstring
        replies.flush()
        return
    function = namespace.get(entry_point)
    if not callable(function):
        write_message(replies, {"error": f"the solution defines no function {entry_point!r}"})
        exit_now(1)
    sys.stdout.flush()
    write_message(replies, {"ready": True})
    while True:  # answer call requests from the judge until it closes the pipe
        try:
            message = read_message(requests)
        except EOFError:
            return
        try:
            reply = {"ok": encode(function(*decode(message["args"])))}
        except BaseException as e:  # noqa: BLE001 - anything the solution raises is the judge's to see
            reply = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        sys.stdout.flush()
        sys.stderr.flush()
        write_message(replies, reply)


def install_guards(root: str) -> None:
    """Second line: refuse process, signal and destructive file calls of careless code in-process.

    A determined program gets around these (posix, _io, ctypes); the OS limits are the real fence.
    """
    def inside(path) -> bool:
        try:
            p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else ".")
        except (TypeError, ValueError):
            return False
        return p == root or p.startswith(root + os.sep)

    def refuse(name):
        def refused(*args, **kwargs):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return refused

    def inside_only(name, fn, nargs=1):
        def guarded(*args, **kwargs):
            if not all(inside(a) for a in args[:nargs]):
                raise PermissionError(f"{name} outside the sandbox directory is disabled")
            return fn(*args, **kwargs)
        return guarded

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not isinstance(file, int) and not inside(file):
            raise PermissionError("writing outside the sandbox directory is disabled")
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError("writing outside the sandbox directory is disabled")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    # (module, names, how many leading arguments must be paths inside root; 0: refused outright).
    # register_at_fork, putenv and unsetenv stay: `import random` and numpy call them, and they
    # only touch this process.
    patches = [(os, "remove unlink rmdir removedirs truncate chmod chown lchown mkfifo mknod", 1),
               (os, "rename renames replace link symlink", 2), (shutil, "rmtree", 1), (shutil, "move", 2),
               (os, ("system popen fork forkpty vfork kill killpg setsid setpgid setpgrp chdir fchdir chroot "
                     "_exit abort posix_spawn posix_spawnp execl execle execlp execlpe execv execve execvp "
                     "execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe "
                     "setuid setgid setresuid setresgid plock"), 0),
               (subprocess, "Popen run call check_call check_output getoutput getstatusoutput", 0),
               (signal, "pthread_kill", 0), (shutil, "chown", 0)]
    for module, names, nargs in patches:
        for name in names.split():
            if hasattr(module, name):
                what, fn = f"{module.__name__}.{name}", getattr(module, name)
                setattr(module, name, inside_only(what, fn, nargs) if nargs else refuse(what))


# --- the supervisor (and judge) -----------------------------------------------------------
def child_setup(limits: dict, namespaces: bool, report_fd: int):
    """preexec_fn for the solution process: rlimits, no setuid gains, die with the supervisor, and
    (where the kernel allows) its own PID, network and IPC namespaces.

    A process that unshares a PID namespace cannot start threads any more and does not enter the
    namespace itself, so the fork made here stays outside as a stand-in: it waits for the program
    (the namespace's init) and exits as it did; killing it kills the program through PDEATHSIG.
    Whether the namespaces were made is written to `report_fd` (closed before the exec).
    """
    def apply() -> None:
        for limit, value in ((resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_DATA, limits["memory_bytes"]),
                             (resource.RLIMIT_CPU, limits["cpu_seconds"]), (resource.RLIMIT_FSIZE, limits["file_bytes"]),
                             (resource.RLIMIT_NPROC, limits["processes"]), (resource.RLIMIT_CORE, 0)):
            with contextlib.suppress(ValueError, OSError):  # e.g. RLIMIT_NPROC above the hard limit;
                resource.setrlimit(limit, (value, value))  # the other limits still apply
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if namespaces and enter_namespaces():
            os.write(report_fd, b"1")
            pid = os.fork()
            if pid > 0:
                os.closerange(0, 1 << 16)  # hold no pipe of the supervisor's (its exec check, the output)
                status = os.waitpid(pid, 0)[1]
                if os.WIFSIGNALED(status):
                    os.kill(os.getpid(), os.WTERMSIG(status))
                os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return apply


def enter_namespaces() -> bool:
    """New PID, network and IPC namespaces for the next child (as root, or through a user
    namespace where unprivileged ones are allowed). False where neither works."""
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
    if _libc.unshare(flags) == 0:
        return True
    uid, gid = os.getuid(), os.getgid()
    # /proc/self/uid_map of a non-dumpable process belongs to root: dumpable for the writes only.
    # Nothing else runs meanwhile; the program is started after it is non-dumpable again, since this
    # process is a copy of the supervisor (nonce included) and stays alive as the stand-in.
    _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)
    try:
        if _libc.unshare(flags | CLONE_NEWUSER) != 0:
            return False
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as f:
                f.write(text)
    except OSError:
        return False
    finally:
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return True


class Output:
    """Copies one pipe of the program into memory up to a cap; past it, calls `over_cap`."""

    def __init__(self, stream, cap: int, over_cap):
        self.data = bytearray()
        self.truncated = False
        self.thread = threading.Thread(target=self._copy, args=(stream, cap, over_cap), daemon=True)
        self.thread.start()

    def _copy(self, stream, cap: int, over_cap) -> None:
        while chunk := stream.read1(1 << 16):
            room = cap - len(self.data)
            self.data.extend(chunk[: max(room, 0)])
            if len(chunk) > room:
                self.truncated = True
                over_cap()
                return

    def text(self) -> str:
        self.thread.join(timeout=2.0)
        return self.data.decode("utf-8", "replace")


def stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat after the command name: state, ppid, ... ([] once the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rindex(b")") + 2:].split()


def descendants(ancestor: int) -> list[int]:
    """Every process below `ancestor`, from /proc."""
    parents = {int(entry): int(fields[1]) for entry in os.listdir("/proc")
               if entry.isdigit() and (fields := stat_fields(int(entry)))}
    found, frontier = [], {ancestor}
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = set(children)
    return found


def is_zombie(pid: int) -> bool:
    fields = stat_fields(pid)
    return not fields or fields[0] in (b"Z", b"X")


def reap(block: bool = False) -> None:
    """Collect every child that has ended, without waiting for the others; with `block`, wait until no
    child is left (in its own PID namespace the solution process adopts every orphan)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, 0 if block else os.WNOHANG)[0] > 0:
            pass


def kill_program(proc: subprocess.Popen) -> None:
    """SIGKILL the program's group in one call (it leads a session of its own), then the program itself."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(proc.pid, signal.SIGKILL)


def leftover_processes(proc: subprocess.Popen, in_namespace: bool, deadline: float) -> int:
    """How many processes the program leaves running besides itself, after waiting until `deadline`
    for them to end (the program itself is `proc`, or in a namespace `proc`'s one child)."""
    quiet = 0  # consecutive scans that found nothing: a process between fork, exit and re-parenting
    while True:  # can be missed by one /proc walk, so "none left" takes three walks in a row
        below = descendants(proc.pid) if in_namespace else descendants(os.getpid())
        program = below[:1] if in_namespace else [proc.pid]
        alive = [pid for pid in below if pid not in program and not is_zombie(pid)]
        quiet = 0 if alive else quiet + 1
        if quiet >= 3 or time.monotonic() >= deadline:
            return len(alive)
        reap()
        time.sleep(0.02)


def kill_descendants(ancestor: int, reaping: bool = False) -> None:
    """SIGKILL every live process below `ancestor` until none is left (or KILL_ROUNDS_S pass).

    Without `reaping` it reaps nothing, so it may run beside a thread that waits for the program;
    with it (only for the caller's own children), the ended ones are reaped too, and a zombie
    counts until it is."""
    deadline = time.monotonic() + KILL_ROUNDS_S
    while True:
        alive = [pid for pid in descendants(ancestor) if reaping or not is_zombie(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if reaping:
            reap()
        if not alive or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def run_tests(job: dict, requests, replies) -> tuple[bool, str]:
    """Judge: run the trusted tests here, calling the solution's function over the pipe."""
    try:
        first = read_message(replies)
    except (EOFError, ValueError) as e:
        return False, f"judge: the solution did not load ({e})\n"
    if first.get("ready") is not True:
        return False, f"judge: {str(first.get('error', 'the solution did not load'))[:500]}\n"

    def candidate(*args):
        write_message(requests, {"args": encode(list(args))})
        reply = read_message(replies)
        if "ok" in reply:
            return decode(reply["ok"])
        raise RuntimeError(f"the solution raised {str(reply.get('error', '?'))[:500]}")

    namespace: dict = {"__name__": "__main__"}
    try:
        exec(compile(job["prelude"], "prompt.py", "exec"), namespace)  # noqa: S102 - the task's own code
        namespace[job["entry_point"]] = candidate  # tests may call the function by its name too
        exec(compile(job["tests"], "tests.py", "exec"), namespace)  # noqa: S102 - the task's own tests
        namespace["check"](candidate)
    except BaseException:  # noqa: BLE001 - any failure of the tests is a failed verdict
        return False, "judge: " + traceback.format_exc(limit=3)
    return True, ""


def supervise(job: dict) -> dict:
    """Start the program under every limit, wait for it (and judge it), clean up; the verdict."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    request_r, request_w = os.pipe()
    reply_r, reply_w = os.pipe()
    isolated_r, isolated_w = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": job["root"],
           "TMPDIR": job["root"], "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    uid = NOBODY if os.geteuid() == 0 else -1
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", os.path.abspath(__file__), "solution", job["mode"], str(request_r), str(reply_w),
         job["root"], str(uid), job.get("entry_point", "")],
        cwd=job["root"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=(request_r, reply_w), start_new_session=True, close_fds=True,
        preexec_fn=child_setup(job["limits"], job["namespaces"], isolated_w))  # noqa: PLW1509 - no thread yet
    os.close(isolated_w)
    in_namespace = os.read(isolated_r, 1) == b"1"  # the children closed their copies when Popen returned
    for fd in (isolated_r, request_r, reply_w):
        os.close(fd)
    stop = threading.Event()

    def stop_program(reason: str) -> None:
        if not stop.is_set():
            stop.set()
            job["stopped_by"] = job.get("stopped_by") or reason
            kill_program(proc)
            # and all it started: a child that holds the reply pipe would keep the judge waiting on it
            # (and itself alive) past the limit where no PID namespace ends with the program
            kill_descendants(os.getpid())

    out = Output(proc.stdout, job["max_output_bytes"], lambda: stop_program("output"))
    err = Output(proc.stderr, job["max_output_bytes"], lambda: stop_program("output"))
    watchdog = threading.Timer(job["timeout"], stop_program, args=("timeout",))
    watchdog.start()
    judged, note = True, ""
    deadline = time.monotonic() + job["timeout"]
    with os.fdopen(request_w, "wb") as requests, os.fdopen(reply_r, "rb") as replies:
        if job["mode"] == "function":
            judged, note = run_tests(job, requests, replies)
        else:
            proc.wait()
            os.set_blocking(replies.fileno(), False)
            judged = (replies.read(5) or b"") == b"done\n"
        # Counted while the pipes are open: closing them ends the solution process (and its namespace).
        left = 0 if job["mode"] == "program" and in_namespace else leftover_processes(proc, in_namespace, deadline)
    if left and job["mode"] == "program":
        job["stopped_by"] = job.get("stopped_by") or "timeout"  # its processes outlived the time limit
    elif left:
        note += f"judge: the solution left {left} process(es) running\n"
        judged = False
    watchdog.cancel()
    # SIGKILL the program and all it started, and reap them. In its own PID namespace the program is
    # the namespace's init: when it dies the kernel kills the rest. Either way the supervisor is a child
    # subreaper, so orphans (a `setsid` sleeper included) are re-parented to it, where /proc shows them.
    kill_program(proc)
    proc.wait()
    kill_descendants(os.getpid(), reaping=True)
    stdout, stderr = out.text(), err.text() + note
    memory = "MemoryError" in stderr
    returncode = proc.returncode if job["mode"] == "program" else None  # a judged solution is killed
    stopped = job.get("stopped_by")
    return {"success": judged and not returncode and not stopped and not memory, "stdout": stdout, "stderr": stderr,
            "timeout": stopped == "timeout", "memory_exceeded": memory, "output_truncated": out.truncated or err.truncated,
            "returncode": returncode, "isolated": in_namespace, "uid": uid}


def judge_main() -> None:
    """Supervisor entry: commit to a nonce, run the job, reveal the nonce with the verdict."""
    prctl(PR_SET_DUMPABLE, 0)  # before the nonce exists: /proc/<pid>/mem and fd/ now refuse other processes
    channel = os.fdopen(os.dup(1), "w", buffering=1)  # line-buffered: each line is out as it is written
    os.dup2(2, 1)  # anything printed by the trusted tests goes to stderr, not into the verdict channel
    nonce = os.urandom(32)
    channel.write(f"hash {hashlib.sha256(nonce).hexdigest()}\n")
    verdict = {**supervise(json.loads(sys.stdin.read())), "nonce": nonce.hex()}
    channel.write(json.dumps(verdict) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "judge":
        judge_main()
    else:
        solution_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), sys.argv[7])
