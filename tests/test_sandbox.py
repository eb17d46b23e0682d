"""The code sandbox: correct programs pass, and a corpus of hostile programs can neither touch files
outside their temp dir, read our secrets, fake success nor hang the evaluator."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from picochat.sandbox import check_function, execute

HUMANEVAL_LIKE = '''
def add(a, b):
    return a + b

def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0

check(add)
print("passed")
'''


def test_correct_program_passes_and_reports_output():
    r = execute(HUMANEVAL_LIKE, timeout=5)
    assert r.success and r.returncode == 0 and r.stdout.strip() == "passed"
    assert not (r.timeout or r.memory_exceeded or r.output_truncated)


def test_failing_assertion_fails_with_traceback():
    r = execute(HUMANEVAL_LIKE.replace("return a + b", "return a - b"), timeout=5)
    assert not r.success and "AssertionError" in r.stderr


def test_stdin_is_closed_so_input_does_not_block():
    t0 = time.time()
    r = execute("input()", timeout=5)
    assert not r.success and "EOFError" in r.stderr and time.time() - t0 < 4


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "canary.txt"
    path.parent.mkdir()
    path.write_text("still here")
    return path


DESTRUCTIVE = [
    "import os; os.remove({p!r})",
    "import os; os.unlink({p!r})",
    "import pathlib; pathlib.Path({p!r}).unlink()",
    "import shutil, os; shutil.rmtree(os.path.dirname({p!r}))",
    "import os; os.rename({p!r}, 'stolen.txt')",
    "import shutil; shutil.move({p!r}, 'stolen.txt')",
    "open({p!r}, 'w').write('overwritten')",
    "import os; fd = os.open({p!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'x')",
    "import os; os.truncate({p!r}, 0)",
    "import os; os.chmod({p!r}, 0)",
    "import os; os.system('rm -f {p}')",
    "import subprocess; subprocess.run(['rm', '-f', {p!r}])",
    "import os; os.execv('/bin/rm', ['rm', '-f', {p!r}])",
    "import os; os.chdir(os.path.dirname({p!r})); os.remove('canary.txt')",
]


@pytest.mark.parametrize("template", DESTRUCTIVE)
def test_files_outside_the_temp_dir_survive(canary: Path, template: str):
    r = execute(template.format(p=str(canary)), timeout=5)
    assert not r.success
    assert "PermissionError" in r.stderr
    assert canary.read_text() == "still here"
    assert os.stat(canary).st_mode & 0o600 == 0o600


def test_files_inside_the_temp_dir_are_fine_and_the_dir_is_removed():
    code = ("import os, shutil\n"
            "os.makedirs('work/sub'); open('work/sub/f.txt', 'w').write('x')\n"
            "os.chmod('work/sub', 0o500)\n"  # read-only: cleanup must still remove it
            "print(os.getcwd())\n")
    r = execute(code, timeout=5)
    assert r.success, r.stderr
    assert not Path(r.stdout.strip()).exists()


def test_environment_secrets_are_not_inherited(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PICOCHAT_TEST_SECRET", "hunter2")
    r = execute("import os; print(dict(os.environ))", timeout=5)
    assert r.success and "hunter2" not in r.stdout and "PICOCHAT_TEST_SECRET" not in r.stdout


@pytest.mark.parametrize("code", [
    "import sys; sys.exit(0)\nassert False",
    "raise SystemExit(0)\nassert False",
    "exit()\nassert False",
    "import os; os._exit(0)\nassert False",
    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
])
def test_exiting_early_is_not_success(code: str):
    assert not execute(code, timeout=5).success


@pytest.mark.parametrize("code", [
    "while True: pass",
    "import time; time.sleep(3600)",
    ("import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP): signal.signal(s, signal.SIG_IGN)\n"
     "while True: pass"),
    "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,)).start()",
])
def test_hanging_programs_are_killed_at_the_timeout(code: str):
    t0 = time.time()
    r = execute(code, timeout=1.0)
    assert r.timeout and not r.success
    assert time.time() - t0 < 4


def test_fork_bomb_is_stopped():
    t0 = time.time()
    r = execute("import os\nwhile True:\n    os.fork()", timeout=2)
    assert not r.success and time.time() - t0 < 5
    r = execute("import multiprocessing as mp\nwhile True:\n    mp.Process(target=print).start()", timeout=2)
    assert not r.success and time.time() - t0 < 10


def test_signalling_the_evaluator_is_refused():
    r = execute("import os, signal; os.kill(os.getppid(), signal.SIGKILL)", timeout=5)
    assert not r.success and "PermissionError" in r.stderr  # and we are still running


def test_huge_allocation_is_reported_as_memory_exceeded():
    r = execute("x = bytearray(2 << 30)", timeout=5, memory_mb=256)
    assert not r.success and r.memory_exceeded


def test_huge_output_is_capped():
    t0 = time.time()
    r = execute("while True: print('x' * 10000)", timeout=5, max_output_bytes=100_000)
    assert not r.success and r.output_truncated and len(r.stdout) <= 100_000
    assert time.time() - t0 < 4


def test_huge_file_is_stopped_by_the_file_size_limit():
    r = execute("open('big.bin', 'wb').write(b'0' * (64 << 20))", timeout=5, max_file_mb=1)
    assert not r.success


@pytest.mark.parametrize("counts", ["Counter(words)", "defaultdict(int, Counter(words))",
                                    "OrderedDict(Counter(words))"])
def test_counting_dicts_from_the_standard_library_reach_the_tests_as_dicts(counts: str):
    solution = ("from collections import Counter, OrderedDict, defaultdict\n"
                f"def histogram(text):\n    words = text.split()\n    return {counts}\n")
    tests = "def check(candidate):\n    assert candidate('a b b a c') == {'a': 2, 'b': 2, 'c': 1}\n"
    r = check_function(solution, tests, "histogram")
    assert r.success, r.stderr


def test_a_hung_supervisor_is_stopped_with_its_whole_process_group(tmp_path, monkeypatch):
    """Past its grace the supervisor is killed with its process group: a process it started that still
    holds its output pipe must not keep the caller waiting until that process ends."""
    hung = tmp_path / "hung_supervisor.py"
    hung.write_text("import subprocess, sys, time\n"
                    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                    "time.sleep(60)\n")
    monkeypatch.setattr("picochat.sandbox.CHILD_SCRIPT", hung)
    monkeypatch.setattr("picochat.sandbox.GRACE_S", 1.0)
    started = time.monotonic()
    r = execute("print(1)", timeout=1)
    assert r.timeout and not r.success and "did not finish in time" in r.stderr
    assert time.monotonic() - started < 20
