"""The sampling settings a chat uses when nobody says otherwise: `picochat chat`, the server, the chat probe.

One place, so that what the chat probe measures is what a user gets. Why these values:
greedy decoding (temperature 0) makes a small model loop on one token or phrase; a moderate
temperature with a top-k cut-off keeps it on likely words without most of the loops, and the
reply cap keeps a runaway answer short. A model pretrained on more tokens (the cpu preset on a
fast-bf16 CPU: ~10M) still loops in ~15% of its reply tokens at temperature 0.7; a repetition
penalty of 1.2 on the last 64 generated tokens brings that to ~1% without more task-format echoes
or non-words (docs/LOG.md, 2026-12-05 (night)). Greedy and no penalty stay one flag away
(`--temperature 0`, `--repetition-penalty 1`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from picochat.errors import ConfigError


@dataclass(frozen=True)
class ChatSampling:
    temperature: float = 0.7
    top_k: int = 50  # 0: off
    max_tokens: int = 256  # longest reply, in tokens
    repetition_penalty: float = 1.2  # the last 64 generated tokens made less likely; 1: off


CHAT_SAMPLING = ChatSampling()


def add_sampling_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--temperature, --top-k, --max-tokens and --repetition-penalty, defaulting to CHAT_SAMPLING
    (`note` qualifies each default, e.g. what a server request overrides)."""
    s = CHAT_SAMPLING
    parser.add_argument("--temperature", type=float, default=s.temperature,
                        help=f"sampling temperature, 0 = greedy (default {s.temperature}{note})")
    parser.add_argument("--top-k", type=int, default=s.top_k, help=f"0 turns top-k off (default {s.top_k}{note})")
    parser.add_argument("--max-tokens", type=int, default=s.max_tokens,
                        help=f"longest reply, in tokens (default {s.max_tokens}{note})")
    parser.add_argument("--repetition-penalty", type=float, default=s.repetition_penalty,
                        help=f"> 1 makes the last 64 generated tokens less likely, against loops; 1 = off "
                             f"(default {s.repetition_penalty}{note})")


def check_sampling_arguments(args: argparse.Namespace, max_top_k: int | None = None,
                             max_tokens: int | None = None) -> None:
    """A one-line ConfigError for a sampling flag outside the range the sampler (or a request) accepts."""
    if not 0.0 <= args.temperature <= 2.0:
        raise ConfigError(f"--temperature {args.temperature}: must be between 0 and 2 (0 = greedy)")
    if args.top_k < 0 or (max_top_k is not None and args.top_k > max_top_k):
        raise ConfigError(f"--top-k {args.top_k}: must be >= 0 (0 turns top-k off)"
                          + (f" and <= {max_top_k}" if max_top_k is not None else ""))
    if args.max_tokens < 1 or (max_tokens is not None and args.max_tokens > max_tokens):
        raise ConfigError(f"--max-tokens {args.max_tokens}: must be >= 1"
                          + (f" and <= {max_tokens}" if max_tokens is not None else ""))
    if not 0.0 < args.repetition_penalty <= 10.0:
        raise ConfigError(f"--repetition-penalty {args.repetition_penalty}: must be in (0, 10]; 1 is off")
