"""Checkpoints: `$PICOCHAT_HOME/checkpoints/<stage>/<tag>/step_<N>/`, written atomically.

Each step directory holds:
  model.safetensors  fp32 weights (names without a compiled model's `_orig_mod.` prefix)
  config.json        GPTConfig
  meta.json          step, stage, metrics, tokenizer hash, data fingerprint, world size, time
  tokenizer/         the tokenizer the model was trained with (self-describing checkpoints)
  state.pt           optimiser states, per-rank loader state and RNG, schedule position, loop
                     accumulators (only for resumable training checkpoints)

A step directory is first written as `.step_<N>.tmp-<pid>` and renamed when complete,
so a crash (even SIGKILL) mid-save never leaves a directory that looks complete;
leftover temp dirs are ignored and cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picochat.errors import DataError
from picochat.runtime import home

STAGES = ("base", "mid", "sft", "rl")
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoints_root() -> Path:
    return home() / "checkpoints"


def run_dir(stage: str, tag: str) -> Path:
    return checkpoints_root() / stage / tag


def list_steps(directory: Path) -> list[int]:
    """Completed steps in a run directory, ascending."""
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "meta.json").exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_tag(stage: str) -> str | None:
    """The tag of `stage` with the most recently written complete checkpoint."""
    root = checkpoints_root() / stage
    if not root.is_dir():
        return None
    best = None
    for tag_dir in root.iterdir():
        steps = list_steps(tag_dir)
        if steps:
            mtime = (tag_dir / f"step_{steps[-1]}" / "meta.json").stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, tag_dir.name)
    return best[1] if best else None


def find_checkpoint(stage: str, tag: str | None = None, step: int | None = None) -> Path:
    """Directory of a complete checkpoint, or a DataError saying how to make one."""
    if stage not in STAGES:
        raise DataError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    tag = tag or latest_tag(stage)
    if tag is None:
        raise DataError(f"no {stage} checkpoint under {checkpoints_root() / stage}; run that stage first")
    directory = run_dir(stage, tag)
    steps = list_steps(directory)
    if not steps:
        raise DataError(f"no complete checkpoint in {directory}; run the {stage} stage first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise DataError(f"{directory} has no step {step}; available steps: {steps}")
    return directory / f"step_{step}"


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the `_orig_mod.` prefix torch.compile adds, and make tensors contiguous fp32-or-own-dtype."""
    return {k.replace("_orig_mod.", ""): v.detach().contiguous() for k, v in state_dict.items()}


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    meta: dict,
    state: dict | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write step_<step> atomically (call on rank 0 only); prune to the newest `keep_last`."""
    from picochat.model.gpt import GPT  # noqa: F401  (config lives on the model)

    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = directory / f"step_{step}"
    tmp = directory / f".step_{step}.tmp-{os.getpid()}"
    tmp.mkdir()
    raw = model._orig_mod if hasattr(model, "_orig_mod") else model
    save_file(clean_state_dict(raw.state_dict()), str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(raw.config.to_dict(), indent=1))
    tokenizer.save(tmp / "tokenizer")
    if state is not None:
        torch.save(state, tmp / "state.pt")
    full_meta = {"step": step, "tokenizer_hash": tokenizer.hash, "saved_at": time.time(), **meta}
    (tmp / "meta.json").write_text(json.dumps(full_meta, indent=1, default=str))
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in list_steps(directory)[:-keep_last]:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)
    return final


def load_checkpoint_dir(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, meta) from one step directory."""
    from picochat.model.gpt import GPTConfig, build_model
    from picochat.tokenizer import Tokenizer

    path = Path(path)
    for name in ("model.safetensors", "config.json", "meta.json"):
        if not (path / name).exists():
            raise DataError(f"{path} is not a complete checkpoint (missing {name})")
    config = GPTConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = build_model(config, torch.device(device))
    weights = clean_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DataError(f"{path}/model.safetensors does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = Tokenizer.load(path / "tokenizer")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise DataError(f"{path}: tokenizer hash {tokenizer.hash} differs from the one trained with ({meta['tokenizer_hash']})")
    return model, tokenizer, meta


def load_model(stage: str, tag: str | None = None, step: int | None = None, device=None):
    """(model, tokenizer, meta) of a stage's checkpoint; newest tag and step unless given."""
    return load_checkpoint_dir(find_checkpoint(stage, tag, step), device or "cpu")


def save_model_only(directory: Path, model, tokenizer, meta: dict) -> Path:
    """A servable checkpoint without training state (e.g. for export or tests)."""
    step = int(meta.get("step", 0))
    return save_checkpoint(Path(directory), step, model, tokenizer, meta)


def load_training_state(path: Path) -> dict:
    state_path = Path(path) / "state.pt"
    if not state_path.exists():
        raise DataError(f"{path} has no state.pt: it is a model-only checkpoint and cannot be resumed")
    return torch.load(state_path, map_location="cpu", weights_only=False)
