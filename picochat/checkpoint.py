"""Checkpoints: `$PICOCHAT_HOME/checkpoints/<stage>/<tag>/step_<N>/`, written atomically.

Each step directory holds:
  model.safetensors  fp32 weights (names without a compiled model's `_orig_mod.` prefix)
  config.json        GPTConfig
  meta.json          step, stage, metrics, tokenizer hash, data fingerprint, world size, time
  tokenizer/         the tokenizer the model was trained with (self-describing checkpoints)
  state.pt           optimiser states, per-rank loader state and RNG, schedule position, loop
                     accumulators (only for resumable training checkpoints)

meta.json records the sha256 of model.safetensors, config.json and state.pt ("checksums"),
computed from the bytes as they are written (no second read); loading verifies them, so a
flipped or cut byte is a clear error, and `--resume` skips a damaged newest step for the
previous good one (`newest_resumable_step`). A full disk during a save leaves the previous
checkpoints as they were and says "no space left on <dir>".

A step directory is first written as `.step_<N>.tmp-<pid>` and renamed when complete,
so a crash (even SIGKILL) mid-save never leaves a directory that looks complete;
leftover temp dirs are ignored and cleaned on the next save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from picochat.config import STAGES
from picochat.data.registry import sha256_file
from picochat.errors import ConfigError, DataError
from picochat.model.gpt import GPTConfig, build_model
from picochat.runtime import home, warn
from picochat.tokenizer import Tokenizer

_STEP_RE = re.compile(r"^step_(0|[1-9][0-9]*)$")  # as save_checkpoint names them (ASCII, no leading 0)


def checkpoints_root() -> Path:
    return home() / "checkpoints"


def run_dir(stage: str, tag: str) -> Path:
    return checkpoints_root() / stage / tag


def list_steps(directory: Path) -> list[int]:
    """Completed steps in a run directory, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir()
                  if (m := _STEP_RE.match(p.name)) and (p / "meta.json").exists())


def latest_tag(stage: str) -> str | None:
    """The tag of `stage` with the most recently written complete checkpoint."""
    root = checkpoints_root() / stage
    if not root.is_dir():
        return None
    newest = {tag_dir.name: steps[-1] for tag_dir in root.iterdir() if (steps := list_steps(tag_dir))}
    return max(newest, key=lambda tag: (root / tag / f"step_{newest[tag]}" / "meta.json").stat().st_mtime,
               default=None)


def find_checkpoint(stage: str, tag: str | None = None, step: int | None = None) -> Path:
    """Directory of a complete checkpoint, or a DataError saying how to make one."""
    if stage not in STAGES:
        raise DataError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    tag = tag or latest_tag(stage)
    if tag is None:
        raise DataError(f"no {stage} checkpoint under {checkpoints_root() / stage}; run that stage first")
    directory = run_dir(stage, tag)
    if not (steps := list_steps(directory)):
        raise DataError(f"no complete checkpoint in {directory}; run the {stage} stage first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise DataError(f"{directory} has no step {step}; available steps: {steps}")
    return directory / f"step_{step}"


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the `_orig_mod.` prefix torch.compile adds, and make tensors contiguous fp32-or-own-dtype."""
    return {k.replace("_orig_mod.", ""): v.detach().contiguous() for k, v in state_dict.items()}


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, tokenizer, meta: dict,
                    state: dict | None = None, keep_last: int | None = None) -> Path:
    """Write step_<step> atomically (call on rank 0 only); keep it and the `keep_last`-1 steps before it
    (0: every step before it), and drop every step after it. Without `keep_last` nothing is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for replaced in directory.glob(".step_*.old-*"):  # a re-save stopped between its two renames
        kept = directory / replaced.name[1:].split(".old-")[0]
        if kept.exists():
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(replaced, kept)
    final = directory / f"step_{step}"
    tmp = directory / f".step_{step}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        raw = model._orig_mod if hasattr(model, "_orig_mod") else model
        checksums = {"model.safetensors": write_file(tmp / "model.safetensors",
                                                     save_safetensors(clean_state_dict(raw.state_dict()))),
                     "config.json": write_file(tmp / "config.json", json.dumps(raw.config.to_dict(), indent=1).encode())}
        tokenizer.save(tmp / "tokenizer")
        if state is not None:
            with open(tmp / "state.pt", "wb") as f:
                writer = HashingWriter(f)
                torch.save(state, writer)
            if writer.error is not None:
                raise writer.error
            checksums["state.pt"] = writer.sha256.hexdigest()
        full_meta = {"step": step, "tokenizer_hash": tokenizer.hash, "saved_at": time.time(), **meta,
                     "checksums": checksums}
        write_file(tmp / "meta.json", json.dumps(full_meta, indent=1, default=str).encode())
    except BaseException as e:  # a full disk, or a second Ctrl-C: no half-written step stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        cause = e if isinstance(e, OSError) else getattr(e, "__context__", None) or e
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on {directory} while saving step {step}; the previous checkpoints are "
                            "intact: free some space (or set PICOCHAT_HOME to a bigger disk) and --resume") from e
        raise
    replaced = directory / f".step_{step}.old-{os.getpid()}"
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        # The old copy is moved aside, not deleted, until the new one is in place: a crash in between
        # leaves it whole, and the next save puts it back.
        os.replace(final, replaced)
    os.replace(tmp, final)
    shutil.rmtree(replaced, ignore_errors=True)
    if keep_last is not None:  # a training save
        # Keep this step and the keep_last-1 before it (0: every one). Higher steps are an earlier run's under
        # the same tag (this one started fresh or from an older step): left there, --resume would continue them.
        steps = list_steps(directory)
        older = [s for s in steps if s < step]
        pruned = older[:max(0, len(older) - (keep_last - 1))] if keep_last else []
        for old in pruned + [s for s in steps if s > step]:
            shutil.rmtree(directory / f"step_{old}", ignore_errors=True)
    return final


class HashingWriter:
    """A binary file wrapper that hashes what goes through it (torch.save writes sequentially)."""

    def __init__(self, file):
        self.file, self.sha256, self.error = file, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            written = write_chunk(self.file, data)
        except OSError as e:
            self.error = e  # torch wraps it in a RuntimeError without the errno; keep it to report
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def write_chunk(file, data) -> int:
    """The one place checkpoint bytes reach the disk (tests simulate a full disk here)."""
    return file.write(data)


def write_file(path: Path, data: bytes) -> str:
    """Write `data` to `path`; its sha256."""
    with open(path, "wb") as f:
        write_chunk(f, data)
    return hashlib.sha256(data).hexdigest()


def verify_file(path: Path, meta: dict) -> None:
    """Check a checkpoint file against the sha256 meta.json recorded for it (streamed: no copy in memory;
    the load that follows reads it from the page cache)."""
    expected = (meta.get("checksums") or {}).get(path.name)
    if expected is None:
        return  # written before checksums
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); the checkpoint is incomplete") from e
    if digest != expected:
        raise DataError(f"{path} does not match its checksum in meta.json (damaged or cut bytes); "
                        "re-run the stage or load an earlier --step")


def read_json_object(path: Path) -> dict:
    """A JSON object from a checkpoint file, or a DataError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); the checkpoint is damaged: re-run the stage "
                        "or load an earlier --step") from e
    if not isinstance(value, dict):
        raise DataError(f"{path} holds a JSON {type(value).__name__}, not an object; the checkpoint is damaged")
    return value


def load_weights(path: Path, meta: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The verified weights of a step directory, cleaned of compile prefixes."""
    file = Path(path) / "model.safetensors"
    verify_file(file, meta)
    try:
        weights = load_file(str(file), device=str(device))
    except (SafetensorError, ValueError, OSError) as e:
        raise DataError(f"{file} is not a readable safetensors file ({e}); "
                        "re-run the stage or load an earlier --step") from e
    return clean_state_dict(weights)


def load_weights_into(model: torch.nn.Module, path: Path, meta: dict, device: torch.device | str = "cpu") -> None:
    """Load a step's weights into `model`, refusing a checkpoint of another shape by name."""
    ours = model.config.to_dict()
    # A field the checkpoint's config predates has its default value there (e.g. an option it did not have yet).
    saved = read_json_object(Path(path) / "config.json")
    verify_file(Path(path) / "config.json", meta)  # a damaged value can still be valid JSON
    config = {**type(model.config)().to_dict(), **saved}
    if differ := {k: (config[k], ours[k]) for k in ours if k in config and config[k] != ours[k]}:
        shown = ", ".join(f"{k} {old} there, {new} here" for k, (old, new) in differ.items())
        raise DataError(f"{path} holds a different model ({shown}); resume with the flags it was trained with "
                        "(e.g. the same --depth) or start a new --tag")
    model.load_state_dict(load_weights(path, meta, device))


def load_checkpoint_dir(path: Path, device: torch.device | str = "cpu"):
    """(model, tokenizer, meta) from one step directory."""
    path = Path(path)
    for name in ("model.safetensors", "config.json", "meta.json", "tokenizer"):
        if not (path / name).exists():
            raise DataError(f"{path} is not a complete checkpoint (missing {name})")
    meta = read_json_object(path / "meta.json")
    try:
        config = GPTConfig.from_dict(read_json_object(path / "config.json"))
        verify_file(path / "config.json", meta)  # before building: a damaged size could be huge
        model = build_model(config, torch.device(device))
    except (TypeError, ValueError, ConfigError) as e:
        raise DataError(f"{path}/config.json is not a model config ({e}); the checkpoint is damaged") from e
    weights = load_weights(path, meta, device)
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise DataError(f"{path}/model.safetensors does not match config.json ({str(e).splitlines()[-1].strip()})") from e
    if missing or unexpected:
        raise DataError(f"{path}/model.safetensors does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tokenizer = Tokenizer.load(path / "tokenizer")
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise DataError(f"{path}: tokenizer hash {tokenizer.hash} differs from the one trained with ({meta['tokenizer_hash']})")
    return model, tokenizer, meta


def load_model(stage: str, tag: str | None = None, step: int | None = None, device=None):
    """(model, tokenizer, meta) of a stage's checkpoint; newest tag and step unless given."""
    return load_checkpoint_dir(find_checkpoint(stage, tag, step), device or "cpu")


def save_model_only(directory: Path, model, tokenizer, meta: dict) -> Path:
    """A servable checkpoint without training state (e.g. for export or tests)."""
    return save_checkpoint(Path(directory), int(meta.get("step", 0)), model, tokenizer, meta)


def load_training_state(path: Path) -> dict:
    state_path = Path(path) / "state.pt"
    if not state_path.exists():
        raise DataError(f"{path} has no state.pt: it is a model-only checkpoint and cannot be resumed")
    verify_file(state_path, read_json_object(Path(path) / "meta.json"))
    try:
        return torch.load(state_path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling a damaged file raises many types
        raise DataError(f"{state_path} is damaged ({type(e).__name__}); resume from an earlier step") from e


def check_resumable(path: Path) -> None:
    """Raise a DataError if a step directory cannot be resumed from (files missing or damaged)."""
    meta = read_json_object(Path(path) / "meta.json")
    read_json_object(Path(path) / "config.json")
    verify_file(Path(path) / "config.json", meta)
    if {"model.safetensors", "state.pt"} <= set(meta.get("checksums") or {}):
        verify_file(Path(path) / "model.safetensors", meta)  # the hashes say it all; no need to unpickle twice
        if not (Path(path) / "state.pt").exists():
            raise DataError(f"{path} has no state.pt")
        verify_file(Path(path) / "state.pt", meta)
    else:  # written before checksums: try to read it
        load_weights(path, meta)
        load_training_state(path)


def newest_resumable_step(directory: Path) -> int | None:
    """The newest step of a run that can be resumed from; damaged newer steps are skipped with a warning."""
    for step in reversed(list_steps(directory)):
        try:
            check_resumable(Path(directory) / f"step_{step}")
            return step
        except DataError as e:
            warn(f"--resume: skipping step {step}: {e}")
    return None
