"""build_mixture: every listed task carries its share; an entry with no rows is refused."""

from __future__ import annotations

import pytest

from picochat.errors import DataError
from picochat.train.mixtures import SFT, build_mixture


def test_an_entry_with_no_rows_is_refused_not_silently_dropped():
    entries = [("identity", "train", {"start": 10_000}, 1), ("arithmetic", "train", {"size": 12}, 1)]
    with pytest.raises(DataError, match=r"identity\[train\].*start.*10000.*no rows"):
        build_mixture(entries, "offline")


def test_copies_and_seed():
    entries = SFT["offline"]["tiny"] + [("identity", "train", {"stop": 8}, 2)]
    mix = build_mixture(entries, "offline", seed=7)
    assert len(mix) == 8 + 8 + 2 * 8
    assert [mix[i] for i in range(len(mix))] == [build_mixture(entries, "offline", seed=7)[i] for i in range(len(mix))]
    assert [mix.locate(i) for i in range(8)] != [build_mixture(entries, "offline", seed=8).locate(i) for i in range(8)]
