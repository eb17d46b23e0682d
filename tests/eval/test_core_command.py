"""`picochat base-eval` end to end: a tiny base checkpoint scored on a fixture bundle."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from picochat.cli import main
from tests.eval.fixtures.core_bundles import write_dclm_bundle


@pytest.fixture
def tiny_base_checkpoint(picochat_home: Path) -> Path:
    from picochat.checkpoint import run_dir, save_model_only
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.train(["The man turned on the faucet and water flowed. Sarah was happy. " * 30], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=48)
    return save_model_only(run_dir("base", "tiny"), build_model(config, "cpu"), tok, {"step": 7, "stage": "base"})


def test_base_eval_writes_a_table_csv_and_json(tiny_base_checkpoint: Path, tmp_path: Path, capsys):
    bundle = write_dclm_bundle(tmp_path)
    assert main(["base-eval", "--bundle", str(bundle), "--max-per-task", "2", "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "CORE" in out and "jeopardy" in out
    home = Path(tiny_base_checkpoint).parents[3]
    rows = list(csv.reader((home / "eval" / "base_eval_tiny_step7.csv").read_text().splitlines()))
    assert [r[0] for r in rows] == ["task", "copa", "winogrande", "jeopardy", "CORE"]
    payload = json.loads((home / "eval" / "base_eval_tiny_step7.json").read_text())
    assert payload["step"] == 7 and payload["tag"] == "tiny" and payload["max_per_task"] == 2
    assert [t["items"] for t in payload["tasks"]] == [2, 1, 2]
    assert payload["core"] == pytest.approx(sum(t["centered"] for t in payload["tasks"]) / 3)


def test_base_eval_on_a_subset_of_tasks(tiny_base_checkpoint: Path, tmp_path: Path):
    bundle = write_dclm_bundle(tmp_path)
    assert main(["base-eval", "--bundle", str(bundle), "--tasks", "copa", "--device", "cpu"]) == 0
    payload = json.loads((Path(tiny_base_checkpoint).parents[3] / "eval" / "base_eval_tiny_step7.json").read_text())
    assert [t["label"] for t in payload["tasks"]] == ["copa"]


def test_base_eval_user_errors_are_one_line(picochat_home: Path, tmp_path: Path, capsys):
    assert main(["base-eval", "--bundle", str(tmp_path / "nowhere")]) == 2
    assert "--bundle" in capsys.readouterr().err
    bundle = write_dclm_bundle(tmp_path)
    assert main(["base-eval", "--bundle", str(bundle), "--tasks", "nope", "--device", "cpu"]) == 2
    assert main(["base-eval", "--bundle", str(bundle), "--device", "cpu"]) == 2  # no base checkpoint yet
    assert "no base checkpoint" in capsys.readouterr().err
    assert main(["base-eval", "--bundle", str(bundle), "--prepare-only", "--device", "cpu"]) == 0
