"""UTF-8 safe streaming of split multi-byte characters, tool display markup, and context fitting."""

from picochat.infer.prompt import fit_conversation
from picochat.infer.streaming import TextStreamer, parse_display_text

MIXED = "héllo 你好 🙂 ok ñ"


def test_multibyte_characters_are_never_garbled(tokenizer):
    ids = tokenizer.encode(MIXED)
    # The tokenizer learned ASCII only: every non-ASCII character is split over several tokens.
    assert any(not tokenizer.decode_bytes([i]).decode("utf-8", errors="ignore") for i in ids)
    streamer = TextStreamer(tokenizer)
    pieces = []
    for i in ids:
        pieces += streamer.push(i)
    pieces += streamer.finish()
    assert all("\ufffd" not in p.text for p in pieces)
    assert "".join(p.text for p in pieces) == MIXED
    assert streamer.text == MIXED
    assert streamer.parts == [{"type": "text", "text": MIXED}]


def test_a_truncated_character_becomes_one_replacement_at_the_end(tokenizer):
    ids = tokenizer.encode("a你")[:-1]  # drop the last byte of 你
    streamer = TextStreamer(tokenizer)
    texts = [p.text for i in ids for p in streamer.push(i)]
    assert "".join(texts) == "a"
    assert "".join(p.text for p in streamer.finish()) == "\ufffd"


def test_tool_calls_are_marked_and_displayed(tokenizer):
    sp = tokenizer.encode_special
    ids = [*tokenizer.encode("So "), sp("python_start"), *tokenizer.encode("6*7"), sp("python_end"),
           sp("output_start"), *tokenizer.encode("42"), sp("output_end"), *tokenizer.encode(" done."),
           sp("assistant_end")]
    streamer = TextStreamer(tokenizer)
    pieces = [p for i in ids for p in streamer.push(i)] + streamer.finish()
    assert streamer.text == "So <<6*7=42>> done."
    assert streamer.parts == [
        {"type": "text", "text": "So "},
        {"type": "python", "text": "6*7"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": " done."},
    ]
    assert {p.kind for p in pieces} == {"text", "python", "python_output"}
    assert parse_display_text(streamer.text) == streamer.parts


def test_a_call_without_output_is_closed(tokenizer):
    sp = tokenizer.encode_special
    streamer = TextStreamer(tokenizer)
    for i in [sp("python_start"), *tokenizer.encode("x"), sp("python_end"), *tokenizer.encode("ok")]:
        streamer.push(i)
    streamer.finish()
    assert streamer.text == "<<x>>ok"
    assert parse_display_text("no tools here") == "no tools here"


def conversation(n_turns: int, system: str | None = "You are terse."):
    messages = [{"role": "system", "content": system}] if system else []
    for i in range(n_turns):
        messages.append({"role": "user", "content": f"question {i}: " + "the quick brown fox " * 5})
        messages.append({"role": "assistant", "content": f"answer {i}: " + "jumps over the dog " * 5})
    messages.append({"role": "user", "content": "last question please"})
    return {"messages": messages}


def test_short_conversation_is_rendered_unchanged(tokenizer):
    conv = conversation(1)
    assert fit_conversation(tokenizer, conv, 10_000) == tokenizer.render_for_completion(conv)


def test_oldest_turns_go_first_and_the_system_text_stays(tokenizer):
    conv = conversation(20)
    ids = fit_conversation(tokenizer, conv, 200)
    assert len(ids) <= 200
    text = tokenizer.decode(ids)
    assert "You are terse." in text and "last question please" in text
    assert "question 0:" not in text and "answer 19:" in text
    assert ids[-1] == tokenizer.encode_special("assistant_start")


def test_an_overlong_last_message_keeps_its_newest_tokens(tokenizer):
    conv = {"messages": [{"role": "system", "content": "Be kind."},
                         {"role": "user", "content": "blah " * 500 + "THE END"}]}
    ids = fit_conversation(tokenizer, conv, 40)
    assert len(ids) == 40
    text = tokenizer.decode(ids)
    assert text.startswith("<|bos|><|user_start|>Be kind.") and text.endswith("THE END<|user_end|><|assistant_start|>")
