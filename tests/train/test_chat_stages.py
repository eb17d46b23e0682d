"""Mid-training and SFT: collation, packing, masking, zero-token batches, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from picochat import checkpoint as ckpt
from picochat.cli import main
from picochat.data import PackedConversations, sft_collate
from picochat.model.gpt import GPTConfig, build_model
from picochat.tasks import TaskSequence, identity, load_task
from picochat.tokenizer import Tokenizer
from tests.train.conftest import make_documents


def test_sft_collate_spec_example():
    s1 = ([1, 2, 10, 3, 4, 20, 5], [0, 0, 0, 0, 0, 1, 1])
    s2 = ([1, 2, 10, 3, 4, 20, 20, 5], [0, 0, 0, 0, 0, 1, 1, 1])
    inputs, targets = sft_collate([s1, s2], pad_id=5)
    assert inputs.tolist() == [[1, 2, 10, 3, 4, 20, 5], [1, 2, 10, 3, 4, 20, 20]]
    assert targets.tolist() == [[-1, -1, -1, -1, 20, 5, -1], [-1, -1, -1, -1, 20, 20, 5]]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(make_documents(200, seed=5), vocab_size=300)


def _tool_conversation():
    return {"messages": [
        {"role": "user", "content": "What is 6 times 7?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                          {"type": "python", "text": "6*7"},
                                          {"type": "python_output", "text": "42"},
                                          {"type": "text", "text": "It is 42."}]},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]}


class ListTask:
    name = "list"

    def __init__(self, convs):
        self.convs = convs

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        return self.convs[i]


def test_packed_stream_has_bos_at_every_conversation_start(tok):
    task = ListTask([_tool_conversation(), {"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}]}] * 3)
    lengths = [len(tok.render_conversation(task[i])[0]) for i in range(len(task))]
    total = sum(lengths)
    packer = PackedConversations(task, tok, batch_size=1, seq_len=total - 1)
    x, y = next(packer)
    stream = torch.cat([x.flatten(), y.flatten()[-1:]]).tolist()
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert [i for i, t in enumerate(stream) if t == tok.bos_id] == starts
    assert (y >= 0).all()  # by default every token is a target (as the reference)


def test_mask_user_masks_exactly_user_and_tool_output_tokens(tok):
    conv = _tool_conversation()
    ids, mask = tok.render_conversation(conv)
    packer = PackedConversations(ListTask([conv]), tok, batch_size=1, seq_len=len(ids) - 1, mask_user=True)
    _, y = next(packer)
    expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert y.flatten().tolist() == expected
    # The masked targets are exactly the user turns, the tool output and the structural tokens around them.
    sp = tok.encode_special
    masked = [t for t, m in zip(ids, mask) if m == 0]
    assert tok.decode([t for t in masked if not tok.is_special(t)]) == "What is 6 times 7?42Thanks!"
    assert sp("output_start") in masked and sp("python_start") not in masked


def test_all_masked_micro_batch_gives_zero_loss_and_gradient():
    model = build_model(GPTConfig.from_depth(2, 300, aspect_ratio=32, head_dim=32, max_seq_len=16), torch.device("cpu"))
    x = torch.randint(0, 300, (2, 16))
    y = torch.full((2, 16), -1)
    loss = model(x, y, loss_reduction="sum") / max(1, int((y >= 0).sum()))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    mean = model(x, y)
    assert torch.isfinite(mean) and mean.item() == 0.0


def test_real_tasks_render_into_training_rows(tok):
    first, second = identity(stop=4), load_task("arithmetic", "train", size=4)
    seq = TaskSequence([first, second])
    convs = [seq[i] for i in range(len(seq))]
    assert convs == [first[i] for i in range(4)] + [second[i] for i in range(4)]  # one task after the other
    rows = [tok.render_conversation(conv, max_tokens=128) for conv in convs]
    assert len({tuple(ids) for ids, _ in rows}) == 8
    pad = tok.encode_special("assistant_end")
    inputs, targets = sft_collate(rows, pad)
    assert inputs.shape == targets.shape == (8, max(len(ids) for ids, _ in rows) - 1)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        assert inputs[r, :n].tolist() == ids[:-1] and (inputs[r, n:] == pad).all()
        assert targets[r, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert (targets[r, n:] == -1).all()
        # the assistant's tokens are trained on, up to its <|assistant_end|> (unless cut at 128 tokens)
        supervised = [t for t in targets[r].tolist() if t >= 0]
        assert supervised and (supervised[-1] == pad or len(ids) == 128)


@pytest.fixture
def base_ckpt(tiny_home):
    assert main(["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-iterations", "3",
                 "--sample-every", "-1", "--tag", "t"]) == 0
    return tiny_home


def _weights(stage, tag):
    steps = ckpt.list_steps(ckpt.run_dir(stage, tag))
    return steps[-1], load_file(str(ckpt.run_dir(stage, tag) / f"step_{steps[-1]}" / "model.safetensors"))


def _losses(home, stage, tag):
    return {r["step"]: r["loss"] for r in map(json.loads, (home / "logs" / f"{stage}-{tag}.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.parametrize("stage,extra", [("mid-train", ["--from-stage", "base", "--mask-user"]),
                                         ("sft", ["--from-stage", "base"])])
def test_chat_stage_resumes_bit_exactly(base_ckpt, stage, extra):
    name = "mid" if stage == "mid-train" else "sft"
    common = [stage, "--preset", "cpu-tiny", "--dtype", "fp32", "--from-tag", "t", "--save-every", "2",
              "--keep-last", "10", *extra]
    assert main(common + ["--tag", "straight"]) == 0
    assert main(common + ["--tag", "cut"]) == 0
    steps = ckpt.list_steps(ckpt.run_dir(name, "cut"))
    assert len(steps) >= 2, steps
    for s in steps[1:]:  # keep only the first periodic checkpoint, then resume from it
        shutil.rmtree(ckpt.run_dir(name, "cut") / f"step_{s}")
    assert main(common + ["--tag", "cut", "--resume"]) == 0
    (sa, a), (sb, b) = _weights(name, "straight"), _weights(name, "cut")
    assert sa == sb
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(base_ckpt, name, "straight") == _losses(base_ckpt, name, "cut")
    meta = json.loads((ckpt.run_dir(name, "cut") / f"step_{sb}" / "meta.json").read_text())
    assert meta["parent"]["stage"] == "base" and meta["stage"] == name


@pytest.mark.parametrize("argv,flag", [(["mid-train", "--total-batch-size", "0"], "--total-batch-size"),
                                       (["mid-train", "--total-batch-size", "-512"], "--total-batch-size"),
                                       (["sft", "--num-epochs", "0"], "--num-epochs")])
def test_chat_stage_batch_flags_below_one_are_flag_errors(picochat_home, capsys, argv, flag):
    assert main([*argv, "--preset", "cpu-tiny", "--from-stage", "base"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be >= 1" in err and "Traceback" not in err


def _random_conversations(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = make_documents(50, seed=seed)[0].split()
    return [{"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))},
                          {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 24)))}]}
            for _ in range(n)]


def test_padded_rows_count_real_tokens_and_fill_buckets(tok):
    from picochat.data.chat_batches import PaddedConversations, width_buckets

    task = ListTask(_random_conversations(24))
    exact = PaddedConversations(task, tok, 4, 128)
    bucketed = PaddedConversations(task, tok, 4, 128, bucket_widths=width_buckets(128))
    padded = 0
    for step in range(6):
        (x, y, real), (bx, by, breal) = next(exact), next(bucketed)
        # the batch's conversations in order: each row's inputs are its rendered tokens but the last
        lengths = [len(tok.render_conversation(task[4 * step + i], max_tokens=129)[0]) - 1 for i in range(4)]
        assert x.shape == (4, max(lengths))
        assert real == breal == sum(lengths)  # padding is not counted
        padded += x.numel() - real
        assert bx.shape[1] in (16, 32, 64, 128) and bx.shape[1] >= x.shape[1]
        assert torch.equal(bx[:, : x.shape[1]], x) and torch.equal(by[:, : y.shape[1]], y)
        assert (by[:, y.shape[1]:] == -1).all()  # the extra width is padding, never a target
    assert padded > 0  # rows of different lengths: some padding was there not to count


def test_compiled_sft_batches_compile_at_most_four_graphs(tok):
    """Rows of many widths, bucketed: dynamo traces one graph per bucket, not one per width."""
    from torch._dynamo.utils import counters

    from picochat.data.chat_batches import PaddedConversations, width_buckets

    torch._dynamo.reset()
    counters.clear()
    model = build_model(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                                  sequence_len=128), "cpu")
    compiled = torch.compile(model, backend="eager", dynamic=False)  # counts graphs without inductor's cost
    task = ListTask(_random_conversations(96, seed=3))
    batches = PaddedConversations(task, tok, 2, 128, bucket_widths=width_buckets(128))
    exact = PaddedConversations(task, tok, 2, 128)
    widths, exact_widths = set(), set()
    for _ in range(40):
        x, y, _ = next(batches)
        widths.add(x.shape[1])
        exact_widths.add(next(exact)[0].shape[1])
        compiled(x, y, loss_reduction="sum").backward()
    assert len(exact_widths) > 8 and len(widths) >= 2  # unbucketed, this would be a graph per width
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


@pytest.mark.parametrize("stage", ["mid-train", "sft"])
def test_chat_stage_time_budget_fixes_the_horizon(base_ckpt, stage):
    name = "mid" if stage == "mid-train" else "sft"
    assert main([stage, "--preset", "cpu-tiny", "--dtype", "fp32", "--from-stage", "base", "--from-tag", "t",
                 "--time-budget", "0.02", "--tag", "budget"]) == 0
    step, _ = _weights(name, "budget")
    meta = json.loads((ckpt.run_dir(name, "budget") / f"step_{step}" / "meta.json").read_text())
    assert meta["num_iterations"] == step >= 8  # the measured steps, then what the 1.2 s budget had left


def test_conversations_resume_at_another_world_size_from_the_earliest_unfinished(tok):
    from picochat.data.chat_batches import PaddedConversations

    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(10)]
    task = ListTask(convs)
    old = [PaddedConversations(task, tok, 1, 64, rank=r, world_size=2) for r in range(2)]
    for loader, steps in zip(old, (3, 2)):  # rank 0 has done conversations 0, 2, 4; rank 1: 1, 3
        for _ in range(steps):
            next(loader)
    states = [o.state_dict() for o in old]  # the earliest unfinished conversation is 5
    nxt = []
    for r in range(3):
        new = PaddedConversations(task, tok, 1, 64, rank=r, world_size=3)
        new.load_state_dict(new.reshard_state(states))
        nxt.append(new.walk.row(new.position)[1]["messages"][0]["content"])
    assert nxt == ["q6", "q7", "q5"]  # ranks 0, 1, 2 of 3 take 6, 7, 5: from 5 on, nothing skipped


def _meta(stage: str, tag: str) -> dict:
    run = ckpt.run_dir(stage, tag)
    return json.loads((run / f"step_{ckpt.list_steps(run)[-1]}" / "meta.json").read_text())


def test_a_later_stage_takes_the_muon_rule_its_parent_was_trained_with():
    from picochat.optim import MuonOptions
    from picochat.train.sft import SFTConfig

    recorded = {"muon": {**vars(MuonOptions()), "orthogonalizer": "polar_express", "normuon_beta2": 0.95}}
    assert SFTConfig().muon_options(recorded) == MuonOptions(orthogonalizer="polar_express", normuon_beta2=0.95)
    assert SFTConfig(muon="classic").muon_options(recorded) == MuonOptions()
    # a base checkpoint from before the rule was recorded: its flags say it
    flags = {"args": {"muon_orthogonalizer": "polar_express", "muon_ns_steps": 5, "muon_eq": True,
                      "muon_plus": True, "normuon": True, "normuon_beta2": 0.9, "cautious_wd": True}}
    assert SFTConfig().muon_options(flags) == MuonOptions(orthogonalizer="polar_express", row_equilibration=True,
                                                          renormalize=True, normuon_beta2=0.9,
                                                          cautious_weight_decay=True)
    assert SFTConfig().muon_options({"args": {"mix_scale": "cpu"}}) == MuonOptions()  # nothing recorded: classic


def test_the_cpu_presets_architecture_goes_through_mid_sft_and_chat(tiny_home, capsys):
    """The cpu preset pretrains with the 2026 architecture: mid-training, SFT and the chat command take it."""
    arch = ["--recipe", "2026", "--loader", "packed", "--batch-lr-scale", "none", "--warmup-steps", "1"]
    assert main(["base-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--num-iterations", "3",
                 "--sample-every", "-1", "--tag", "a26", *arch]) == 0
    config = json.loads((ckpt.run_dir("base", "a26") / "step_3" / "config.json").read_text())
    assert config["value_embeds"] and config["smear"] and config["window_pattern"] == "SSSL"
    for stage, parent in (("mid-train", "base"), ("sft", "mid")):
        assert main([stage, "--preset", "cpu-tiny", "--dtype", "fp32", "--from-stage", parent, "--from-tag", "a26",
                     "--tag", "a26"]) == 0
    _, weights = _weights("sft", "a26")
    assert "smear_lambda" in weights and all(torch.isfinite(w).all() for w in weights.values())
    # Muon's 2026 rule (Polar Express, MuonEq, Muon+, NorMuon, cautious decay) goes down the stages.
    muon = {stage: _meta(stage, "a26")["muon"] for stage in ("base", "mid", "sft")}
    assert muon["base"]["orthogonalizer"] == "polar_express" and muon["base"]["normuon_beta2"] == 0.9
    assert muon["mid"] == muon["sft"] == muon["base"]
    out = capsys.readouterr().out
    assert "orthogonalizer=polar_express" in out.split("mid mixture")[1]  # the optimiser line of mid-training
    assert main(["sft", "--preset", "cpu-tiny", "--dtype", "fp32", "--from-stage", "mid", "--from-tag", "a26",
                 "--tag", "a26c", "--muon", "classic"]) == 0
    assert _meta("sft", "a26c")["muon"]["orthogonalizer"] == "newton_schulz"
    capsys.readouterr()
    assert main(["chat", "--stage", "sft", "--tag", "a26", "--dtype", "fp32", "-p", "Hello", "--max-tokens", "8",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()


def test_mid_mask_user_step_loss_is_the_mean_over_every_supervised_token(base_ckpt, monkeypatch):
    """With --mask-user the micro-batches of a step supervise different numbers of tokens: the step's
    loss (and its gradient) is the mean over all of them, not the mean of the micro-batch means."""
    from picochat.train import mid_train

    seen = {}
    real_run_trainer = mid_train.run_trainer

    def spy(cfg, world, model, tokenizer, parent_meta, dtype, plan):
        b = plan.batches
        fresh = PackedConversations(b.walk.task, b.tokenizer, b.B, b.T, mask_user=True)
        seen["micro"] = [next(fresh) for _ in range(plan.grad_accum)]
        return real_run_trainer(cfg, world, model, tokenizer, parent_meta, dtype, plan)

    monkeypatch.setattr(mid_train, "run_trainer", spy)
    assert main(["mid-train", "--preset", "cpu-tiny", "--dtype", "fp32", "--from-stage", "base", "--from-tag", "t",
                 "--mask-user", "--tag", "masked"]) == 0
    micro = seen["micro"]
    counts = [int((y >= 0).sum()) for _, y in micro]
    assert len(micro) > 1 and len(set(counts)) > 1, counts
    model, _, _ = ckpt.load_checkpoint_dir(ckpt.find_checkpoint("base", "t"), "cpu")
    with torch.no_grad():
        nll = sum(model(x, y, loss_reduction="sum").double().item() for x, y in micro)
    assert _losses(base_ckpt, "mid", "masked")[1] == pytest.approx(nll / sum(counts), rel=1e-5)


def test_sft_tokens_per_step_is_every_steps_count_or_zero(base_ckpt):
    """The report counts a stage's tokens as steps x tokens_per_step; SFT's padded rows make the count
    vary from step to step, so its tokens_per_step must be 0 (as RL's), not rows x max_seq_len."""
    assert main(["sft", "--preset", "cpu-tiny", "--dtype", "fp32", "--from-stage", "base", "--from-tag", "t",
                 "--tag", "count"]) == 0
    per_step = _meta("sft", "count")["loop"]["tokens_per_step"]
    logged = [r["tokens"] for r in map(json.loads, (base_ckpt / "logs" / "sft-count.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(set(logged)) > 1  # padded rows: the real tokens of a step vary
    assert per_step == 0 or all(n == per_step for n in logged), (per_step, logged)


SFT_EPOCHS = 2
ODD_MIXTURE = 9  # 2 ranks: rank 0 walks 5 conversations per epoch, rank 1 walks 4


def sft_rank(rank: int, world: int, port: int, home: str) -> None:
    """One rank of `picochat sft` on gloo, over a mixture of an odd number of conversations."""
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PICOCHAT_HOME": home})
    torch.set_num_threads(1)
    from picochat.train import sft

    sft.build_mixture = lambda entries, source, seed=42: ListTask(_random_conversations(ODD_MIXTURE))
    if main(["sft", "--preset", "cpu-tiny", "--dtype", "fp32", "--from-stage", "base", "--from-tag", "t",
             "--num-epochs", str(SFT_EPOCHS), "--examples-per-step", "2", "--device-batch-size", "1",
             "--tag", "epochs"]) != 0:
        raise SystemExit(f"rank {rank} failed")


def test_sft_epochs_on_ranks_with_unequal_shares_neither_skip_nor_repeat(base_ckpt):
    """Each rank walks its own share of the mixture; the horizon must end every rank's walk within
    --num-epochs passes over its share (a rank with the smaller share must not start another pass
    while the other has not finished its second), and use the smaller share in full."""
    import torch.multiprocessing as mp

    from tests.train.test_distributed import free_port

    mp.start_processes(sft_rank, args=(2, free_port(), str(base_ckpt)), nprocs=2, start_method="spawn")
    run = ckpt.run_dir("sft", "epochs")
    state = ckpt.load_training_state(run / f"step_{ckpt.list_steps(run)[-1]}")
    positions = [r["loader"]["position"] for r in state["per_rank"]]
    shares = [len(range(r, ODD_MIXTURE, 2)) for r in range(2)]
    assert all(p <= SFT_EPOCHS * s for p, s in zip(positions, shares)), (positions, shares)
    assert min(positions) == SFT_EPOCHS * min(shares), (positions, shares)


def test_a_chat_stage_started_from_its_own_stage_does_not_replace_its_starting_checkpoint(base_ckpt, capsys):
    """SFT from an SFT checkpoint takes the parent's tag by default, i.e. the parent's run directory:
    a fresh run there deletes the checkpoint it started from as it saves. It must stop with a message."""
    common = ["sft", "--preset", "cpu-tiny", "--dtype", "fp32"]
    assert main(common + ["--from-stage", "base", "--from-tag", "t", "--tag", "first"]) == 0
    parent = ckpt.list_steps(ckpt.run_dir("sft", "first"))
    capsys.readouterr()
    assert main(common + ["--from-stage", "sft", "--from-tag", "first", "--save-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "--tag" in err and "Traceback" not in err, err
    assert ckpt.list_steps(ckpt.run_dir("sft", "first")) == parent
    # Under another tag it trains; --resume continues the parent's own run.
    assert main(common + ["--from-stage", "sft", "--from-tag", "first", "--tag", "second"]) == 0
    assert main(common + ["--from-stage", "sft", "--from-tag", "first", "--resume"]) == 0
