"""Pick and load the checkpoint to chat with: the given one, or the most trained stage that exists."""

from __future__ import annotations

import torch

from picochat.checkpoint import STAGES, checkpoints_root, find_checkpoint, latest_tag, load_checkpoint_dir
from picochat.errors import DataError

# Most trained first: a chat wants RL > SFT > mid > base.
CHAT_STAGE_ORDER = ("rl", "sft", "mid", "base")


def resolve_checkpoint(stage: str | None, tag: str | None = None, step: int | None = None):
    """The step directory for --stage/--tag/--step; without --stage, the first of rl, sft, mid, base that has one."""
    if stage is not None:
        if stage not in STAGES:
            raise DataError(f"--stage {stage!r} is unknown; stages are {', '.join(STAGES)}")
        return find_checkpoint(stage, tag, step)
    for candidate in CHAT_STAGE_ORDER:
        if (tag is None and latest_tag(candidate)) or (tag is not None and (checkpoints_root() / candidate / tag).is_dir()):
            return find_checkpoint(candidate, tag, step)
    raise DataError(f"no checkpoint under {checkpoints_root()}; train one first (e.g. `picochat base-train --preset cpu-tiny`)")


def load_for_inference(stage: str | None, tag: str | None = None, step: int | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer, meta, step_dir) ready for the Engine (eval mode), with its weights cast
    once to `dtype` (the compute dtype) when given: serving never trains, so no matmul then casts
    a weight per token."""
    path = resolve_checkpoint(stage, tag, step)
    model, tokenizer, meta = load_checkpoint_dir(path, device)
    if dtype is not None:
        model.cast_weights_(dtype)
    return model.eval(), tokenizer, meta, path
