"""A hostile corpus against the sandbox: programs that try to fake the verdict, escape the temp dir,
read secrets, signal the evaluator, reach the network, or outlive the time limit.

The file-system, secret and signal tests need the uid drop, so they run only as root (the
sandbox's docstring says what holds without it); the network tests need the sandbox's own
network namespace. Things the sandbox deliberately allows are in ALLOWED at the end, each with
the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from picochat.sandbox import check_function, execute

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop to nobody needs root")

# The judge's side of a tiny task: the tests want add(2, 3) == 5, and no solution below adds.
PRELUDE = 'def add(a, b):\n    """Add two numbers."""\n'
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
WRONG = "\ndef add(a, b):\n    return None\n"


def judge(solution: str, timeout: float = 5.0, **kwargs) -> object:
    return check_function(solution, TESTS, "add", prelude=PRELUDE, timeout=timeout, **kwargs)


def test_a_right_solution_passes_and_a_wrong_one_fails():
    assert judge("def add(a, b):\n    return a + b\n").success
    assert not judge(WRONG).success


# --- faking the verdict: every program here must fail ------------------------------------
FAKE_MARK = "b'picochat-sandbox-done'"
FAKE_VERDICTS = {
    "issue: runner's _write via __main__": (
        "import sys\nm = sys.modules['__main__']; m._write(m.DONE_FD, b'picochat-sandbox-done'); m._exit(0)\n"),
    "posix: write the old mark to every fd, then exit": (
        f"import posix\nfor fd in range(64):\n    try: posix.write(fd, {FAKE_MARK} + b'\\ndone\\n')\n"
        "    except OSError: pass\nposix._exit(0)\n"),
    "posix: fake hash and verdict lines on every fd": (
        "import posix, json, hashlib\nn = bytes(32)\n"
        "line = ('hash ' + hashlib.sha256(n).hexdigest() + '\\n' + json.dumps({'success': True, 'nonce': n.hex(),"
        " 'stdout': '', 'stderr': '', 'timeout': False, 'memory_exceeded': False, 'output_truncated': False,"
        " 'returncode': 0, 'isolated': False}) + '\\n').encode()\n"
        "for fd in range(64):\n    try: posix.write(fd, line)\n    except OSError: pass\n"),
    "fake verdict through /proc/<parent>/fd": (
        "import os, json\nppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "for pid in {ppid, os.getppid()}:\n"
        "    for fd in (os.listdir(f'/proc/{pid}/fd') if os.path.exists(f'/proc/{pid}/fd') else []):\n"
        "        try:\n"
        "            w = os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY | os.O_NONBLOCK)\n"
        "            os.write(w, json.dumps({'ready': True}).encode() + b'\\n' + b'{\"ok\": 5}\\n' * 4)\n"
        "        except OSError: pass\n"),
    "fake verdict into every process's pipes": (
        "import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try: fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError: continue\n"
        "    for fd in fds:\n        try: os.write(os.open(f'/proc/{pid}/fd/{fd}', os.O_WRONLY | os.O_NONBLOCK), b'{\"ok\": 5}\\n')\n"
        "        except OSError: pass\n"),
    "read the judge's memory for the nonce": (
        "ppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "open(f'/proc/{ppid}/mem', 'rb').read(1)\n"),
    "sys.exit(0) before the tests": "import sys; sys.exit(0)\n",
    "SystemExit inside the call": "def add(a, b):\n    raise SystemExit(0)\n",
    "posix._exit(0) inside the call": "import posix\ndef add(a, b):\n    posix._exit(0)\n",
    "kill the parent": (
        "import posix, signal\nppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "posix.kill(ppid, signal.SIGKILL)\n"),
    "object equal to everything": (
        "class Any:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
        "def add(a, b):\n    return Any()\n"),
    "int subclass equal to everything": (
        "class I(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)\n"),
    "str subclass": "class S(str):\n    def __eq__(self, other): return True\ndef add(a, b):\n    return S('x')\n",
    "a function as the answer": "def add(a, b):\n    return lambda *x: 5\n",
    "a generator as the answer": "def add(a, b):\n    return (i for i in [a + b])\n",
    "a reply nested past the recursion limit": (
        "def add(a, b):\n    x = []\n    for _ in range(100000): x = [x]\n    return x\n"),
    "a reply over the message cap": "def add(a, b):\n    return 'x' * (40 << 20)\n",
    "patch builtins and AssertionError": (
        "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\nbuiltins.__dict__['assert'] = None\n" + WRONG),
    "print a fake verdict on stdout": (
        "print('hash 0'); print('{\"success\": true, \"nonce\": \"00\"}')\n" + WRONG),
    "tamper with the judge's pipes in /proc/self/fd": (
        "import os\nfor fd in os.listdir('/proc/self/fd'):\n"
        "    try: os.write(int(fd), b'{\"ok\": 5}\\n' * 10)\n    except OSError: pass\n" + WRONG),
    "settrace and atexit hooks": (
        "import sys, atexit\nsys.settrace(lambda *a: None)\natexit.register(lambda: print('passed'))\n" + WRONG),
    "define check to pass": "def check(candidate):\n    pass\n" + WRONG,
    "redefine the prompt's helper": "def add(a, b):\n    return None\nMETADATA = {}\nassert_ = None\n",
}


@pytest.mark.parametrize("solution", FAKE_VERDICTS.values(), ids=FAKE_VERDICTS.keys())
def test_the_verdict_cannot_be_faked(solution: str):
    r = judge(solution)
    assert not r.success, r.stderr


@pytest.mark.parametrize("solution", ["import sys\nm = sys.modules['__main__']; m._write(m.DONE_FD, b'x'); m._exit(0)\n",
                                      FAKE_VERDICTS["posix: write the old mark to every fd, then exit"]])
def test_the_issue_exploit_fails_through_humaneval_evaluate(solution: str):
    from picochat.tasks.humaneval import HumanEval

    conversation = {"prompt": PRELUDE, "test": TESTS, "entry_point": "add"}
    assert not HumanEval.evaluate(object.__new__(HumanEval), conversation, f"```python\n{solution}```")
    assert HumanEval.evaluate(object.__new__(HumanEval), conversation, "    return a + b\n")


# --- the time limit holds for every process the program starts ---------------------------
SLEEPERS = {
    "setsid sleeper (the issue's)": "import posix, time\nif posix.fork() == 0:\n    posix.setsid(); time.sleep(40)\n",
    "double-fork daemon": ("import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n"
                           "    if posix.fork() == 0:\n        time.sleep(40)\n    posix._exit(0)\n"),
    "sleeper that ignores SIGTERM": ("import posix, signal, time\nif posix.fork() == 0:\n"
                                     "    signal.signal(signal.SIGTERM, signal.SIG_IGN); posix.setsid(); time.sleep(40)\n"),
    "sleeper holding stdout open": "import posix, time\nif posix.fork() == 0:\n    time.sleep(40)\nprint('bye')\n",
}


@pytest.mark.parametrize("namespaces", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["namespaces", "subreaper"])
@pytest.mark.parametrize("code", SLEEPERS.values(), ids=SLEEPERS.keys())
def test_processes_left_behind_are_killed_at_the_timeout(code: str, namespaces: bool):
    t0 = time.monotonic()
    r = execute(code, timeout=1, namespaces=namespaces)
    assert not r.success and r.timeout
    assert time.monotonic() - t0 < 1 + 3
    t0 = time.monotonic()
    r = judge(code + "def add(a, b):\n    return a + b\n", timeout=1, namespaces=namespaces)
    assert not r.success
    assert time.monotonic() - t0 < 1 + 3


FORK_BOMBS = {
    "os.fork": "import os\nwhile True:\n    os.fork()\n",
    "posix.fork": "import posix\nwhile True:\n    posix.fork()\n",
    "posix.fork, children sleep": "import posix, time\nwhile True:\n    if posix.fork() == 0: time.sleep(60)\n",
    "multiprocessing": "import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()\n",
    "threads": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n",
}


@pytest.mark.parametrize("namespaces", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["namespaces", "subreaper"])
@pytest.mark.parametrize("code", FORK_BOMBS.values(), ids=FORK_BOMBS.keys())
def test_fork_bombs_are_stopped(code: str, namespaces: bool):
    t0 = time.monotonic()
    r = execute(code, timeout=2, namespaces=namespaces)
    assert not r.success
    assert time.monotonic() - t0 < 2 + 4


@AS_ROOT
def test_the_process_limit_applies_after_the_uid_drop():
    r = execute("import posix, time\nn = 0\ntry:\n    while True:\n        if posix.fork() == 0:\n"
                "            time.sleep(5); posix._exit(0)\n        n += 1\nexcept OSError:\n    print(n, flush=True)\n"
                "    posix._exit(0)\n",
                timeout=4, max_processes=16)
    assert r.stdout.strip() and int(r.stdout) < 16, r.stdout + r.stderr


# --- files outside the temp dir ------------------------------------------------------------
@pytest.fixture
def canary() -> Iterator[Path]:
    """A root-owned file in a directory anyone may enter (so only permissions protect it)."""
    directory = Path(tempfile.mkdtemp(prefix="picochat-canary-"))
    directory.chmod(0o755)
    path = directory / "canary.txt"
    path.write_text("still here")
    path.chmod(0o644)
    yield path
    subprocess.run(["rm", "-rf", str(directory)], check=False)


ESCAPES = {
    "_io.FileIO": "import _io\n_io.FileIO(P, 'w').write(b'overwritten')",
    "io.open_code bypass via FileIO append": "import _io\n_io.FileIO(P, 'a').write(b'more')",
    "posix.open + write": "import posix\nfd = posix.open(P, posix.O_WRONLY | posix.O_TRUNC)\nposix.write(fd, b'x')",
    "posix.unlink": "import posix\nposix.unlink(P)",
    "posix.remove": "import posix\nposix.remove(P)",
    "posix.rename": "import posix\nposix.rename(P, P + '.stolen')",
    "posix.replace over it": "open('x', 'w').write('evil')\nimport posix\nposix.replace('x', P)",
    "posix.truncate": "import posix\nposix.truncate(P, 0)",
    "posix.chmod": "import posix\nposix.chmod(P, 0)",
    "posix.chown": "import posix\nposix.chown(P, 65534, 65534)",
    "posix.utime": "import posix\nposix.utime(P, (0, 0))",
    "unlink with dir_fd": ("import posix, os\nd = posix.open(os.path.dirname(P), posix.O_RDONLY)\n"
                           "posix.unlink('canary.txt', dir_fd=d)"),
    "open with dir_fd": ("import posix, os\nd = posix.open(os.path.dirname(P), posix.O_RDONLY)\n"
                         "fd = posix.open('canary.txt', posix.O_WRONLY | posix.O_TRUNC, dir_fd=d)\nposix.write(fd, b'x')"),
    "new file next to it": "import posix, os\nposix.open(os.path.join(os.path.dirname(P), 'new.txt'), posix.O_CREAT | posix.O_WRONLY)",
    "sqlite3": "import sqlite3\nsqlite3.connect(P).execute('create table t (x)')",
    "the real open from the guard's closure": (
        "real = [c.cell_contents for c in open.__closure__ if callable(c.cell_contents)]\n"
        "for f in real:\n    try: f(P, 'w').write('overwritten')\n    except Exception as e: print(e)\n"
        "assert False"),
    "hard link then write": "import posix\nposix.link(P, 'l')\nopen('l', 'w').write('x')",
    "symlink then write": "import posix\nposix.symlink(P, 'l')\nopen('l', 'w').write('x')",
    "posix.system rm": "import posix\nposix.system('rm -f ' + P)\nassert False",
    "posix.system overwrite": "import posix\nposix.system('echo x > ' + P)\nassert False",
    "posix_spawn rm": ("import posix\npid = posix.posix_spawn('/bin/rm', ['rm', '-f', P], {})\n"
                       "posix.waitpid(pid, 0)\nassert False"),
    "posix.execv rm": "import posix\nposix.execv('/bin/rm', ['rm', '-f', P])",
    "ctypes libc.system": "import ctypes\nctypes.CDLL(None).system(('rm -f ' + P).encode())\nassert False",
    "ctypes libc.unlink": "import ctypes\nassert ctypes.CDLL(None).unlink(P.encode()) == 0",
    "setuid back to root": "import posix\nposix.setuid(0)\nposix.unlink(P)",
    "setuid binary (no_new_privs)": "import posix\nposix.system('/usr/bin/newgrp root -c \"rm -f ' + P + '\"')\nassert False",
    "_posixsubprocess through subprocess internals": (
        "import posix\nr, w = posix.pipe()\n"
        "pid = posix.fork()\nif pid == 0:\n    posix.execv('/bin/sh', ['sh', '-c', 'rm -f ' + P])\n"
        "posix.waitpid(pid, 0)\nassert False"),
}


@AS_ROOT
@pytest.mark.parametrize("template", ESCAPES.values(), ids=ESCAPES.keys())
def test_files_outside_the_temp_dir_cannot_be_changed(canary: Path, template: str):
    before = canary.stat()
    r = execute(f"P = {str(canary)!r}\n{template}\n", timeout=5)
    assert not r.success, r.stdout + r.stderr
    assert canary.read_text() == "still here"
    after = canary.stat()
    assert (after.st_mode, after.st_uid, after.st_mtime) == (before.st_mode, before.st_uid, before.st_mtime)
    assert sorted(p.name for p in canary.parent.iterdir()) == ["canary.txt"]


# --- secrets ---------------------------------------------------------------------------------
SECRET = "sk-picochat-test-hunter2"


@pytest.fixture
def process_with_secret() -> Iterator[int]:
    """Another process of ours with a secret in its environment (as an API server would have)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": SECRET})
    yield proc.pid
    proc.kill()
    proc.wait()


SNOOPS = {
    "own environment": "import os\nprint(dict(os.environ))\nprint(open('/proc/self/environ', 'rb').read())",
    "/proc/<parent>/environ": ("ppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
                               "print(open(f'/proc/{ppid}/environ', 'rb').read())"),
    "every /proc/<pid>/environ": ("import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
                                  "    try: print(open(f'/proc/{pid}/environ', 'rb').read())\n    except OSError: pass"),
    "every /proc/<pid>/cmdline and mem": (
        "import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try: print(open(f'/proc/{pid}/mem', 'rb').read(16))\n    except OSError: pass"),
    "/proc/<pid>/fd of other processes": (
        "import os\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try: print(os.listdir(f'/proc/{pid}/fd'))\n    except OSError: pass"),
}


@AS_ROOT
@pytest.mark.parametrize("code", SNOOPS.values(), ids=SNOOPS.keys())
def test_secrets_of_other_processes_cannot_be_read(process_with_secret: int, code: str,
                                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", SECRET)
    r = execute(code, timeout=5)
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert f"'{process_with_secret}'" not in r.stdout or "fd" not in code


def test_the_supervisor_has_a_scrubbed_environment_too():
    code = ("ppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
            "import os\nprint(os.environ.get('HOME'))\n")
    env = dict(os.environ, PICOCHAT_TEST_SECRET=SECRET)  # the harness's own initial environment
    probe = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
             f"from picochat.sandbox import execute\nr = execute({code!r})\nprint(r.stdout, r.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert SECRET not in out.stdout and "Traceback" not in out.stdout, out.stdout + out.stderr


# --- signals and the network ------------------------------------------------------------------
SIGNALS = {
    "kill the harness": "import posix, signal\nposix.kill(HARNESS, signal.SIGKILL)",
    "killpg the harness's group": "import posix, signal\nposix.killpg(posix.getpgid(HARNESS), signal.SIGKILL)",
    "kill every process (-1)": "import posix, signal\nposix.kill(-1, signal.SIGKILL)",
    "kill the parent": ("import posix, signal\nppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
                        "posix.kill(ppid, signal.SIGKILL)"),
    "signal.pthread_kill on the parent's threads": (
        "import os, posix, signal\nppid = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "for tid in os.listdir(f'/proc/{ppid}/task'):\n    posix.kill(int(tid), signal.SIGSTOP)"),
}


@AS_ROOT
@pytest.mark.parametrize("template", SIGNALS.values(), ids=SIGNALS.keys())
def test_signals_do_not_reach_the_harness(template: str):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r = execute(f"HARNESS = {victim.pid}\n{template}\nassert False", timeout=5)
        assert not r.success
        assert victim.poll() is None  # still running
        r = execute(f"HARNESS = {os.getpid()}\n{template}\nassert False", timeout=5)
        assert not r.success  # and this test process is still here to check it
    finally:
        victim.kill()
        victim.wait()


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server on 127.0.0.1 that records whatever reaches it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                received.append(conn.recv(100) or b"(connected)")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


NETWORK = {
    "tcp to 127.0.0.1": "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)\ns.sendall(b'hi')",
    "udp to 127.0.0.1": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'hi', ('127.0.0.1', PORT))\nassert False",
    "tcp to localhost over ipv6": "import socket\nsocket.create_connection(('::1', PORT), timeout=2)",
    "tcp to a public address": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)",
    "raw socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
}


@pytest.mark.parametrize("code", NETWORK.values(), ids=NETWORK.keys())
def test_the_network_is_unreachable(listener: tuple[int, list[bytes]], code: str):
    port, received = listener
    r = execute(f"PORT = {port}\n{code}\n", timeout=5)
    if not r.isolated:
        pytest.skip("no network namespace on this machine: sockets are allowed (see the sandbox docstring)")
    assert not r.success
    time.sleep(0.3)
    assert received == []


# --- what tasks need still works -------------------------------------------------------------
STDLIB = "import random, math, collections, itertools, re, heapq, string, hashlib, functools, fractions, bisect\n"


def test_stdlib_imports_work_in_both_modes():
    r = execute(STDLIB + "random.seed(1); print(heapq.nsmallest(2, [3, 1, 2]), hashlib.md5(b'').hexdigest()[:4])")
    assert r.success and r.stdout.split() == ["[1,", "2]", "d41d"], r.stderr
    assert judge(STDLIB + "def add(a, b):\n    return math.fsum([a, b])\n").success


def test_plain_data_of_every_kind_crosses_the_boundary():
    tests = ("def check(candidate):\n"
             "    for v in [None, True, 3, 2**200, -0.5, float('inf'), 'é', b'\\x00', 1j, [1, (2, 3)], {1: {2}},"
             " frozenset({4}), (), {}]:\n"
             "        out = candidate(v)\n        assert out == v and type(out) is type(v), (v, out)\n")
    assert check_function("def echo(x):\n    return x\n", tests, "echo").success


# --- deliberately allowed, with the reason ----------------------------------------------------
ALLOWED = {
    "writing to /tmp": (("import posix\np = '/tmp/picochat-sandbox-allowed-' + posix.urandom(4).hex()\n"
                         "posix.write(posix.open(p, posix.O_CREAT | posix.O_WRONLY), b'x')\nposix.unlink(p)"),
                        "world-writable directories stay writable for nobody; a container gives a private /tmp"),
    "reading world-readable files": ("print(len(open('/etc/passwd').read()) > 0)",
                                     "the uid drop protects what nobody may not read, not public files"),
    "importing ctypes": ("import ctypes\nprint(ctypes.CDLL(None).getpid() > 0)",
                         "blocking it in-process is not a boundary; the uid, namespaces and rlimits are"),
    "using CPU until the limit": ("x = sum(range(10**6))", "the CPU and time limits bound it"),
}


@pytest.mark.parametrize("code", [code for code, _ in ALLOWED.values()], ids=ALLOWED.keys())
def test_what_the_sandbox_deliberately_allows(code: str):
    r = execute(code, timeout=5)
    assert r.success, r.stderr


# --- a harness without root ---------------------------------------------------------------------
UNPRIVILEGED_PROBE = """
import sys, time
sys.path.insert(0, {eval_dir!r})
from sandbox import check_function, execute
tests = "def check(c):\\n    assert c(2, 3) == 5\\n"
right = check_function("def add(a, b):\\n    return a + b\\n", tests, "add", namespaces={ns})
exploit = check_function({exploit!r}, tests, "add", namespaces={ns})
t0 = time.monotonic()
sleeper = execute({sleeper!r}, timeout=1, namespaces={ns})
print(right.success, exploit.success, sleeper.success, time.monotonic() - t0 < 4, right.isolated)
"""


@AS_ROOT
@pytest.mark.parametrize("namespaces", [True, False], ids=["user-namespaces", "subreaper"])
def test_a_harness_without_root_still_owns_the_verdict(namespaces: bool):
    """Run the sandbox as nobody (an interpreter nobody can read is needed: the system one)."""
    python, setpriv = Path("/usr/bin/python3"), Path("/usr/bin/setpriv")
    if not (python.exists() and setpriv.exists()):
        pytest.skip("needs /usr/bin/python3 and setpriv to run a harness as nobody")
    # sandbox.py and its child script need only the standard library; nobody reads them from a
    # world-readable copy, since a checkout may sit in a private directory (mktemp -d is 0700)
    eval_dir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    os.chmod(eval_dir, 0o755)
    for name in ("sandbox.py", "sandbox_child.py"):
        shutil.copy(Path(__file__).parents[1] / "picochat" / name, eval_dir)
        os.chmod(Path(eval_dir) / name, 0o644)
    probe = UNPRIVILEGED_PROBE.format(eval_dir=eval_dir, ns=namespaces, sleeper=SLEEPERS["setsid sleeper (the issue's)"],
                                      exploit=FAKE_VERDICTS["fake verdict into every process's pipes"] + WRONG)
    out = subprocess.run([str(setpriv), "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-c", probe],
                         env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}, cwd="/", capture_output=True, text=True,
                         timeout=120, check=False)
    shutil.rmtree(eval_dir, ignore_errors=True)
    fields = out.stdout.split()
    assert fields[:4] == ["True", "False", "False", "True"], out.stdout + out.stderr


# --- a program that holds the judge's pipes ---------------------------------------------------
def _sleepers(token: str) -> list[int]:
    """Live (not zombie) processes running `sleep <token>`."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def _sleeper_child(token: str) -> str:
    """Solution code whose child becomes `sleep <token>`, holding every pipe the solution holds."""
    return f"import posix\nif posix.fork() == 0:\n    posix.execv('/bin/sleep', ['sleep', {token!r}])\n"


def _assert_no_sleeper_left(token: str) -> None:
    deadline = time.monotonic() + 2
    while _sleepers(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _sleepers(token)
    for pid in left:
        os.kill(pid, 9)
    assert left == [], "the solution's child outlived the time limit"


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "subreaper"])
def test_a_child_holding_the_reply_pipe_does_not_outlive_a_hanging_call(namespaces: bool):
    """The call hangs and a child of the solution keeps the reply pipe open: the watchdog must kill
    that child too, or the judge waits on the pipe past the time limit and the child lives on."""
    token = f"{60 + os.getpid() % 1000 / 1000 + time.time() % 1 / 1000:.9f}"
    code = _sleeper_child(token) + "import time\ndef add(a, b):\n    time.sleep(60)\n"
    t0 = time.monotonic()
    try:
        r = judge(code, timeout=1, namespaces=namespaces)
        assert not r.success
        assert time.monotonic() - t0 < 1 + 3, r.stderr
    finally:
        _assert_no_sleeper_left(token)


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "subreaper"])
def test_a_reply_nested_past_the_recursion_limit_before_ready_is_a_failure_not_a_crash(namespaces: bool):
    """A first message nested past Python's recursion limit must end in a verdict of failure, with
    every process of the program killed, not in a crash of the supervisor (which kills nothing)."""
    token = f"{70 + os.getpid() % 1000 / 1000 + time.time() % 1 / 1000:.9f}"
    code = (_sleeper_child(token) + "import sys\nposix.write(int(sys.argv[4]), b'[' * 100000 + b'\\n')\n"
            "def add(a, b):\n    return a + b\n")
    try:
        r = judge(code, timeout=2, namespaces=namespaces)
        assert not r.success
        assert "judge:" in r.stderr and "RecursionError" not in r.stderr, r.stderr  # a verdict, not a crash
    finally:
        _assert_no_sleeper_left(token)


# --- a supervisor that does not finish in time ----------------------------------------------------
def _setsid_sleeper(token: str) -> str:
    """Solution code whose child leaves the solution's session, then becomes `sleep <token>`."""
    return f"import posix\nif posix.fork() == 0:\n    posix.setsid()\n    posix.execv('/bin/sleep', ['sleep', {token!r}])\n"


def _setsid_daemon(token: str) -> str:
    """A double-fork daemon: the middle process leaves the session and exits, the sleeper is an orphan."""
    return (f"import posix\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
            f"        posix.execv('/bin/sleep', ['sleep', {token!r}])\n    posix._exit(0)\n")


ESCAPES = {"grandchild": _sleeper_child, "setsid grandchild": _setsid_sleeper, "setsid daemon": _setsid_daemon}


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "subreaper"])
@pytest.mark.parametrize("escape", ESCAPES.values(), ids=ESCAPES.keys())
def test_a_supervisor_past_its_grace_takes_every_process_of_the_program_with_it(escape, namespaces: bool,
                                                                                monkeypatch):
    """The caller gives up on the supervisor while the program and the sleeper it started still run
    (the grace made negative: the caller's kill at 3 s comes before the supervisor's watchdog at 8 s,
    as for a supervisor that hangs). Without a PID namespace only the supervisor's group died: the
    solution with it (PDEATHSIG), but not the sleeper, in the solution's session or a session of its own."""
    monkeypatch.setattr("picochat.sandbox.GRACE_S", -5.0)
    token = f"{80 + os.getpid() % 1000 / 1000 + time.time() % 1 / 1000:.9f}"
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # the sleeper must have started, or nothing was tested
        while not done.is_set() and not seen:
            seen.extend(_sleepers(token))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        r = execute(escape(token) + "import time\ntime.sleep(60)\n", timeout=8, namespaces=namespaces)
        assert r.timeout and "did not finish in time" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 3 + 2
    finally:
        done.set()
        watcher.join()
        _assert_no_sleeper_left(token)
    assert seen, "the sleeper never started"


STOPPED_SUPERVISOR_PROBE = """
import sys
sys.path.insert(0, {eval_dir!r})
import sandbox
sandbox.GRACE_S = 1.0
r = sandbox.execute({code!r}, timeout=2, namespaces=False)
print(r.timeout, r.success)
"""


@AS_ROOT
def test_a_solution_that_stops_its_supervisor_leaves_no_process_behind():
    """A harness without root and without namespaces: the solution runs as the harness's uid, so it can
    SIGSTOP the supervisor, which then never finishes; the caller's kill past the grace must still take
    the sleeper the solution started in a session of its own."""
    python, setpriv = Path("/usr/bin/python3"), Path("/usr/bin/setpriv")
    if not (python.exists() and setpriv.exists()):
        pytest.skip("needs /usr/bin/python3 and setpriv to run a harness as nobody")
    token = f"{90 + os.getpid() % 1000 / 1000 + time.time() % 1 / 1000:.9f}"
    code = (_setsid_sleeper(token) + "import signal, time\ntime.sleep(0.3)\n"
            "posix.kill(posix.getppid(), signal.SIGSTOP)\ntime.sleep(60)\n")
    eval_dir = tempfile.mkdtemp(prefix="picochat-sandbox-")
    os.chmod(eval_dir, 0o755)
    for name in ("sandbox.py", "sandbox_child.py"):
        shutil.copy(Path(__file__).parents[1] / "picochat" / name, eval_dir)
        os.chmod(Path(eval_dir) / name, 0o644)
    try:
        out = subprocess.run([str(setpriv), "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-c",
                              STOPPED_SUPERVISOR_PROBE.format(eval_dir=eval_dir, code=code)],
                             env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}, cwd="/", capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr
    finally:
        shutil.rmtree(eval_dir, ignore_errors=True)
        _assert_no_sleeper_left(token)
