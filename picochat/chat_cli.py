"""`picochat chat`: talk to a checkpoint in the terminal, replies streamed as they are written.

    picochat chat                          # newest of rl, sft, mid, base
    picochat chat --stage sft -p "Why is the sky blue?"   # one question, one answer, exit

In the chat: /clear starts over, /temperature [v] and /topk [k] show or set sampling, /help, /quit.
Calculator calls show inline as <<expr=result>>. Each conversation is saved as JSON under
$PICOCHAT_HOME/chats/. A chat longer than the model's context keeps the system text and the newest
turns, as the server does: the oldest turns are left out of the prompt (and the chat says so); a
message that cannot fit at all is refused and left out of the history.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from picochat.config import add_checkpoint_arguments, add_device_arguments
from picochat.errors import ConfigError
from picochat.fileio import write_json
from picochat.infer import Engine
from picochat.infer.chat_defaults import add_sampling_arguments, check_sampling_arguments
from picochat.infer.loading import load_for_inference
from picochat.infer.prompt import ContextLengthError, fit_turns
from picochat.infer.streaming import TextStreamer
from picochat.runtime import home, pick_device, pick_dtype

HELP = """commands:
  /clear            forget the conversation
  /temperature [v]  show or set the sampling temperature (0 = greedy)
  /topk [k]         show or set top-k (0 = off)
  /help             this text
  /quit             leave (Ctrl-D works too; Ctrl-C stops a reply)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("-p", "--prompt", default=None, help="ask one question, print the answer and exit")
    parser.add_argument("--system", default=None, help="system text put before the first user message")
    add_sampling_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random per reply)")
    add_device_arguments(parser)


@dataclass
class Settings:
    temperature: float
    top_k: int
    max_tokens: int
    seed: int | None
    repetition_penalty: float | None = None


class ChatSession:
    """A conversation with the engine: history, settings, streaming replies."""

    def __init__(self, engine, settings: Settings, system: str | None = None, out: TextIO | None = None,
                 transcript: Path | None = None):
        self.engine, self.settings, self.system, self.transcript = engine, settings, system, transcript
        self.out = out or sys.stdout
        self.messages: list[dict] = []
        self.dropped = 0  # oldest messages the model no longer sees (the transcript keeps them)
        self.refused: str | None = None  # why the last message was not sent, if it was not

    def reply(self, user_text: str) -> str:
        """Stream the assistant's answer to `user_text` to `out`; returns it in display form."""
        self.messages.append({"role": "user", "content": user_text})
        self.refused = None
        budget = max(self.engine.context_len - self.settings.max_tokens, self.engine.context_len // 2)
        try:
            fitted = fit_turns(self.engine.tokenizer, {"messages": self._history()}, budget)
        except ContextLengthError as e:
            self.messages.pop()  # refused: the history stays a valid conversation
            self.refused = str(e)
            self.out.write(f"[not sent: {e}]\n")
            self.out.flush()
            return ""
        if fitted.dropped != self.dropped:
            self.dropped = fitted.dropped
            self.out.write(f"[the oldest {fitted.dropped} messages no longer fit the model's context and are left "
                           "out of what it sees] ")
        streamer = TextStreamer(self.engine.tokenizer)
        settings = self.settings
        steps = self.engine.generate(fitted.ids, max_tokens=settings.max_tokens,
                                     temperature=settings.temperature, top_k=settings.top_k or None,
                                     seed=settings.seed, repetition_penalty=settings.repetition_penalty)
        try:
            for column, _ in steps:
                token = column[0]
                if token in self.engine.stop_tokens:
                    break
                self._write(streamer.push(token))
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        finally:
            steps.close()
            self._write(streamer.finish())
            self.out.write("\n")
            self.out.flush()
        self.messages.append({"role": "assistant", "content": streamer.parts or [{"type": "text", "text": ""}]})
        if self.transcript is not None:
            write_json(self.transcript, {"messages": self._history()}, ensure_ascii=False, indent=1)
        return streamer.text

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, value = line.strip().partition(" ")
        value = value.strip()
        try:
            if name in ("/quit", "/exit"):
                return False
            if name == "/clear":
                self.messages, self.dropped = [], 0
                if self.transcript is not None and self.transcript.stat().st_size:  # keep the cleared chat's file
                    self.transcript = new_transcript(self.transcript.parent)
                self.out.write("(conversation cleared)\n")
            elif name == "/temperature":
                if value:
                    self.settings.temperature = _in_range(float(value), 0.0, 2.0, "temperature")
                self.out.write(f"temperature = {self.settings.temperature}\n")
            elif name == "/topk":
                if value:
                    self.settings.top_k = int(_in_range(int(value), 0, 1_000_000, "top-k"))
                self.out.write(f"top-k = {self.settings.top_k}\n")
            elif name == "/help":
                self.out.write(HELP + "\n")
            else:
                self.out.write(f"unknown command {name}; type /help\n")
        except ValueError as e:
            self.out.write(f"{e}\n")
        return True

    def loop(self, read: Callable[[str], str] = input) -> None:
        self.out.write("picochat: type a message, /help for commands, Ctrl-D to leave\n")
        while True:
            try:
                line = read("\nyou> ")
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return
            if line.startswith("/"):
                if not self.command(line):
                    return
            elif line.strip():
                self.out.write("picochat> ")
                self.out.flush()
                self.reply(line)

    def _write(self, pieces) -> None:
        for piece in pieces:
            self.out.write(piece.display)
        self.out.flush()

    def _history(self) -> list[dict]:
        """The whole conversation: the system text (if any), then the messages."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages


def _in_range(value: float, lo: float, hi: float, name: str) -> float:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return value


def new_transcript(chats: Path) -> Path:
    """chats/chat_<time>.json, created empty now: a second chat started in the same second (a
    script asking one question after another) gets -2, -3, ... instead of overwriting the first."""
    stem = f"chat_{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 10_000):
        path = chats / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        with contextlib.suppress(FileExistsError):
            path.touch(exist_ok=False)
            return path
    raise ConfigError(f"{chats}: no free transcript name for {stem}; clear old chats")


def run(args: argparse.Namespace) -> int:
    check_sampling_arguments(args)
    if args.seed is not None and not -2**63 <= args.seed < 2**63:  # torch seeds with a 64-bit value
        raise ConfigError(f"--seed {args.seed}: must be an integer in [-2**63, 2**63)")
    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    model, tokenizer, _, path = load_for_inference(args.stage, args.tag, args.step, device, dtype)
    engine = Engine(model, tokenizer, compute_dtype=dtype)
    chats = home() / "chats"
    chats.mkdir(parents=True, exist_ok=True)
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("-p/--prompt is empty; give a question")
    settings = Settings(args.temperature, args.top_k, args.max_tokens, args.seed, args.repetition_penalty)
    session = ChatSession(engine, settings, system=args.system, transcript=new_transcript(chats))
    try:
        if args.prompt is not None:
            session.reply(args.prompt)
            if session.refused:  # a script must see that no answer came
                raise ConfigError(f"-p/--prompt was not sent: {session.refused}")
            return 0
        print(f"loaded {path}", file=sys.stderr)
        session.loop()
        return 0
    finally:
        if session.transcript.stat().st_size == 0:  # no reply was saved (since the last /clear): keep no empty file
            session.transcript.unlink()
