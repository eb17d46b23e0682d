"""Corpus hygiene filters on handmade documents: boilerplate, profanity, exact and near duplicates."""

from __future__ import annotations

import random

from picochat.data import hygiene

STORY = ("The old lighthouse keeper climbed the stairs every evening at dusk and lit the great lamp, "
         "then sat by the window with his tea and watched the fishing boats come home across the bay. "
         "In winter the storms were fierce and the waves broke over the rocks below, but the light never failed.")
OTHER = ("Farmers in the valley plant barley in early spring and harvest it before the autumn rains arrive. "
         "The mill by the river grinds the grain into flour, which the bakers in town turn into bread each morning.")


def test_blocked_words_are_whole_words_and_spare_innocent_ones():
    assert hygiene.blocked_words("Well, SHIT happens.") == {"shit"}
    # prefixes and older senses that must stay: shittim wood, niggardly, Moby-Dick, the verb retard
    assert hygiene.blocked_words("Boards of shittim wood; a niggardly host; Moby-Dick; it may retard growth.") == set()
    assert hygiene.blocked_words(STORY) == set()


def test_boilerplate_is_recognised_but_the_printer_is_not():
    assert hygiene.is_boilerplate("This eBook is for the use of anyone anywhere at no cost.")
    assert hygiene.is_boilerplate("*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***")
    assert not hygiene.is_boilerplate("Johannes Gutenberg built a printing press around 1440.")


def test_minhash_estimates_jaccard():
    assert hygiene.estimated_jaccard(hygiene.minhash(STORY), hygiene.minhash(STORY.upper())) == 1.0
    one_word_changed = STORY.replace("fierce", "wild")
    assert hygiene.estimated_jaccard(hygiene.minhash(STORY), hygiene.minhash(one_word_changed)) >= 0.7
    assert hygiene.estimated_jaccard(hygiene.minhash(STORY), hygiene.minhash(OTHER)) < 0.2
    # Texts shorter than a shingle still get a signature of their own: the same words agree, other words do not.
    short = hygiene.minhash("one two")
    assert short.shape == (hygiene.NUM_HASHES,)
    assert hygiene.estimated_jaccard(short, hygiene.minhash("One,  TWO!")) == 1.0
    assert hygiene.estimated_jaccard(short, hygiene.minhash("three four")) < 0.2
    assert hygiene.estimated_jaccard(short, hygiene.minhash(STORY)) < 0.2


def test_filter_documents_drops_and_counts_each_kind_once():
    rng = random.Random(0)
    words = STORY.split()
    long_story = " ".join(rng.choice(words) for _ in range(400))
    near = long_story.replace(words[3], "lantern", 1) + " And that was all."
    docs = [
        ("a", long_story),
        ("a", OTHER),
        ("b", "  " + long_story.upper() + "\n"),           # exact duplicate up to case and whitespace
        ("b", near),                                       # near duplicate
        ("b", OTHER + " What a fucking mess."),            # profanity
        ("c", "Project Gutenberg-tm License terms. " + OTHER),  # boilerplate
        ("c", STORY),
    ]
    kept, dropped = hygiene.filter_documents(docs)
    assert kept == [("a", long_story), ("a", OTHER), ("c", STORY)]
    assert dropped["a"] == dict.fromkeys(hygiene.FILTERS, 0)
    assert dropped["b"] == {"boilerplate": 0, "profanity": 1, "exact_duplicate": 1, "near_duplicate": 1}
    assert dropped["c"] == {"boilerplate": 1, "profanity": 0, "exact_duplicate": 0, "near_duplicate": 0}
    assert hygiene.filter_documents(docs) == (kept, dropped)  # deterministic


def test_texts_in_other_alphabets_are_words_too_not_near_duplicates():
    greek = ("Το πρωί ο ήλιος ανέτειλε πάνω από τη θάλασσα και οι ψαράδες ετοίμασαν τις βάρκες τους "
             "για μια μεγάλη μέρα στο ανοιχτό πέλαγος.")
    russian = ("Вечером в городе зажглись огни и люди вышли на улицы чтобы погулять вдоль реки "
               "и послушать музыку на площади.")
    assert hygiene.words_of("Naïve Café, Æsop's") == ["naïve", "café", "æsop's"]
    assert hygiene.estimated_jaccard(hygiene.minhash(greek), hygiene.minhash(russian)) < 0.2
    kept, dropped = hygiene.filter_documents([("a", greek), ("a", russian)])
    assert kept == [("a", greek), ("a", russian)] and dropped["a"]["near_duplicate"] == 0
