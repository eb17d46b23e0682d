"""build_optimizers: every parameter in exactly one group, LRs, printing; a tiny model learns."""

from __future__ import annotations

import pytest
import torch

from picochat.model import GPTConfig, build_model
from picochat.optim import (
    AdamWGroup,
    Muon,
    assign_param_groups,
    build_optimizers,
    describe_params,
    muon_momentum,
)


def tiny_model():
    torch.manual_seed(0)
    return build_model(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, sequence_len=16),
                       "cpu")


def test_every_parameter_is_in_exactly_one_group(capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model()
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    seen = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    adamw, muon = optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, Muon)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    names = {n for g in adamw.param_groups for n in g["names"]}
    assert names == {"transformer.wte.weight", "lm_head.weight"}
    out = capsys.readouterr().out
    assert out.count("optim ") == 3
    assert "transformer.h.{0-1}.attn.c_q.weight" in out and "lm_head.weight" in out


def test_group_learning_rates_scale_with_width_and_carry_initial_lr() -> None:
    model = tiny_model()  # n_embd 32
    adamw, muon = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004,
                                   muon_momentum=0.85)
    scale = (32 / 768) ** -0.5
    by_name = {g["names"][0]: g for g in adamw.param_groups}
    assert by_name["transformer.wte.weight"]["lr"] == pytest.approx(0.2 * scale)
    assert by_name["lm_head.weight"]["lr"] == pytest.approx(0.004 * scale)
    assert by_name["lm_head.weight"]["betas"] == (0.8, 0.95) and by_name["lm_head.weight"]["eps"] == 1e-10
    (group,) = muon.param_groups
    assert group["lr"] == 0.02 and group["momentum"] == 0.85
    for opt in (adamw, muon):
        assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


def test_an_unknown_parameter_is_refused() -> None:
    model = tiny_model()
    model.extra_gain = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(RuntimeError, match="extra_gain"):
        assign_param_groups(model)


def test_describe_params_compacts_layer_indices() -> None:
    names = ["a.h.0.w", "a.h.1.w", "a.h.2.w", "a.h.0.v", "a.h.2.v", "lm_head.weight"]
    assert describe_params(names) == "a.h.{0-2}.w, a.h.{0,2}.v, lm_head.weight"


def test_optimizer_state_round_trips() -> None:
    model = tiny_model()
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx).backward()
    for opt in optimizers:
        opt.step()
    states = [opt.state_dict() for opt in optimizers]
    fresh = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    for opt, state in zip(fresh, states):
        opt.load_state_dict(state)
    buf = fresh[1].state[model.transformer.h[0].attn.c_q.weight]["momentum_buffer"]
    assert torch.equal(buf, optimizers[1].state[model.transformer.h[0].attn.c_q.weight]["momentum_buffer"])


def test_a_tiny_model_overfits_a_tiny_batch() -> None:
    model = tiny_model()
    optimizers = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (4, 17), generator=g)
    inputs, targets = data[:, :-1], data[:, 1:]
    losses = []
    for step in range(50):
        loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            for group in opt.param_groups:
                if "momentum" in group and isinstance(opt, Muon):
                    group["momentum"] = muon_momentum(step, warmup_steps=10)
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=0.05)
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_the_architecture_options_get_their_own_adamw_groups() -> None:
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, sequence_len=16,
                                  value_embeds=True, layer_lambdas=True, smear=True, backout=True), "cpu")
    groups = {k: [n for n, _ in v] for k, v in assign_param_groups(model).items()}
    assert groups["value_embeds"] == ["value_embeds.0.weight", "value_embeds.2.weight"]
    assert groups["resid_lambdas"] == ["resid_lambdas"] and groups["x0_lambdas"] == ["x0_lambdas"]
    assert groups["scalars"] == ["smear_gate", "smear_lambda", "backout_lambda"]
    assert {"transformer.h.0.attn.ve_gate", "transformer.h.2.attn.ve_gate"} <= set(groups["matrix"])  # Muon
    adamw, _ = build_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, weight_decay=0.03,
                                x0_lambdas=AdamWGroup(0.3, (0.9, 0.9), 0.1))
    by_name = {g["names"][0]: g for g in adamw.param_groups}
    scale = (32 / 768) ** -0.5
    expected = {"transformer.wte.weight": (0.2 * scale, (0.8, 0.95), 0.03),  # classic groups as they were
                "value_embeds.0.weight": (0.1 * scale, (0.8, 0.995), 0.01),
                "resid_lambdas": (0.005, (0.8, 0.95), 0.05), "x0_lambdas": (0.3, (0.9, 0.9), 0.1),
                "smear_gate": (0.2, (0.8, 0.95), 0.0)}
    for name, (lr, betas, wd) in expected.items():
        g = by_name[name]
        assert (g["lr"], g["initial_lr"], g["betas"], g["weight_decay"]) == (pytest.approx(lr), pytest.approx(lr),
                                                                            betas, wd), name
    assert len(adamw.param_groups) == 6
