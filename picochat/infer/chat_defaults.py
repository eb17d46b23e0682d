"""The sampling settings a chat uses when nobody says otherwise: `picochat chat`, the server, the chat probe.

One place, so that what the chat probe measures is what a user gets. Why these values:
greedy decoding (temperature 0) makes a small model loop on one token or phrase; a moderate
temperature with a top-k cut-off keeps it on likely words without the loops, and the reply
cap keeps a runaway answer short. Greedy stays one flag away
(`--temperature 0`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatSampling:
    temperature: float = 0.7
    top_k: int = 50  # 0: off
    max_tokens: int = 256  # longest reply, in tokens
    repetition_penalty: float | None = None  # opt-in (e.g. 1.2): recent tokens made less likely; None: off


CHAT_SAMPLING = ChatSampling()
