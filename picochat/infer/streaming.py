"""Generated token ids -> text pieces, safe for multi-byte UTF-8 and aware of tool parts.

A token can end in the middle of a multi-byte character (BPE merges bytes, not characters),
so decoding token by token would print garbage. `TextStreamer` keeps the bytes of an
unfinished character until the rest arrives and only ever hands out complete characters.

It also follows the tool markup: text between `<|python_start|>` and `<|python_end|>` is a
"python" piece (the calculator call), between `<|output_start|>` and `<|output_end|>` a
"python_output" piece. Each piece also carries its `display` form, the calculator call
written GSM8K-style as `<<expr=result>>`, which is what a plain-text consumer (the terminal,
the OpenAI-style `content` string) shows; `parse_display_text` reverses it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from picochat.tokenizer import Tokenizer


@dataclass
class Piece:
    kind: str  # "text" | "python" | "python_output"
    text: str  # the new characters of that part ("" when a tool part just opened)
    display: str  # the same in plain-text form, with the << = >> markup around tool calls


class TextStreamer:
    """Feed token ids one at a time with `push`; call `finish` at the end."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("python_start"), sp("python_end")
        self.output_start, self.output_end = sp("output_start"), sp("output_end")
        self.kind = "text"
        self.pending_close = False  # a call ended (<|python_end|>): "=" output follows, or ">>" closes it
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.parts: list[dict] = []  # the whole message so far, as render_conversation parts
        self.text = ""  # the whole message so far, in display form

    def push(self, token_id: int) -> list[Piece]:
        """The pieces that token completes (often one, none while a character is unfinished)."""
        if not self.tokenizer.is_special(token_id):
            return self._record(self._close_pending() + self._decode(self.tokenizer.decode_bytes([token_id])))
        pieces = self._decode(b"", final=True)
        if token_id == self.output_start:
            pieces.append(self._open("python_output", "=" if self.pending_close else "<<="))
            self.pending_close = False
            return self._record(pieces)
        pieces += self._close_pending()
        if token_id == self.python_start:
            pieces.append(self._open("python", "<<"))
        elif token_id == self.python_end and self.kind == "python":
            self.kind, self.pending_close = "text", True
        elif token_id == self.output_end and self.kind == "python_output":
            self.kind = "text"
            pieces.append(Piece("text", "", ">>"))
        return self._record(pieces)

    def finish(self) -> list[Piece]:
        """Flush a dangling partial character (as U+FFFD) and close an unfinished tool call."""
        pieces = self._decode(b"", final=True)
        if self.pending_close or self.kind != "text":
            pieces.append(Piece("text", "", ">>"))
        self.kind, self.pending_close = "text", False
        return self._record(pieces)

    def _open(self, kind: str, display: str) -> Piece:
        self.kind = kind
        self.parts.append({"type": kind, "text": ""})
        return Piece(kind, "", display)

    def _add(self, text: str) -> Piece:
        if not self.parts or self.parts[-1]["type"] != self.kind:
            self.parts.append({"type": self.kind, "text": ""})
        self.parts[-1]["text"] += text
        return Piece(self.kind, text, text)

    def _decode(self, data: bytes, final: bool = False) -> list[Piece]:
        """The characters `data` completes (with `final`: also a dangling partial one, as U+FFFD)."""
        text = self._decoder.decode(data, final=final)
        return [self._add(text)] if text else []

    def _close_pending(self) -> list[Piece]:
        if not self.pending_close:
            return []
        self.pending_close = False
        return [Piece("text", "", ">>")]

    def _record(self, pieces: list[Piece]) -> list[Piece]:
        self.text += "".join(p.display for p in pieces)
        return pieces


class RawTextStreamer:
    """The raw model's text, for raw completions: special tokens appear as their names
    (`<|bos|>`), there is no tool markup; multi-byte characters are held until complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def push(self, token_id: int) -> list[Piece]:
        return self._piece(self._decoder.decode(self.tokenizer.decode_bytes([token_id])))

    def finish(self) -> list[Piece]:
        return self._piece(self._decoder.decode(b"", final=True))

    def _piece(self, text: str) -> list[Piece]:
        self.text += text
        return [Piece("text", text, text)] if text else []


class StopMatcher:
    """Stop strings matched on the displayed text across token boundaries, for one reply.

    `push(pieces)` returns the pieces that are safe to send: text that can no longer be the start
    of a stop string. The longest tail that could still start one is held back until the next
    push decides it; once a stop string is complete, everything from its first character on is
    dropped and `stopped` is True. A held-back tool piece (its `<<`, `=`, `>>` markup) is held or
    dropped whole. `finish()` releases what is still held when the reply ends without a match.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._held: list[Piece] = []

    def push(self, pieces: list[Piece]) -> list[Piece]:
        if self.stopped:
            return []
        if not self.stops:
            return pieces
        self._held += pieces
        text = "".join(p.display for p in self._held)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits), keep=False)
        return self._release(len(text) - self._open_tail(text), keep=True)

    def finish(self) -> list[Piece]:
        out, self._held = ([] if self.stopped else self._held), []
        return out

    def _open_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = min(max(len(s) for s in self.stops) - 1, len(text))
        return next((n for n in range(longest, 0, -1) if any(s.startswith(text[-n:]) for s in self.stops)), 0)

    def _release(self, cut: int, keep: bool) -> list[Piece]:
        """Hand out the held pieces' first `cut` display characters; keep (or drop) the rest."""
        out, pos = [], 0
        for i, piece in enumerate(self._held):
            end = pos + len(piece.display)
            if end <= cut:
                out.append(piece)
                pos = end
                continue
            if piece.display == piece.text and cut > pos:  # plain characters split anywhere
                out.append(Piece(piece.kind, piece.text[:cut - pos], piece.display[:cut - pos]))
                rest = [Piece(piece.kind, piece.text[cut - pos:], piece.display[cut - pos:])]
            else:
                rest = [piece]
            self._held = rest + self._held[i + 1:] if keep else []
            return out
        self._held = []
        return out


_CALL = re.compile(r"<<([^<>=]*)(?:=([^<>]*))?>>")


def parse_display_text(text: str) -> str | list[dict]:
    """'It is <<6*7=42>>.' -> parts [text, python, python_output, text]; plain text stays a string."""
    if "<<" not in text:
        return text
    parts, pos = [], 0
    for m in _CALL.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        if m.group(2) is not None:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if not parts:
        return text
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts
