"""bench/recipe.py: its pure parts (evaluation rows, the reference's schedules and batch rules, the
compute multiplier) and one tiny end-to-end run against a stand-in reference checkout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the bench scripts import their siblings by file name

import recipe

from picochat.data.shards import write_shard


def test_whole_text_rows_score_every_token_but_the_first_once():
    docs = [[0, 5, 6, 7], [0, 8, 9], [0, 10, 11]]
    inputs, targets = recipe.whole_text_rows(docs, seq_len=4)
    stream = [t for d in docs for t in d]
    assert inputs.shape == targets.shape == (3, 4)  # 9 targets in rows of 4, the last padded
    assert targets.flatten().tolist() == stream[1:] + [-1] * 3
    assert inputs.flatten().tolist()[:len(stream) - 1] == stream[:-1]
    assert (inputs >= 0).all()  # padded inputs are a valid id; their targets are ignored


def test_doc_start_rows_take_the_first_seq_len_targets_of_each_document():
    docs = [[0, 1, 2, 3, 4, 5, 6], [0, 7]]
    inputs, targets = recipe.doc_start_rows(docs, seq_len=3)
    assert inputs.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert targets.tolist() == [[1, 2, 3], [7, -1, -1]]


def test_logits_loss_is_cross_entropy_per_token_with_ignored_targets_zero():
    logits = torch.randn(2, 3, 5)
    scorer = recipe.LogitsLoss(lambda x: logits)
    y = torch.tensor([[1, -1, 4], [0, 2, -1]])
    losses = scorer(torch.zeros(2, 3, dtype=torch.long), y)
    assert losses.shape == (2, 3) and losses[0, 1] == 0 and losses[1, 2] == 0
    assert torch.allclose(losses[0, 0], -torch.log_softmax(logits[0, 0], -1)[1])


def test_reference_schedules():
    n = 500
    assert recipe.ref_lr_multiplier(0, n) == pytest.approx(1 / 40) and recipe.ref_lr_multiplier(39, n) == 1.0
    assert recipe.ref_lr_multiplier(175, n) == 1.0  # the warmdown is the last round(0.65 * 500) = 325 steps
    assert recipe.ref_lr_multiplier(500, n) == pytest.approx(0.05)
    # Momentum: the warm-up to 0.97 takes precedence over the warmdown (which starts at step 175 here).
    assert recipe.ref_muon_momentum(0, n) == pytest.approx(0.85)
    assert recipe.ref_muon_momentum(200, n) == pytest.approx(0.85 + 0.12 * 0.5)
    assert recipe.ref_muon_momentum(450, 10_000) == 0.97
    assert recipe.ref_muon_momentum(400, n) == pytest.approx(0.97 - 0.07 * 225 / 325)
    assert recipe.ref_weight_decay(0, n, 0.4) == pytest.approx(0.4) and recipe.ref_weight_decay(250, n, 0.4) == pytest.approx(0.2)
    # While a wall-time run measures its speed, no decay has started.
    assert recipe.ref_lr_multiplier(300, recipe.UNFIXED_HORIZON) == 1.0


def test_reference_hyperparameters_scale_with_batch_and_rescaled_undoes_it():
    ref = recipe.ref_hyperparameters(4096, 5_000_000, 90_000_000, rescaled=False)
    full = recipe.ref_hyperparameters(4096, 5_000_000, 90_000_000, rescaled=True)
    assert ref["matrix_lr"] == pytest.approx(0.02 / math.sqrt(128)) and full["matrix_lr"] == 0.02
    assert full["embedding_lr"] == 0.3 and full["unembedding_lr"] == 0.008 and full["scalar_lr"] == 0.5
    assert ref["weight_decay"] == full["weight_decay"] == pytest.approx(0.28 / math.sqrt(128) * 18)


def test_tokens_to_reach_interpolates_in_log_tokens():
    curve = [(100, 3.0), (200, 2.0), (400, 1.5)]
    tokens, exact = recipe.tokens_to_reach(curve, 1.75)
    assert exact and tokens == pytest.approx(math.sqrt(200 * 400))
    assert recipe.tokens_to_reach(curve, 2.0) == (pytest.approx(200.0), True)
    assert recipe.tokens_to_reach(curve, 3.5) == (100.0, False)  # before the first point: an upper bound
    assert recipe.tokens_to_reach(curve, 1.0) is None


# A stand-in reference checkout: the interface bench/recipe.py uses (config, init, scaling counts,
# optimiser groups with 'kind', logits/loss forward, and a loader reading $NANOCHAT_BASE_DIR).
STAND_IN = {
    "__init__.py": "",
    "gpt.py": """
        from dataclasses import make_dataclass
        import torch
        import torch.nn.functional as F

        GPTConfig = make_dataclass("GPTConfig", ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head",
                                                 "n_embd", "window_pattern"])

        class GPT(torch.nn.Module):
            def __init__(self, config):
                super().__init__()
                self.config = config
                self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
                self.h = torch.nn.Linear(config.n_embd, config.n_embd, bias=False)
                self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)

            def init_weights(self):
                torch.nn.init.normal_(self.wte.weight)
                torch.nn.init.normal_(self.h.weight, std=0.1)
                torch.nn.init.zeros_(self.lm_head.weight)

            def num_scaling_params(self):
                return {"transformer_matrices": self.h.weight.numel(), "lm_head": self.lm_head.weight.numel()}

            def setup_optimizer(self, unembedding_lr, embedding_lr, matrix_lr, weight_decay, scalar_lr):
                groups = [dict(kind="adamw", params=[self.wte.weight, self.lm_head.weight], lr=embedding_lr),
                          dict(kind="muon", params=[self.h.weight], lr=matrix_lr, momentum=0.9,
                               weight_decay=weight_decay)]
                optimizer = torch.optim.SGD(groups)
                for group in optimizer.param_groups:
                    group["initial_lr"] = group["lr"]
                return optimizer

            def forward(self, idx, targets=None, loss_reduction="mean"):
                logits = self.lm_head(torch.relu(self.h(self.wte(idx)))).float()
                if targets is None:
                    return logits
                return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                                       reduction=loss_reduction)
    """,
    "dataloader.py": """
        import os
        from pathlib import Path
        import pyarrow.parquet as pq
        import torch

        def tokenizing_distributed_data_loader_bos_bestfit(tokenizer, B, T, split, device="cuda"):
            files = sorted((Path(os.environ["NANOCHAT_BASE_DIR"]) / "base_data_climbmix").glob("*.parquet"))
            files = files[:-1] if split == "train" else files[-1:]
            stream = []
            while True:
                for f in files:
                    texts = pq.read_table(f).column("text").to_pylist()
                    for ids in tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id()):
                        stream.extend(ids)
                        while len(stream) > B * T:
                            buf = torch.tensor(stream[:B * T + 1])
                            del stream[:B * T]
                            yield buf[:-1].view(B, T).to(device), buf[1:].view(B, T).to(device)
    """,
}
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "house", "river", "quick", "slow",
         "red", "blue", "and", "then"]


def tiny_corpus(directory: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (40,), generator=gen).tolist()) + "."
            for _ in range(120)]
    write_shard(directory / "shard_00000.parquet", docs[:100], row_group_size=32)
    write_shard(directory / "shard_val.parquet", docs[100:], row_group_size=32)
    return directory


def run_recipe(tmp_path: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    env.pop("PICOCHAT_DTYPE", None)
    cmd = [sys.executable, str(BENCH / "recipe.py"), "--data-dir", str(tiny_corpus(tmp_path / "data")),
           "--vocab", "300", "--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "16",
           "--device-batch-size", "2", "--total-batch-size", "32", "--steps", "5", "--eval-every", "2",
           "--loss-every", "2", "--curve-tokens", "32", "--threads", "1", "--dtype", "fp32", "--ref-compile", "off",
           "--progress-every", "1", "--scratch", str(tmp_path / "scratch"), "--out", str(tmp_path / "out.json"),
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)


def check_report(proc: subprocess.CompletedProcess, out: Path, systems: list[str]) -> dict:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ")
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    saved = json.loads(out.read_text())
    assert {k: saved[k] for k in report} == report and set(saved["runs"]["1"]) == set(systems)
    assert set(report["summary"]) == set(systems) and report["errors"] == []
    assert not any((out.parent / "scratch" / "runs").iterdir())  # this invocation's checkpoints are gone
    for system in systems:
        for mode in ("tokens", "wall"):
            row = report["summary"][system][mode]
            assert all(0 < row[k]["mean"] < 20 for k in ("val_bpb", "val_bpb_doc_starts", "curve_bpb"))
            assert row["tok_per_s"]["mean"] > 0 and row["seeds"] == 1
        run = saved["runs"]["1"][system]["tokens"]
        assert [p[0] for p in run["curve"]] == [2, 4, 5] and [p[1] for p in run["curve"]] == [64, 128, 160]
        assert [p[0] for p in run["train_loss"]] == [2, 4] and run["steps"] == 5
    return report


def stand_in_checkout(root: Path) -> Path:
    package = root / "reference" / "nanochat"
    package.mkdir(parents=True)
    for name, text in STAND_IN.items():
        (package / name).write_text(textwrap.dedent(text))
    return package.parent


@pytest.mark.slow
def test_recipe_bench_runs_picochat_and_a_stand_in_reference(tmp_path, picochat_home):
    proc = run_recipe(tmp_path, picochat_home, "--reference-dir", str(stand_in_checkout(tmp_path)))
    report = check_report(proc, tmp_path / "out.json", ["pico", "ref", "ref-rescaled"])
    runs = json.loads((tmp_path / "out.json").read_text())["runs"]["1"]
    # ref-rescaled's LRs are ref's times sqrt(2^19 / 32 tokens per step); the weight decay is the same.
    ratios = [b / a for a, b in zip(runs["ref"]["tokens"]["lrs"], runs["ref-rescaled"]["tokens"]["lrs"])]
    assert ratios == pytest.approx([math.sqrt(2**19 / 32)] * 2)
    assert runs["ref"]["tokens"]["hyperparameters"]["weight_decay"] == \
        runs["ref-rescaled"]["tokens"]["hyperparameters"]["weight_decay"]
    assert runs["pico"]["wall"]["same_as"] == "tokens"  # picochat's wall time is its tokens run's
    assert set(report["multiplier"]) == {"ref", "ref-rescaled"}
    assert set(report["multiplier"]["ref"]) == {"tokens", "wall"}
    assert "[seed 1 ref tokens] step" in proc.stdout and "compute multiplier vs ref (tokens)" in proc.stdout


@pytest.mark.slow
def test_recipe_bench_against_the_real_reference(tmp_path, picochat_home):
    reference = os.environ.get("PICOCHAT_REFERENCE_DIR")
    if not reference or not (Path(reference) / "nanochat" / "gpt.py").exists():
        pytest.skip("set PICOCHAT_REFERENCE_DIR to a reference (nanochat) checkout to run its part for real")
    proc = run_recipe(tmp_path, picochat_home, "--reference-dir", reference, "--systems", "pico", "ref",
                      "--wall-seconds", "2")
    check_report(proc, tmp_path / "out.json", ["pico", "ref"])


@pytest.mark.slow
def test_recipe_bench_without_a_reference_runs_picochat_alone_and_reuses_a_seed(tmp_path, picochat_home):
    proc = run_recipe(tmp_path, picochat_home, "--modes", "tokens")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert set(report["summary"]) == {"pico"} and report["multiplier"] == {}
    assert report["notes"] == ["reference runs skipped: no --reference-dir given"]
    first = json.loads((tmp_path / "out.json").read_text())
    (tmp_path / "seed1.json").write_text(json.dumps(first))
    proc = run_recipe(tmp_path, picochat_home, "--modes", "tokens", "--seeds", "1", "2",
                      "--reuse", str(tmp_path / "seed1.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seed 1: pico" not in proc.stdout and "seed 2: pico, tokens" in proc.stdout
    both = json.loads((tmp_path / "out.json").read_text())
    reused = both["runs"]["1"]["pico"]["tokens"]
    assert reused.pop("reused_from") == str(tmp_path / "seed1.json")
    assert both["runs"]["1"] == first["runs"]["1"] and both["summary"]["pico"]["tokens"]["seeds"] == 2
    assert both["summary"]["pico"]["tokens"]["val_bpb"]["values"][0] == first["summary"]["pico"]["tokens"]["val_bpb"]["mean"]


def test_reuse_refuses_a_results_file_of_another_configuration(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"config": {"depth": 4, "seeds": [1], "steps": 500, "systems": ["pico"]},
                                "runs": {"1": {}}}))
    assert recipe.reused_runs(path, {"depth": 4, "seeds": [1, 2], "steps": 500, "systems": ["pico", "ref"]}) == {1: {}}
    with pytest.raises(recipe.ConfigError, match="--reuse .* differs in depth, steps"):
        recipe.reused_runs(path, {"depth": 2, "seeds": [1, 2], "steps": 5, "systems": ["pico"]})


def test_reuse_takes_runs_by_system_and_mode_and_rerun_leaves_a_system_out(tmp_path):
    path = tmp_path / "old.json"
    runs = {"pico": {"tokens": {"val_bpb": 1.7}, "wall": {"error": "killed"}}, "ref": {"tokens": {"val_bpb": 1.8}},
            "ref-rescaled": {"tokens": {"val_bpb": 1.75}}}
    path.write_text(json.dumps({"config": {"steps": 500, "systems": list(runs), "modes": ["tokens", "wall"]},
                                "runs": {"1": runs}}))
    config = {"steps": 500, "systems": ["pico", "ref-rescaled"], "modes": ["tokens"]}
    got = recipe.reused_runs(path, config)[1]
    # a failed run is run again; a system this run does not ask for is left out; each run says where it came from
    assert got == {"pico": {"tokens": {"val_bpb": 1.7, "reused_from": str(path)}},
                   "ref-rescaled": {"tokens": {"val_bpb": 1.75, "reused_from": str(path)}}}
    assert recipe.reused_runs(path, config, rerun=("pico",))[1] == {"ref-rescaled": got["ref-rescaled"]}
    # other --pico-args are fine when picochat runs again, not otherwise
    path.write_text(json.dumps({"config": {"steps": 500, "pico_args": "--preset cpu", "systems": list(runs)},
                                "runs": {"1": runs}}))
    bestfit = {**config, "pico_args": "--preset cpu --loader bestfit"}
    assert recipe.reused_runs(path, bestfit, rerun=("pico",))[1] == {"ref-rescaled": got["ref-rescaled"]}
    with pytest.raises(recipe.ConfigError, match="differs in pico_args"):
        recipe.reused_runs(path, bestfit)
    with pytest.raises(recipe.ConfigError, match="differs in pico_args"):
        recipe.reused_runs(path, {**bestfit, "systems": ["pico", "ref-rescaled"]}, rerun=("ref-rescaled",))


def test_recipe_bench_flags_are_checked(tmp_path, capsys):
    bad = [(["--total-batch-size", "100"], "--total-batch-size 100 is not a multiple"),
           (["--rerun", "pico"], "give --reuse FILE or drop --rerun"),
           (["--rerun", "pico", "--reuse", "x.json"], "--rerun with wall runs needs --wall-seconds"),
           (["--eval-every", "900"], "--eval-every 900 must be between 1 and --steps 500"),
           (["--reference-dir", str(tmp_path)], "no nanochat/gpt.py there")]
    for argv, message in bad:
        with pytest.raises(SystemExit):
            recipe.parse_args(argv)
        assert message in capsys.readouterr().err
    proc = subprocess.run([sys.executable, str(BENCH / "recipe.py"), "--seq-len", "0"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2 and "--seq-len must be at least 1" in proc.stderr
    assert recipe.parse_args(["--pico-args=--preset cpu --recipe 2026"]).pico_args == "--preset cpu --recipe 2026"


def test_recipe_bench_wall_runs_without_picochats_tokens_run_need_wall_seconds(capsys):
    """The wall runs train for the seconds picochat's tokens run trained: without that run (not among
    --systems or --modes) and without --wall-seconds there is no budget. That was a KeyError from
    deep inside the run (--systems ref), or every wall run failing after the tokens runs; now it is
    refused in one line before anything runs."""
    for argv in (["--systems", "ref", "--modes", "tokens", "wall"], ["--systems", "ref-rescaled"],
                 ["--modes", "wall"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(argv)
        assert "--modes wall needs --wall-seconds" in capsys.readouterr().err
    assert recipe.parse_args(["--systems", "ref", "--modes", "wall", "--wall-seconds", "60"]).wall_seconds == 60
    with pytest.raises(SystemExit):
        recipe.parse_args(["--curve-tokens", "-1"])
    assert "--curve-tokens must be 0 (all) or more" in capsys.readouterr().err


def test_recipe_bench_saves_the_seeds_that_finished_when_a_later_one_is_stopped(tmp_path, monkeypatch, picochat_home):
    """A seed takes an hour or more: a run stopped in its second seed keeps the first one's runs in
    --out, marked partial, in the form --reuse reads."""
    from picochat.tokenizer import Tokenizer

    data = tiny_corpus(tmp_path / "data")
    tok_dir = tmp_path / "tok"
    Tokenizer.train([" ".join(WORDS)] * 20, 300).save(tok_dir)
    monkeypatch.setattr(recipe, "prepare_tokenizer", lambda args, data_dir, scratch: tok_dir)
    done = {"pico": {"tokens": {"steps": 5, "val_bpb": 2.0}}}

    def run_seed(args, ctx, seed, have=None):
        if seed == 2:
            raise KeyboardInterrupt  # stopped during the second seed
        return done

    monkeypatch.setattr(recipe, "run_seed", run_seed)
    out = tmp_path / "out.json"
    args = recipe.parse_args(["--data-dir", str(data), "--scratch", str(tmp_path / "scratch"), "--out", str(out),
                              "--seeds", "1", "2", "--modes", "tokens", "--dtype", "fp32", "--threads", "1"])
    with pytest.raises(KeyboardInterrupt):
        recipe.run_benchmark(args)
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and saved["runs"] == {"1": done} and saved["config"]["seeds"] == [1, 2]
    assert recipe.reused_runs(out, saved["config"])[1]["pico"]["tokens"]["val_bpb"] == 2.0
