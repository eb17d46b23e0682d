"""SmolTalk's chat-sized filter (max_chars): fitting exchanges, prose only, finished replies."""

from __future__ import annotations

import pytest

from picochat.errors import DataError
from picochat.tasks import load_task, smoltalk


def turns(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def test_fit_exchanges_keeps_the_leading_exchanges_that_fit():
    conv = turns("Hi there", "Hello! How can I help?", "Tell me a long story " * 20, "Once upon a time.")
    assert smoltalk.fit_exchanges(conv, 40) == conv[:2]  # 8 + 22 chars fit, the second exchange does not
    assert smoltalk.fit_exchanges(conv, 10_000) == conv
    assert smoltalk.fit_exchanges(conv, 20) is None  # not even the first exchange fits
    system = [{"role": "system", "content": "Be brief."}] + conv
    assert smoltalk.fit_exchanges(system, 40) == system[:3]
    assert smoltalk.fit_exchanges(system, 35) is None  # the system text counts too


def test_everyday_exchange_rejects_code_and_cut_off_replies():
    assert smoltalk.everyday_exchange(turns("Why is the sky blue?", "Because air scatters blue light most."))
    assert smoltalk.everyday_exchange(turns("Say hi", 'He said "hi."'))
    assert not smoltalk.everyday_exchange(turns("Fix this", "Use `x = f(y); g(x[0]) {}` here."))
    assert not smoltalk.everyday_exchange(turns("Describe Rome", "Rome is a city with a long and"))


def test_max_chars_must_be_positive():
    with pytest.raises(DataError, match="max_chars=0"):
        smoltalk.SmolTalk("train", "offline", max_chars=0)


def test_smoltalk_max_chars_cuts_and_filters_the_offline_set(offline_packages, monkeypatch):
    monkeypatch.setattr("picochat.tasks.smoltalk.TEST_PERCENT", 0)  # everything in train
    task = load_task("smoltalk", "train", max_chars=50)
    assert [task[i]["messages"] for i in range(len(task))] == [
        [{"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A cat is a small furry animal."}],
        [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi! How can I help?"}],
        [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
    ]
    view = load_task("smoltalk", "train", max_chars=50, start=1)
    assert len(view) == 2 and view[0] == task[1]
    assert len(load_task("smoltalk", "train", max_chars=20)) == 1  # only "Name a color." / "Blue." fits
