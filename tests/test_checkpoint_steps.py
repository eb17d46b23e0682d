"""Which step directories count as checkpoints: step_<N> as save_checkpoint names them, ordered by N."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from picochat import checkpoint as ckpt
from tests.infer.tiny import save_tiny_checkpoint


@pytest.fixture
def run(picochat_home: Path) -> Path:
    """A run directory with complete checkpoints at steps 999 and 1000."""
    step = save_tiny_checkpoint(stage="base", tag="t")
    shutil.copytree(step, step.parent / "step_999")
    step.rename(step.parent / "step_1000")
    return step.parent


def test_steps_are_ordered_by_number_not_by_name(run: Path):
    assert ckpt.list_steps(run) == [999, 1000]
    assert ckpt.find_checkpoint("base", "t") == run / "step_1000"
    assert ckpt.latest_tag("base") == "t"


@pytest.mark.parametrize("name", ["step_01001", "step_\u0661\u0660\u0660\u0662"])  # a leading zero; Arabic-Indic 1002
def test_a_directory_save_checkpoint_never_names_is_not_a_step(run: Path, name: str):
    """Only step_<N> with N in ASCII digits, no leading zero, names a step: another spelling of a number
    (a copy, a rename) would make find_checkpoint return a step_<N> directory that does not exist."""
    shutil.copytree(run / "step_999", run / name)
    assert ckpt.list_steps(run) == [999, 1000]
    found = ckpt.find_checkpoint("base", "t")
    assert found == run / "step_1000" and found.is_dir()
    assert ckpt.latest_tag("base") == "t"
    ckpt.load_checkpoint_dir(found)
