"""The report card renders from a real cpu-tiny base run, and from whatever other stages exist."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from picochat.cli import main
from picochat.report.report import build_report, fmt_duration, latest_segment, read_jsonl, resolve_names
from picochat.tokenizer import Tokenizer
from tests.train.conftest import build_corpus, make_documents

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A $PICOCHAT_HOME holding a 6-step cpu-tiny base run (tag d2), made once for the module."""
    root = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("PICOCHAT_HOME", str(root))
    try:
        build_corpus(root)
        Tokenizer.train(make_documents(300, seed=1), vocab_size=320).save(root / "tokenizer")
        # No samples (--sample-every 0) and one batch of val bpb: the report needs the records, not quality.
        assert main(["base-train", "--preset", "cpu-tiny", "--num-iterations", "6", "--dtype", "fp32",
                     "--sample-every", "0", "--eval-every", "-1", "--eval-tokens", "512"]) == 0
    finally:
        mp.undo()
    return root


@pytest.fixture
def home(base_run, tmp_path, monkeypatch) -> Path:
    """A private copy of the base run, so each test can add stages and evals of its own."""
    root = tmp_path / "home"
    shutil.copytree(base_run, root, ignore=shutil.ignore_patterns("data"))
    monkeypatch.setenv("PICOCHAT_HOME", str(root))
    monkeypatch.delenv("PICOCHAT_RUN", raising=False)
    return root


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def fake_stage(root: Path, stage: str, step: int, metrics: dict, log: list[dict] | None = None) -> None:
    """A checkpoint directory of `stage` for run d2 (weights copied from base), with its meta and log."""
    src = root / "checkpoints" / "base" / "d2" / "step_6"
    dst = root / "checkpoints" / stage / "d2" / f"step_{step}"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("state.pt"))
    meta = json.loads((dst / "meta.json").read_text())
    meta.update({"step": step, "stage": stage, "num_iterations": step, "metrics": metrics,
                 "parent": {"stage": "base", "tag": "d2", "step": 6}})
    write_json(dst / "meta.json", meta)
    if log:
        (root / "logs" / f"{stage}-d2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


def summary_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("metric",):
            rows[cells[0]] = cells[1:]
    return rows


def test_report_of_a_base_run(home, capsys):
    assert main(["report"]) == 0  # no --run: the newest tag, d2
    assert "reports/d2/report.md" in capsys.readouterr().out
    report = home / "reports" / "d2" / "report.md"
    text = report.read_text()
    for heading in ("# picochat report: `d2`", "## Summary", "## Environment", "## Code size", "## Tokenizer",
                    "## Base model (pretraining)"):
        assert heading in text
    assert "## Mid-training" not in text and "## Reinforcement" not in text  # absent stages: no sections
    assert "| steps | 6 of 6 |" in text
    assert "| tokens | 3,072 |" in text  # 6 steps x 512 tokens (cpu-tiny total batch)
    assert "eval: val_bpb" in text and "final smooth loss" in text and "MFU % (timed steps)" in text
    assert "Python" in text and "torch" in text and "CPU" in text
    assert "![base training](base_training.png)" in text
    width, height = png_size(home / "reports" / "d2" / "base_training.png")
    assert width > 300 and height > 200
    rows = summary_rows(text)
    assert set(rows) == {"CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"}
    assert all(cell == "-" for cells in rows.values() for cell in cells)
    latest = (home / "reports" / "latest.md").read_text()
    assert "![base training](d2/base_training.png)" in latest  # image links still resolve one level up


def test_report_with_all_stages_and_evals(home):
    eval_dir = home / "eval"
    write_json(eval_dir / "base_loss_d2_step6.json", {"train_bpb": 2.5, "val_bpb": 2.6,
                                                      "samples": [{"prompt": "The capital of France is",
                                                                   "completion": " Paris"}]})
    write_json(eval_dir / "base_eval_d2_step6.json", {"core": 0.1234, "seconds": 12.0, "tasks": [
        {"label": "hellaswag", "num_fewshot": 10, "items": 50, "accuracy": 0.3, "random_baseline": 0.25,
         "centered": 0.0667},
        {"label": "arc_easy", "num_fewshot": 10, "items": 50, "accuracy": 0.5, "random_baseline": 0.25,
         "centered": 0.3333}]})
    write_json(home / "tokenizer" / "tok_eval.json", {"references": {"gpt2": {"vocab_size": 50257}}, "rows": [
        {"text": "news", "bytes": 1000, "ours": {"tokens": 400, "bytes_per_token": 2.5},
         "gpt2": {"tokens": 250, "bytes_per_token": 4.0, "relative_diff_pct": -60.0}}]})
    mid_log = [{"step": 0, "eval": {"val_bpb": 1.9}}] + [
        {"step": s, "loss": 2.0 - 0.1 * s, "smooth_loss": 2.0 - 0.05 * s, "dt": 0.5, "tok_per_s": 100.0, "mfu": 1.0}
        for s in range(1, 5)] + [{"step": 4, "eval": {"val_bpb": 1.5}}]
    fake_stage(home, "mid", 4, {"val_bpb": 1.5}, mid_log)
    fake_stage(home, "sft", 3, {"val_loss": 1.1})
    rl_log = [{"step": s, "reward": 0.1 * s, "solved": 0.1 * s, "loss": 0.0, "dt": 2.0} for s in range(1, 4)]
    fake_stage(home, "rl", 3, {"pass@1": 0.2}, rl_log)
    chat = {"ARC-Easy": 0.40, "ARC-Challenge": 0.30, "MMLU": 0.31, "GSM8K": 0.02, "HumanEval": 0.05,
            "SpellingBee": 0.5, "ChatCORE": 0.1111,
            "details": {"MMLU": {"items": 100, "baseline": 0.25, "centered": 0.08}}, "run": {"seconds": 30.0}}
    write_json(eval_dir / "chat_eval_mid_d2_step4.json", {**chat, "MMLU": 0.29})
    write_json(eval_dir / "chat_eval_sft_d2_step2.json", {**chat, "MMLU": 0.0})  # older step: ignored
    write_json(eval_dir / "chat_eval_sft_d2_step3.json", chat)
    write_json(eval_dir / "chat_eval_rl_d2_step3.json", {"GSM8K": 0.07, "details": {}, "run": {"seconds": 5.0}})

    text = build_report("d2").read_text()
    rows = summary_rows(text)
    #                  BASE      MID       SFT       RL
    assert rows["CORE"] == ["0.1234", "-", "-", "-"]
    assert rows["MMLU"] == ["-", "0.2900", "0.3100", "-"]
    assert rows["GSM8K"] == ["-", "0.0200", "0.0200", "0.0700"]
    assert rows["ChatCORE"] == ["-", "0.1111", "0.1111", "-"]
    for heading in ("## Mid-training", "## Supervised fine-tuning (SFT)", "## Reinforcement learning (RL)",
                    "### Base loss (step 6)", "### CORE (base-eval, step 6", "### Chat evaluation (step 3"):
        assert heading in text
    assert "The capital of France is' Paris'" in text
    assert "| hellaswag | 10 | 50 | 0.3000 | 0.2500 | 0.0667 |" in text
    assert "| news | 1,000 | 2.5000 | 4.0000 | -60.0% |" in text
    assert "| started from | base/d2 step 6 |" in text
    assert "final reward" in text  # RL plots and reports its reward
    for plot in ("base_training", "mid_training", "rl_training", "base_eval_core", "chat_eval"):
        assert f"({plot}.png)" in text
        png_size(home / "reports" / "d2" / f"{plot}.png")
    assert not (home / "reports" / "d2" / "sft_training.png").exists()  # no SFT log: no curve
    # Wall time: base steps + mid 4 x 0.5 s + RL 3 x 2 s + base-eval 12 s + chat evals 30 + 30 + 5 s.
    # The base run's own total when its checkpoint records one (the loop's wall time: evals and saves
    # included), else the sum of its step times.
    steps = (home / "checkpoints" / "base" / "d2").glob("step_*/meta.json")
    base_meta = json.loads(max(steps, key=lambda m: int(m.parent.name.removeprefix("step_"))).read_text())
    base_seconds = base_meta.get("metrics", {}).get("wall_time_s")
    if base_seconds is None:
        base_seconds = sum(r["dt"] for r in latest_segment(read_jsonl(home / "logs" / "base-d2.jsonl"))[0])
    expected = fmt_duration(base_seconds + 2.0 + 6.0 + 12.0 + 30.0 + 30.0 + 5.0)
    assert f"Total wall time: **{expected}** (sum of the recorded training and eval times)" in text


def test_speedrun_name_markers_and_wall_time(home, monkeypatch, capsys):
    """Under `picochat speedrun --preset cpu-tiny` the run is named cpu-tiny, its checkpoints d2."""
    markers = home / "speedrun" / "cpu-tiny"
    markers.mkdir(parents=True)
    now = time.time()
    (markers / "started_at").write_text(str(now - 3725))  # 1 h 02 min 05 s before the last stage ended
    for name, seconds in (("data", 5.0), ("tok-train", 20.0), ("base-train", 3600.0)):
        (markers / f"{name}.done").write_text(json.dumps({"seconds": seconds, "finished_at": now, "command": []}))
    monkeypatch.setenv("PICOCHAT_RUN", "cpu-tiny")
    assert main(["report"]) == 0
    assert "reports/cpu-tiny/report.md" in capsys.readouterr().out
    text = (home / "reports" / "cpu-tiny" / "report.md").read_text()
    assert "checkpoint tag `d2`" in text and "## Base model (pretraining)" in text
    assert "Total wall time: **1h 02m 05s** (from the run start" in text
    assert "## Pipeline timing (speedrun)" in text and "| base-train | 1h 00m 00s |" in text
    assert "| **total** | 1h 00m 25s |" in text
    latest = (home / "reports" / "latest.md").read_text()
    assert "(cpu-tiny/base_training.png)" in latest
    # Without a start file: the sum of the speedrun's stage times.
    (markers / "started_at").unlink()
    text = build_report().read_text()
    assert "Total wall time: **1h 00m 25s** (sum of the speedrun's stage times)" in text


def test_report_with_nothing_but_a_name(picochat_home, monkeypatch):
    monkeypatch.delenv("PICOCHAT_RUN", raising=False)
    (picochat_home / "speedrun" / "empty").mkdir(parents=True)  # a run that has started, nothing more
    text = build_report("empty").read_text()
    assert "No checkpoints, logs or evals found for tag `empty`" in text
    assert "## Environment" in text and "## Base model" not in text
    assert main(["report", "--run", "../escape"]) == 2
    assert main(["report", "--tag", "a/b"]) == 2


def test_latest_segment_keeps_only_the_newest_run():
    first = [{"step": 0, "eval": {"v": 9.0}}] + [{"step": s, "loss": 10.0 + s} for s in range(1, 6)] + \
        [{"step": 5, "eval": {"v": 8.0}}]
    # Resume from the step-3 checkpoint (the crash lost steps 4-5's checkpoint but not their log lines).
    resumed = [{"step": s, "loss": 20.0 + s} for s in range(4, 8)] + [{"step": 7, "eval": {"v": 7.0}}]
    steps, evals = latest_segment(first + resumed)
    assert [r["loss"] for r in steps] == [11.0, 12.0, 13.0, 24.0, 25.0, 26.0, 27.0]
    assert [e["eval"]["v"] for e in evals] == [9.0, 7.0]
    # A fresh run with the same tag replaces everything before it.
    fresh = [{"step": 0, "eval": {"v": 5.0}}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    steps, evals = latest_segment(first + resumed + fresh)
    assert [r["loss"] for r in steps] == [1.0, 0.5]
    assert [e["eval"]["v"] for e in evals] == [5.0]
    # A fresh run without a step-0 eval also drops the old evals.
    steps, evals = latest_segment(first + [{"step": 1, "loss": 3.0}])
    assert [r["loss"] for r in steps] == [3.0] and evals == []


def test_an_unknown_run_is_refused_and_latest_is_kept(home, capsys, monkeypatch):
    monkeypatch.delenv("PICOCHAT_RUN", raising=False)
    assert main(["report"]) == 0
    latest = home / "reports" / "latest.md"
    before = latest.read_text()
    capsys.readouterr()
    assert main(["report", "--run", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --run 'bogus': no checkpoints") and "omit --run" in err and "\n" not in err
    assert latest.read_text() == before and not (home / "reports" / "bogus").exists()


def test_an_explicit_tag_is_the_one_reported(picochat_home, monkeypatch):
    """--tag names the checkpoints to read, also when another tag's checkpoint is newer."""
    monkeypatch.delenv("PICOCHAT_RUN", raising=False)
    for tag, mtime in (("old", 1_000_000.0), ("new", 2_000_000.0)):
        meta = picochat_home / "checkpoints" / "base" / tag / "step_5" / "meta.json"
        write_json(meta, {"step": 5})
        os.utime(meta, (mtime, mtime))
    assert resolve_names(picochat_home, None, None) == ("new", "new")
    assert resolve_names(picochat_home, None, "old") == ("old", "old")
    (picochat_home / "speedrun" / "cpu").mkdir(parents=True)
    assert resolve_names(picochat_home, "cpu", "old") == ("cpu", "old")


def test_throughput_is_the_timed_steps_tokens_over_their_seconds(home):
    """tokens/s and MFU cover the steps the loop timed (a resumed process's warm-up steps are not, whatever
    their number) and weigh each step by its seconds: 200 tokens in 4 timed seconds is 50 tokens/s, where a
    mean of the per-step rates of steps 4-8 read 32.7."""
    plan = [(1, 10.0, False), (2, 10.0, False), (3, 10.0, False), (4, 1.0, True),
            (5, 10.0, False), (6, 10.0, False), (7, 10.0, False), (8, 3.0, True)]  # resumed after step 4
    log = [{"step": s, "loss": 2.0, "smooth_loss": 2.0, "dt": dt, "timed": timed, "tokens": 100,
            "tok_per_s": 100 / dt, "mfu": 10 / dt} for s, dt, timed in plan]
    fake_stage(home, "mid", 8, {"val_bpb": 1.5}, log)
    assert main(["report"]) == 0
    mid = (home / "reports" / "d2" / "report.md").read_text().split("## Mid-training", 1)[1].split("\n## ", 1)[0]
    assert "| tokens/s (timed steps) | 50.0000 |" in mid, mid
    assert "| MFU % (timed steps) | 5.0000 |" in mid, mid


def test_a_stage_whose_step_size_varies_reports_the_sum_of_its_steps_tokens(home):
    """SFT's padded rows and RL's rollouts give every step its own token count (tokens_per_step 0): the
    report sums the step records, and shows no count where a step's record is missing."""
    log = [{"step": s, "loss": 2.0, "smooth_loss": 2.0, "dt": 1.0, "timed": True, "tokens": n}
           for s, n in ((1, 100), (2, 120), (3, 90))]
    fake_stage(home, "sft", 3, {"val_loss": 1.5}, log)
    meta_path = home / "checkpoints" / "sft" / "d2" / "step_3" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["loop"] = {**(meta.get("loop") or {}), "tokens_per_step": 0}
    write_json(meta_path, meta)

    def sft_section() -> str:
        assert main(["report"]) == 0
        return (home / "reports" / "d2" / "report.md").read_text().split("## Supervised fine-tuning", 1)[1].split("\n## ", 1)[0]

    assert "| tokens | 310 |" in sft_section()
    (home / "logs" / "sft-d2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log[1:]))
    assert "| tokens |" not in sft_section()


def test_tokens_after_a_resume_that_changed_the_batch_are_the_steps_own(home):
    """Steps 1-3 of 256 tokens, then a resume with --total-batch-size 512 for steps 4-6: 2,304 tokens (and
    FLOPs from them). The count was steps x the newest checkpoint's batch: 3,072."""
    log = [{"step": s, "loss": 2.0, "smooth_loss": 2.0, "dt": 1.0, "timed": True, "tokens": 256 if s <= 3 else 512}
           for s in range(1, 7)]
    (home / "logs" / "base-d2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    assert main(["report"]) == 0
    base = (home / "reports" / "d2" / "report.md").read_text().split("## Base model", 1)[1].split("\n## ", 1)[0]
    meta = json.loads((home / "checkpoints" / "base" / "d2" / "step_6" / "meta.json").read_text())
    assert meta["loop"]["tokens_per_step"] == 512
    assert "| tokens | 2,304 |" in base, base
    flops_per_token = int(base.split("| FLOPs per token | ")[1].split(" |")[0].replace(",", ""))
    assert f"| training FLOPs | {flops_per_token * 2304:.3e} |" in base, base
