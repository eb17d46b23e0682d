"""The speedrun's plan, markers and resume logic (the real end-to-end run is in test.sh)."""

from __future__ import annotations

import json

from picochat.cli import main
from picochat.data.shards import default_data_dir
from picochat.speedrun import plan, shards_needed


def test_plan_covers_the_pipeline_in_order(picochat_home):
    names = [s[0] for s in plan("cpu", rl=True, data_source="builtin", shards=0)]
    assert names == ["data", "tok-train", "tok-eval", "base-train", "base-loss", "base-eval", "mid-train",
                     "chat-eval-mid", "chat-probe-mid", "sft", "chat-eval-sft", "chat-probe-sft", "rl", "chat-eval-rl",
                     "chat-probe-rl", "report"]
    gpu = {n: c for n, c, _ in plan("d20", rl=False, data_source="fineweb-edu", shards=8)}
    assert gpu["data"] == ["data", "download", "--source", "fineweb-edu", "-n", "8"]
    assert "--resume" in gpu["base-train"] and "--preset" in gpu["base-train"]


def test_finished_stages_are_skipped_and_force_from_reruns(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    markers = tmp_path / "speedrun" / "cpu"
    markers.mkdir(parents=True)
    for name in ("data", "tok-train"):
        (markers / f"{name}.done").write_text(json.dumps({"seconds": 1.0}))
    assert main(["speedrun", "--preset", "cpu", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "data: done earlier, skipping" in out and "tok-eval: picochat tok-eval" in out
    assert main(["speedrun", "--preset", "cpu", "--dry-run", "--force-from", "tok-train"]) == 0
    out = capsys.readouterr().out
    assert "data: done earlier" in out and "tok-train: picochat tok-train" in out
    assert (markers / "tok-train.done").exists()  # a dry run changes nothing
    assert main(["speedrun", "--preset", "cpu", "--force-from", "nope"]) == 2


def test_force_from_trains_its_stages_from_scratch(tmp_path, monkeypatch, capsys):
    """--force-from re-runs training stages without --resume (with it, base-train would load its own
    final checkpoint and stop at once); the stages before it keep their markers; a failure says to
    continue without --force-from."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    markers = tmp_path / "speedrun" / "cpu"
    markers.mkdir(parents=True)
    for name in ("data", "tok-train", "tok-eval", "base-train", "base-loss", "base-eval", "mid-train"):
        (markers / f"{name}.done").write_text(json.dumps({"seconds": 1.0}))
    calls = []
    monkeypatch.setattr("picochat.speedrun.subprocess.call", lambda cmd, env: calls.append(cmd) or len(calls) - 1)
    assert main(["speedrun", "--preset", "cpu", "--force-from", "base-train"]) == 1  # base-train ok, base-loss fails
    assert [c[c.index("picochat") + 1] for c in calls] == ["base-train", "base-loss"]
    assert "--resume" not in calls[0]
    assert not (markers / "mid-train.done").exists() and (markers / "tok-eval.done").exists()
    assert "without --force-from" in capsys.readouterr().err
    (markers / "base-train.done").unlink()
    calls.clear()
    monkeypatch.setattr("picochat.speedrun.subprocess.call", lambda cmd, env: calls.append(cmd) or 1)
    assert main(["speedrun", "--preset", "cpu"]) == 1  # continuing after a crash: the stage resumes
    assert calls[0][calls[0].index("picochat") + 1] == "base-train" and "--resume" in calls[0]


def test_several_nodes_launch_torchrun_with_the_rendezvous_and_node_0_runs_the_rest(tmp_path, monkeypatch, capsys):
    import argparse

    from picochat.speedrun import launcher

    args = argparse.Namespace(nproc_per_node=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501)
    cmd = launcher(args)
    for flag in ("--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29501"):
        assert flag in cmd
    assert "--standalone" not in cmd
    assert "--standalone" in launcher(argparse.Namespace(**{**vars(args), "nnodes": 1, "node_rank": 0}))
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert main(["speedrun", "--preset", "cpu-tiny", "--dry-run", "--nnodes", "2", "--node-rank", "1"]) == 0
    out = capsys.readouterr().out
    assert "data: runs on node 0" in out and "tok-train: runs on node 0" in out
    assert "base-train: picochat base-train" in out
    assert main(["speedrun", "--preset", "cpu-tiny", "--dry-run", "--nnodes", "2", "--node-rank", "2"]) == 2
    assert "--node-rank 2 must be in 0 .. 1" in capsys.readouterr().err


def test_presets_carry_their_speedrun_settings_and_hub_shards_follow_the_horizon(capsys, tmp_path, monkeypatch):
    from picochat.config import PRESETS
    from picochat.speedrun import shards_needed

    for name, preset in PRESETS.items():
        assert {"data", "core", "chat", "loss"} <= set(preset["speedrun"]), name
    # d26 trains on more tokens than d20, d32 on more than d26: more shards, in proportion
    d20, d26, d32 = (shards_needed(p) for p in ("d20", "d26", "d32"))
    assert 100 < d20 < d26 < d32
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert main(["speedrun", "--preset", "d20", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data download --source fineweb-edu -n {d20}" in out
    assert main(["speedrun", "--preset", "d20", "--dry-run", "--shards", "7", "--run", "other"]) == 0
    assert "-n 7" in capsys.readouterr().out


def test_hub_data_is_what_the_tokenizer_and_pretraining_read(picochat_home):
    """Hub shards land in data/<source>/; every stage that reads shards is pointed there, not at the
    built-in corpus (absent on a GPU machine, or another corpus where an earlier cpu run left it)."""
    for source in ("fineweb-edu", "climbmix"):
        stages = {n: c for n, c, _ in plan("d20", rl=False, data_source=source, shards=8)}
        where = ["--data-dir", str(default_data_dir(source))]
        for name in ("tok-train", "tok-eval", "base-train", "base-loss"):
            cmd = stages[name]
            assert cmd[cmd.index("--data-dir"):][:2] == where, (source, name, cmd)
    builtin = {n: c for n, c, _ in plan("cpu", rl=False, data_source="builtin", shards=None)}
    assert not any("--data-dir" in c for c in builtin.values())
    # A time-budgeted preset on hub data still downloads a train shard besides the val shard.
    assert shards_needed("cpu") >= 1


def test_a_named_run_tags_every_checkpoint_it_writes_and_reads(tmp_path, monkeypatch, capsys):
    """Two runs of one preset keep apart: with --run NAME every training stage writes, and every later
    stage reads, checkpoints tagged NAME (without it, the second run's base-train would resume the
    first one's finished checkpoint under d<depth>)."""
    stages = {n: c for n, c, _ in plan("cpu", rl=True, data_source="builtin", shards=0, tag="ablation-1")}
    for name in ("base-train", "base-loss", "base-eval", "mid-train", "chat-eval-mid", "chat-probe-mid", "sft",
                 "chat-eval-sft", "chat-probe-sft", "rl", "chat-eval-rl", "chat-probe-rl"):
        cmd = stages[name]
        assert cmd[cmd.index("--tag") + 1] == "ablation-1", name
    for name in ("mid-train", "sft", "rl"):
        assert stages[name][stages[name].index("--from-tag") + 1] == "ablation-1", name
    plain = {n: c for n, c, _ in plan("cpu", rl=True, data_source="builtin", shards=0)}
    assert not any("--tag" in c or "--from-tag" in c for c in plain.values())

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert main(["speedrun", "--preset", "cpu", "--run", "ablation-1", "--dry-run"]) == 0
    assert "base-train --preset cpu --tag ablation-1 --resume" in capsys.readouterr().out
    assert (tmp_path / "speedrun" / "ablation-1").is_dir()
    assert main(["speedrun", "--preset", "cpu", "--run", "../x", "--dry-run"]) == 2
    assert "--run '../x'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr("picochat.speedrun.subprocess.call", lambda cmd, env: 0)
    assert main(["speedrun", "--preset", "cpu", "--run", "ablation-1"]) == 0
    assert "picochat chat --stage sft --tag ablation-1" in capsys.readouterr().out
