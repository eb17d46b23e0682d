"""UTF-8 safe streaming of split multi-byte characters, tool display markup, stop strings, and
context fitting (long chats)."""

import pytest

from picochat.infer.prompt import ContextLengthError, encode_raw_prompt, fit_conversation, fit_turns
from picochat.infer.streaming import Piece, RawTextStreamer, StopMatcher, TextStreamer, parse_display_text

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


def test_a_last_message_that_cannot_fit_is_refused(tokenizer):
    conv = {"messages": [{"role": "system", "content": "Be kind."},
                         {"role": "user", "content": "blah " * 500 + "THE END"}]}
    with pytest.raises(ContextLengthError, match="system text and the last message: .* tokens"):
        fit_turns(tokenizer, conv, 40)
    long_turns = conversation(3)
    long_turns["messages"][-1]["content"] = "blah " * 500
    with pytest.raises(ContextLengthError):
        fit_turns(tokenizer, long_turns, 100)  # dropping every older turn is not enough


def test_a_two_hundred_turn_chat_keeps_the_system_text_and_the_newest_turns(tokenizer):
    conv = conversation(200)
    budget = 300
    fitted = fit_turns(tokenizer, conv, budget)
    assert len(fitted.ids) <= budget
    assert fitted.dropped % 2 == 0 and 0 < fitted.dropped < 400
    kept = conv["messages"][1 + fitted.dropped:]
    assert fitted.ids == tokenizer.render_for_completion({"messages": conv["messages"][:1] + kept})
    # The fewest pairs were dropped: keeping one more pair would not fit.
    one_more = conv["messages"][:1] + conv["messages"][1 + fitted.dropped - 2:]
    assert len(tokenizer.render_for_completion({"messages": one_more})) > budget
    text = tokenizer.decode(fitted.ids)
    assert text.startswith("<|bos|><|user_start|>You are terse.") and "answer 199:" in text
    assert fit_turns(tokenizer, conversation(2), 10_000).dropped == 0


def pieces_of(*texts: str) -> list[list[Piece]]:
    return [[Piece("text", t, t)] for t in texts]


def shown(pieces: list[Piece]) -> str:
    return "".join(p.display for p in pieces)


def test_stop_string_across_pushes_holds_back_only_a_possible_start():
    matcher = StopMatcher(["END!"])
    sent = [shown(matcher.push(p)) for p in pieces_of("Hello E", "N", "x and E", "ND", "!tail")]
    # "E" and "EN" might start "END!", so they wait; "ENx" cannot, so it goes out.
    assert sent == ["Hello ", "", "ENx and ", "", ""]
    assert matcher.stopped and matcher.push([Piece("text", "more", "more")]) == []


def test_the_earliest_of_several_stop_strings_wins_and_finish_releases_the_rest():
    matcher = StopMatcher(["\n\n", "User:"])
    assert shown(matcher.push(pieces_of("a User")[0])) == "a "
    assert shown(matcher.push(pieces_of(":\n\nb")[0])) == ""
    assert matcher.stopped
    open_end = StopMatcher(["xyz"])
    assert shown(open_end.push(pieces_of("abcx")[0])) == "abc"
    assert not open_end.stopped and shown(open_end.finish()) == "x"
    assert shown(StopMatcher([]).push(pieces_of("as is")[0])) == "as is"


def test_stop_strings_see_the_displayed_tool_markup(tokenizer):
    sp = tokenizer.encode_special
    ids = [*tokenizer.encode("So "), sp("python_start"), *tokenizer.encode("6*7"), sp("python_end"),
           sp("output_start"), *tokenizer.encode("42"), sp("output_end"), *tokenizer.encode(" done.")]
    streamer, matcher = TextStreamer(tokenizer), StopMatcher(["=42"])
    out = [p for i in ids for p in matcher.push(streamer.push(i))]
    assert matcher.stopped and shown(out) == "So <<6*7"


def test_raw_text_streamer_names_special_tokens_and_keeps_characters_whole(tokenizer):
    ids = [tokenizer.bos_id, *tokenizer.encode("a你b")]
    streamer = RawTextStreamer(tokenizer)
    texts = [p.text for i in ids for p in streamer.push(i)] + [p.text for p in streamer.finish()]
    assert "".join(texts) == "<|bos|>a你b" and "\ufffd" not in "".join(texts)


def test_raw_prompts_name_special_tokens(tokenizer):
    ids = encode_raw_prompt(tokenizer, "<|bos|>Hi<|user_end|> <|nope|>")
    assert ids[0] == tokenizer.bos_id and tokenizer.encode_special("user_end") in ids
    assert tokenizer.decode(ids) == "<|bos|>Hi<|user_end|> <|nope|>"
    assert tokenizer.bos_id not in tokenizer.encode("<|bos|>")  # plain encoding never makes specials


def test_counted_sizes_pick_exactly_the_fewest_pairs_to_drop(tokenizer):
    """fit_turns counts tokens instead of rendering every try: the count must match the render,
    with tool parts, string and part-list content, and with or without a system text."""
    for system in ("You are terse.", None):
        conv = conversation(30, system)
        for i, m in enumerate(conv["messages"]):
            if m["role"] == "assistant" and i % 3 == 0:
                m["content"] = [{"type": "text", "text": f"turn {i} "}, {"type": "python", "text": "6*7"},
                                {"type": "python_output", "text": "42"}, {"type": "text", "text": "!"}]
        head = conv["messages"][:1] if system else []
        turns = conv["messages"][1:] if system else conv["messages"]
        for budget in range(60, 2000, 37):
            try:
                fitted = fit_turns(tokenizer, conv, budget)
            except ContextLengthError:
                assert len(tokenizer.render_for_completion({"messages": head + turns[-1:]})) > budget
                continue
            assert len(fitted.ids) <= budget
            assert fitted.ids == tokenizer.render_for_completion({"messages": head + turns[fitted.dropped:]})
            if fitted.dropped:
                one_more = head + turns[fitted.dropped - 2:]
                assert len(tokenizer.render_for_completion({"messages": one_more})) > budget
