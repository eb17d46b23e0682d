"""`picochat chat`: one-shot answers, the interactive loop and its commands, checkpoint choice."""

import io
import json

import pytest
import torch

from picochat.chat_cli import ChatSession, Settings
from picochat.cli import main
from picochat.errors import DataError
from picochat.infer import Engine
from picochat.infer.loading import resolve_checkpoint
from tests.infer.test_engine import scripted_tool_model
from tests.infer.tiny import save_tiny_checkpoint


def test_one_shot_prompt_prints_an_answer_and_saves_it(picochat_home, capsys):
    save_tiny_checkpoint("sft", "tiny")
    assert main(["chat", "-p", "Hello there!", "--max-tokens", "8", "--seed", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.strip()
    (saved,) = (picochat_home / "chats").glob("chat_*.json")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == "Hello there!"
    # The answer printed is the answer saved (this seed's answer has no calculator call: one text part).
    assert messages[1]["content"] == [{"type": "text", "text": out.removesuffix("\n")}]


def test_two_chats_in_one_second_keep_both_transcripts(picochat_home, monkeypatch, capsys):
    save_tiny_checkpoint("sft", "tiny")
    monkeypatch.setattr("picochat.chat_cli.time.strftime", lambda fmt: "20261204-120000")
    for question in ("First?", "Second?"):
        assert main(["chat", "-p", question, "--max-tokens", "4", "--seed", "1", "--device", "cpu"]) == 0
    saved = sorted((picochat_home / "chats").glob("chat_*.json"))
    assert [p.name for p in saved] == ["chat_20261204-120000-2.json", "chat_20261204-120000.json"]
    asked = {json.loads(p.read_text())["messages"][0]["content"] for p in saved}
    assert asked == {"First?", "Second?"}
    assert main(["chat", "-p", "hi", "--top-k", "-3", "--device", "cpu"]) == 2
    assert "--top-k -3: must be >= 0" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))  # a chat left before any reply
    assert main(["chat", "--device", "cpu"]) == 0
    assert len(list((picochat_home / "chats").glob("chat_*.json"))) == 2  # no empty transcript left


def test_clear_keeps_the_cleared_conversation_saved(picochat_home, monkeypatch, capsys):
    """/clear starts a new conversation and a new transcript: the next reply must not overwrite
    the file of the conversation before it; a /clear with nothing after it leaves no empty file."""
    save_tiny_checkpoint("sft", "tiny")
    monkeypatch.setattr("sys.stdin", io.StringIO("First?\n/clear\nSecond?\n/clear\n/quit\n"))
    assert main(["chat", "--max-tokens", "4", "--seed", "1", "--device", "cpu"]) == 0
    saved = sorted((picochat_home / "chats").glob("chat_*.json"))
    asked = sorted(json.loads(p.read_text())["messages"][0]["content"] for p in saved)
    assert asked == ["First?", "Second?"]


def test_default_checkpoint_is_the_most_trained_stage(picochat_home):
    save_tiny_checkpoint("base", "a")
    assert resolve_checkpoint(None).parts[-3] == "base"
    save_tiny_checkpoint("sft", "b")
    assert resolve_checkpoint(None).parts[-3] == "sft"
    assert resolve_checkpoint("base").parts[-3] == "base"
    assert resolve_checkpoint(None, tag="a").parts[-3] == "base"


def test_missing_checkpoint_is_a_clear_error(picochat_home, capsys):
    assert main(["chat", "-p", "hi", "--device", "cpu"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(DataError):
        resolve_checkpoint("rl")


def session_with_tool_model(tokenizer):
    model, _ = scripted_tool_model(tokenizer, "6*7")
    out = io.StringIO()
    return ChatSession(Engine(model, tokenizer, compute_dtype=torch.float32), Settings(0.0, 0, 30, None), out=out), out


def test_reply_streams_tool_calls_and_keeps_history(tokenizer):
    session, out = session_with_tool_model(tokenizer)
    assert session.reply("what is 6*7?") == "<<6*7=42>>!"
    assert "<<6*7=42>>!" in out.getvalue()
    assert session.messages[-1]["content"] == [
        {"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"}, {"type": "text", "text": "!"}]
    session.reply("again")  # the history (with tool parts) renders fine as the next prompt
    assert len(session.messages) == 4


def test_interactive_commands(tokenizer):
    session, out = session_with_tool_model(tokenizer)
    lines = iter(["/help", "/temperature 0.3", "/topk 7", "/topk -1", "hi", "/clear", "/nope", "   ", "/quit", "never"])
    session.loop(read=lambda _: next(lines))
    text = out.getvalue()
    assert "/temperature [v]" in text and "temperature = 0.3" in text and "top-k = 7" in text
    assert "top-k must be between" in text and "unknown command /nope" in text
    assert session.settings.temperature == 0.3 and session.settings.top_k == 7
    assert session.messages == []  # cleared after the one exchange


def test_end_of_input_leaves_the_loop(tokenizer):
    session, _ = session_with_tool_model(tokenizer)

    def read(_):
        raise EOFError

    session.loop(read=read)


def test_a_two_hundred_turn_chat_keeps_going_and_says_what_the_model_no_longer_sees(tokenizer):
    session, out = session_with_tool_model(tokenizer)  # a 128-token context
    session.system = "You are picochat."
    for i in range(200):
        assert session.reply(f"question {i} about the quick brown fox") == "<<6*7=42>>!"
    assert len(session.messages) == 400  # the transcript keeps everything
    text = out.getvalue()
    assert "[the oldest 2 messages no longer fit the model's context" in text
    assert session.dropped > 350 and f"[the oldest {session.dropped} messages" in text
    # What the model saw last: the system text and the newest turns only.
    seen = session.engine.model.inputs[-200:]
    assert "You are picochat." in tokenizer.decode(seen) and "question 199" in tokenizer.decode(seen)


def test_a_message_that_cannot_fit_is_refused_and_left_out(tokenizer):
    session, out = session_with_tool_model(tokenizer)
    session.reply("hi")
    assert session.reply("blah " * 500) == ""
    assert "[not sent: the last message: " in out.getvalue()
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.reply("and now?") == "<<6*7=42>>!"  # the chat goes on


def test_a_seed_torch_cannot_take_is_a_flag_error(picochat_home, capsys):
    """torch seeds a generator with a 64-bit value; a larger --seed was a ValueError traceback at
    the first reply instead of a one-line flag error."""
    save_tiny_checkpoint("sft", "tiny")
    for seed in (2**64, -2**63 - 1):
        assert main(["chat", "-p", "hi", "--max-tokens", "2", "--seed", str(seed), "--device", "cpu"]) == 2
        assert f"--seed {seed}: must be an integer in [-2**63, 2**63)" in capsys.readouterr().err
    assert main(["chat", "-p", "hi", "--max-tokens", "2", "--seed", str(-2**63), "--device", "cpu"]) == 0


def test_a_one_shot_prompt_that_cannot_fit_fails_with_a_flag_error(picochat_home, capsys):
    """`chat -p` is for scripts: a question too long for the context printed "[not sent: ...]" and
    exited 0, as if it had been answered."""
    save_tiny_checkpoint("sft", "tiny")
    assert main(["chat", "-p", "blah " * 5000, "--max-tokens", "4", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert "-p/--prompt was not sent: the last message: " in captured.err
    assert main(["chat", "-p", "hi", "--max-tokens", "2", "--seed", "1", "--device", "cpu"]) == 0
