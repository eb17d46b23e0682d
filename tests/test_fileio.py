"""picochat.fileio: a file is replaced whole or not at all, and no temporary file is left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from picochat.fileio import aside, write_json, write_text, writing

OLD = '{"previous": "complete", "ok": true}'


class Boom(Exception):
    pass


def _half_text(path: Path) -> None:
    with writing(path) as f:
        f.write('{"new": ')
        f.flush()
        raise Boom


def _half_array(path: Path) -> None:
    with writing(path, "wb") as f:
        np.save(f, np.arange(1000))
        f.flush()
        raise Boom


def _half_by_name(path: Path) -> None:
    with aside(path) as tmp:
        Path(tmp).write_text("half")
        raise Boom


@pytest.mark.parametrize("fail", [_half_text, _half_array, _half_by_name])
def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temp_file(tmp_path: Path, fail):
    target = tmp_path / "result.json"
    target.write_text(OLD)
    with pytest.raises(Boom):
        fail(target)
    assert target.read_text() == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_second_write_replaces_the_file_whole(tmp_path: Path):
    target = tmp_path / "new" / "dir" / "out.json"  # missing parents are created
    write_text(target, "run 1\n")
    with open(target) as reader:  # opened before the second write: it keeps the complete first version
        write_json(target, {"run": 2, "text": "é"}, ensure_ascii=False, indent=1)
        assert reader.read() == "run 1\n"
    assert target.read_bytes() == json.dumps({"run": 2, "text": "é"}, ensure_ascii=False, indent=1).encode()
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_ctrl_c_inside_the_block_cleans_up(tmp_path: Path):
    target = tmp_path / "table.csv"
    target.write_text("a,b\n1,2\n")
    with pytest.raises(KeyboardInterrupt), writing(target, newline="") as f:
        f.write("a,b\n")
        f.flush()
        raise KeyboardInterrupt
    assert target.read_text() == "a,b\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_each_writer_has_its_own_hidden_temp_file(tmp_path: Path):
    target = tmp_path / "cache.json"
    child = ("import os, sys; from pathlib import Path; from picochat.fileio import writing\n"
             "with writing(Path(sys.argv[1])) as f:\n"
             "    print(os.getpid(), *[p.name for p in Path(sys.argv[1]).parent.iterdir() if p.name.endswith('.tmp')])\n")
    with writing(target) as first, writing(target) as second:  # two writers in this process at once
        ours = _temp_files(tmp_path)
        first.write("first")
        second.write("second")
        proc = subprocess.run([sys.executable, "-c", child, str(target)], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert len(ours) == 2 and all(name.startswith(f".cache.json.{os.getpid()}-") for name in ours)
    child_pid, *seen = proc.stdout.split()
    theirs = set(seen) - set(ours)
    assert len(seen) == 3 and len(theirs) == 1 and theirs.pop().startswith(f".cache.json.{child_pid}-")
    assert target.read_text() == "first" and _temp_files(tmp_path) == []  # the last to finish wins
