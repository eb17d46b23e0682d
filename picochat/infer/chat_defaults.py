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

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatSampling:
    temperature: float = 0.7
    top_k: int = 50  # 0: off
    max_tokens: int = 256  # longest reply, in tokens
    repetition_penalty: float = 1.2  # the last 64 generated tokens made less likely; 1: off


CHAT_SAMPLING = ChatSampling()
