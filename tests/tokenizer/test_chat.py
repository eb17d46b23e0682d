"""render_conversation / render_for_completion: the SPEC §2 table, masks, folding, truncation, errors."""

from __future__ import annotations

import pytest

from picochat.tokenizer import ConversationError, Tokenizer, render_conversation, render_for_completion


def sp(tok: Tokenizer, name: str) -> int:
    return tok.encode_special(name)


def test_spec_worked_example(tok: Tokenizer) -> None:
    conv = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}]}
    ids, mask = tok.render_conversation(conv)
    nihao, hi = tok.encode("你好"), tok.encode("Hi")
    assert ids == [
        tok.bos_id, sp(tok, "user_start"), *nihao, sp(tok, "user_end"),
        sp(tok, "assistant_start"), *hi, sp(tok, "assistant_end"),
    ]
    assert mask == [0, 0, *[0] * len(nihao), 0, 0, *[1] * len(hi), 1]
    assert render_conversation(tok, conv) == (ids, mask)


def test_every_part_type_mask(tok: Tokenizer) -> None:
    parts = [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*7"},
        {"type": "python_output", "text": "84"},
        {"type": "text", "text": "It is 84."},
    ]
    conv = {"messages": [{"role": "user", "content": "What is 12*7?"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    enc = tok.encode
    expected = [
        (tok.bos_id, 0), (sp(tok, "user_start"), 0), *[(i, 0) for i in enc("What is 12*7?")], (sp(tok, "user_end"), 0),
        (sp(tok, "assistant_start"), 0),
        *[(i, 1) for i in enc("Let me compute.")],
        (sp(tok, "python_start"), 1), *[(i, 1) for i in enc("12*7")], (sp(tok, "python_end"), 1),
        (sp(tok, "output_start"), 0), *[(i, 0) for i in enc("84")], (sp(tok, "output_end"), 0),
        *[(i, 1) for i in enc("It is 84.")],
        (sp(tok, "assistant_end"), 1),
    ]
    assert list(zip(ids, mask)) == expected


def test_multi_turn_alternates(tok: Tokenizer) -> None:
    msgs = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
    ]
    ids, mask = tok.render_conversation({"messages": msgs})
    assert ids.count(sp(tok, "user_start")) == 2 and ids.count(sp(tok, "assistant_end")) == 2
    trained = [i for i, m in zip(ids, mask) if m]
    assert trained == [*tok.encode("b"), sp(tok, "assistant_end"), *tok.encode("d"), sp(tok, "assistant_end")]


def test_system_message_is_folded_into_first_user_message(tok: Tokenizer) -> None:
    with_system = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
    ]}
    folded = {"messages": [{"role": "user", "content": "Be brief.\n\nHello"}, {"role": "assistant", "content": "Hi"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(folded)


def test_truncation(tok: Tokenizer) -> None:
    conv = {"messages": [{"role": "user", "content": "tell me a long story " * 20}, {"role": "assistant", "content": "ok " * 50}]}
    full_ids, full_mask = tok.render_conversation(conv, max_tokens=None)
    ids, mask = tok.render_conversation(conv, max_tokens=7)
    assert (ids, mask) == (full_ids[:7], full_mask[:7])
    assert len(full_ids) > 100
    assert tok.render_conversation(conv, max_tokens=10_000) == (full_ids, full_mask)


@pytest.mark.parametrize(
    "conv, index, rule",
    [
        ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], 1, "unknown role 'robot'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1, "roles must alternate"),
        ([{"role": "assistant", "content": "a"}], 0, "role 'assistant' after 'the start'"),
        ([{"role": "user", "content": ["not", "text"]}], 0, "user content must be a string, got list"),
        ([{"role": "user", "content": 42}], 0, "user content must be a string, got int"),
        ([{"role": "user", "content": "   "}], 0, "empty user message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], 1, "empty assistant message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": []}], 1, "empty assistant message"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
         1, "part 0 has unknown type 'image'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": 5}]}],
         1, "part 0 \\(text\\) needs a string 'text'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3.5}], 1, "string or a list of parts"),
        ([{"role": "user", "content": "q"}, {"role": "system", "content": "late"}], 1, "system message is only allowed first"),
        ([{"role": "system", "content": 1}, {"role": "user", "content": "q"}], 0, "system content must be a string"),
        ([{"role": "user", "content": "q"}, "not a dict"], 1, "must be a dict with 'role' and 'content'"),
        ([{"role": "user"}], 0, "must be a dict with 'role' and 'content'"),
    ],
)
def test_conversation_errors_name_index_and_rule(tok: Tokenizer, conv, index: int, rule: str) -> None:
    with pytest.raises(ConversationError, match=f"^message {index}: .*{rule}") as info:
        tok.render_conversation({"messages": conv})
    assert info.value.index == index


@pytest.mark.parametrize(
    "conv, rule",
    [
        ("just a string", "must be a dict with a 'messages' list"),
        ({"msgs": []}, "must be a dict with a 'messages' list"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "has no user message"),
    ],
)
def test_conversation_level_errors(tok: Tokenizer, conv, rule: str) -> None:
    with pytest.raises(ConversationError, match=f"^conversation: {rule}"):
        tok.render_conversation(conv)


def test_render_for_completion(tok: Tokenizer) -> None:
    question = {"role": "user", "content": "What is 2+2?"}
    answer = {"role": "assistant", "content": "4"}
    with_answer = tok.render_for_completion({"messages": [question, answer]})
    without_answer = render_for_completion(tok, {"messages": [question]})
    prompt_ids, _ = tok.render_conversation({"messages": [question]})
    assert with_answer == without_answer == [*prompt_ids, sp(tok, "assistant_start")]


def test_render_for_completion_multi_turn_keeps_earlier_answers(tok: Tokenizer) -> None:
    msgs = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"},
    ]
    ids = tok.render_for_completion({"messages": msgs})
    head, _ = tok.render_conversation({"messages": msgs[:3]}, max_tokens=None)
    assert ids == [*head, sp(tok, "assistant_start")]
    assert ids.count(sp(tok, "assistant_end")) == 1


def test_training_and_inference_render_the_prompt_alike(tok: Tokenizer) -> None:
    """The prompt the server and the terminal chat build (system text, an earlier turn with a
    calculator call) is, token for token, the training render up to the last assistant_start."""
    from picochat.infer.prompt import fit_turns

    answer = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "12*7"},
              {"type": "python_output", "text": "84"}, {"type": "text", "text": "It is 84."}]
    msgs = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12*7?"},
        {"role": "assistant", "content": answer}, {"role": "user", "content": "And 84+1?"},
        {"role": "assistant", "content": "85"},
    ]
    ids, mask = tok.render_conversation({"messages": msgs}, max_tokens=None)
    last_start = len(ids) - 1 - ids[::-1].index(sp(tok, "assistant_start"))
    prompt = ids[:last_start + 1]
    assert fit_turns(tok, {"messages": msgs[:-1]}, 10_000).ids == prompt
    assert tok.render_for_completion({"messages": msgs}) == prompt
    assert mask[last_start] == 0 and mask[last_start + 1] == 1  # the first answer token is predicted from assistant_start


def test_adjacent_text_parts_are_encoded_as_one_text(tok: Tokenizer) -> None:
    """A turn split into text parts inside a token renders as the joined text does (the exported
    chat template encodes the turn as one string), with the joined text supervised alike."""
    # " river" is one token of this tokenizer: the seam falls inside it.
    assert tok.encode("By the riv") + tok.encode("er.") != tok.encode("By the river.")
    split = [{"type": "text", "text": "By the riv"}, {"type": "text", "text": "er."}]
    whole = [{"type": "text", "text": "By the river."}]

    def conv(parts):
        return {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": parts},
                             {"role": "user", "content": "Again"}]}

    ids, mask = tok.render_conversation(conv(split), max_tokens=None)
    assert (ids, mask) == tok.render_conversation(conv(whole), max_tokens=None)
    assert tok.render_conversation({"messages": conv(split)["messages"][:2]}) == \
        tok.render_conversation({"messages": [{"role": "user", "content": "Say it"},
                                              {"role": "assistant", "content": "By the river."}]})
    assert tok.render_for_completion(conv(split)) == tok.render_for_completion(conv(whole))
    from picochat.infer.prompt import fit_turns  # the prompt fitter counts the turn as it renders
    need = len(tok.render_for_completion(conv(split)))
    assert fit_turns(tok, conv(split), need).dropped == 0
    assert split == [{"type": "text", "text": "By the riv"}, {"type": "text", "text": "er."}]  # the input is unchanged


def test_only_text_parts_are_joined(tok: Tokenizer) -> None:
    """Tool calls and tool outputs keep their own markers even when two of a kind are adjacent; text
    is joined only with the text beside it, never across a call or an output."""
    parts = [
        {"type": "text", "text": "Let "}, {"type": "text", "text": "me see."},
        {"type": "python", "text": "1+"}, {"type": "python", "text": "2"},
        {"type": "python_output", "text": "3"}, {"type": "python_output", "text": "4"},
        {"type": "text", "text": "So"}, {"type": "text", "text": " 3."},
    ]
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    enc = tok.encode

    def call(text):
        return [(sp(tok, "python_start"), 1), *[(i, 1) for i in enc(text)], (sp(tok, "python_end"), 1)]

    def output(text):
        return [(sp(tok, "output_start"), 0), *[(i, 0) for i in enc(text)], (sp(tok, "output_end"), 0)]

    expected = [
        (tok.bos_id, 0), (sp(tok, "user_start"), 0), *[(i, 0) for i in enc("q")], (sp(tok, "user_end"), 0),
        (sp(tok, "assistant_start"), 0),
        *[(i, 1) for i in enc("Let me see.")],
        *call("1+"), *call("2"), *output("3"), *output("4"),
        *[(i, 1) for i in enc("So 3.")],
        (sp(tok, "assistant_end"), 1),
    ]
    assert list(zip(ids, mask)) == expected
