"""Download pretraining shards (FineWeb-Edu, ClimbMix) over HTTP: `picochat data download`.

A dataset is a list of numbered parquet files at `base_url/shard_{index:05d}.parquet`. We fetch
train shards 0..N-1 plus the fixed validation shard, which is the dataset's last one, so it
sorts last in the directory and `shards.list_shards` takes it as validation whatever N is.

Each file is downloaded robustly:
- into `<name>.tmp` beside the target, renamed into place only once it is verified;
- a failed attempt (connection error, timeout, truncated body, HTTP 5xx/429) is retried with
  exponential backoff, resuming the partial `.tmp` with an HTTP `Range` request;
- verified as a readable parquet file with a `text` column, and against its sha256 when a
  manifest of sums is given (`--sha256-manifest`, or a `SHA256SUMS` file in the directory);
  a file that fails is deleted (no partial or final file is left) and the error names it;
- under a per-file lock, so two concurrent downloads into one directory do not collide;
- skipped when the target already exists, so a second run is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import httpx
from filelock import FileLock

from picochat.data.registry import sha256_file
from picochat.data.shards import check_text_column, default_data_dir
from picochat.errors import DataError


@dataclass(frozen=True)
class ShardLayout:
    """Where a dataset's shards live and how many there are."""

    base_url: str
    num_shards: int
    filename: str = "shard_{index:05d}.parquet"

    @property
    def val_index(self) -> int:
        return self.num_shards - 1

    def name_of(self, index: int) -> str:
        return self.filename.format(index=index)


LAYOUTS: dict[str, ShardLayout] = {
    # FineWeb-Edu sample-100BT, re-shuffled into 1,823 shards of ~250M characters.
    "fineweb-edu": ShardLayout("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1823),
    # NVIDIA ClimbMix-400B decoded to text, 6,543 shards.
    "climbmix": ShardLayout("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6543),
}

class RetryableError(Exception):
    """A failure worth another attempt: the server or the connection, not the request."""


def shard_indices(layout: ShardLayout, num_train: int) -> list[int]:
    """Train shards 0..N-1 (capped below the val shard) followed by the val shard."""
    if num_train < 1:
        raise DataError(f"-n {num_train}: ask for at least 1 train shard (the val shard is added)")
    return list(range(min(num_train, layout.val_index))) + [layout.val_index]


def read_sha256_manifest(source: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} from a `sha256sum`-style file ('<hex>  <name>' per line), local path or URL."""
    source = str(source)
    if source.startswith(("http://", "https://")):
        try:
            text = httpx.get(source, timeout=30, follow_redirects=True).raise_for_status().text
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise DataError(f"--sha256-manifest {source}: could not fetch it ({e})") from e
    else:
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise DataError(f"--sha256-manifest {source}: cannot read it ({e})") from e
    sums = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if not (m := re.fullmatch(r"([0-9a-fA-F]{64})\s+\*?(\S+)\s*", line)):
            raise DataError(f"{source} line {n}: expected '<sha256>  <file name>', got {line[:80]!r}")
        sums[Path(m.group(2)).name] = m.group(1).lower()
    return sums


def _attempt(client: httpx.Client, url: str, tmp: Path, timeout_s: float) -> None:
    """One GET of `url` into `tmp`, resuming a partial `tmp` with a Range request."""
    have = tmp.stat().st_size if tmp.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte offsets must be file offsets, not of a gzip stream
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with client.stream("GET", url, headers=headers, timeout=timeout_s) as r:
            if r.status_code == 416 and have:
                m = re.fullmatch(r"bytes \*/(\d+)", r.headers.get("content-range", "").strip())
                if m and int(m.group(1)) != have:  # longer than the remote file: not a prefix of it
                    tmp.unlink(missing_ok=True)
                    raise RetryableError(f"partial file of {have} bytes, the remote one has {m.group(1)}; starting over")
                return  # nothing left to send: the partial file is whole (verification decides)
            if r.status_code == 429 or r.status_code >= 500:
                raise RetryableError(f"HTTP {r.status_code}")
            if r.status_code == 404:
                raise DataError(f"{url} does not exist (HTTP 404); check -n, --source and --base-url")
            if r.status_code not in (200, 206):
                raise DataError(f"{url}: HTTP {r.status_code}; check --base-url")
            if r.status_code == 206:  # the rest of the file, from offset `have`
                m = re.match(r"bytes (\d+)-", r.headers.get("content-range", ""))
                if not m or int(m.group(1)) != have:
                    tmp.unlink(missing_ok=True)  # an answer we cannot splice: start over next attempt
                    raise RetryableError(f"bad Content-Range {r.headers.get('content-range')!r} for offset {have}")
            expected = r.headers.get("content-length")
            got = 0
            with open(tmp, "ab" if r.status_code == 206 else "wb") as f:
                for chunk in r.iter_bytes():  # as received, so a dropped connection keeps what came
                    f.write(chunk)
                    got += len(chunk)
            if expected is not None and got != int(expected):
                raise RetryableError(f"body ended after {got} of {expected} bytes")
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:  # no retry can fix the URL itself
        raise DataError(f"{url} is not a usable http(s) URL ({e}); check --base-url") from e
    except httpx.TransportError as e:  # refused, reset, timed out, closed mid-body
        raise RetryableError(f"{type(e).__name__}: {e}") from e
    except httpx.HTTPError as e:  # e.g. a redirect loop
        raise DataError(f"{url}: {type(e).__name__}: {e}; check --base-url") from e


def _verify(tmp: Path, url: str, sha256: str | None) -> None:
    """Raise DataError (after deleting `tmp`) unless it has the expected sha256 and is a parquet with `text`."""
    if sha256 is not None and (got := sha256_file(tmp)) != sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url}: sha256 {got} does not match the expected {sha256}; "
                        "the download was deleted. Run again, or check --sha256-manifest")
    try:
        check_text_column(tmp)
    except DataError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{url} is not a usable shard (deleted): {e}") from e


def download_file(url: str, dest: Path, *, sha256: str | None = None, retries: int = 5,
                  backoff_s: float = 1.0, timeout_s: float = 60.0,
                  client: httpx.Client | None = None) -> bool:
    """Download `url` to `dest` with retries, resume and verification. False if `dest` was already there."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    # A client made here is closed at the end; the caller's stays open for its other downloads.
    session = httpx.Client(follow_redirects=True) if client is None else contextlib.nullcontext(client)
    try:
        with session as http, FileLock(str(dest.with_name(f".{dest.name}.lock"))):
            if dest.exists():
                return False
            for attempt in range(retries + 1):
                try:
                    _attempt(http, url, tmp, timeout_s)
                    break
                except RetryableError as e:
                    if attempt == retries:
                        raise DataError(f"{url}: failed after {retries + 1} attempts ({e}); "
                                        f"the partial file {tmp.name} is kept, run again to resume") from e
                    time.sleep(backoff_s * 2**attempt)
            _verify(tmp, url, sha256)
            os.replace(tmp, dest)
            return True
    except OSError as e:  # the lock, the partial file or the rename: a full disk, a read-only directory
        raise DataError(f"{dest}: cannot write it ({e}); check the free space and permissions of --data-dir") from e


def download_shards(source: str = "fineweb-edu", num_train: int = 8, data_dir: Path | None = None, *,
                    base_url: str | None = None, workers: int = 4, retries: int = 5, backoff_s: float = 1.0,
                    timeout_s: float = 60.0, sha256_manifest: str | None = None,
                    log: Callable[[str], None] = print) -> list[Path]:
    """Fetch train shards 0..N-1 and the val shard of `source` into `data_dir`; return their paths."""
    if source not in LAYOUTS:
        raise DataError(f"--source {source!r} is unknown; choose one of {sorted(LAYOUTS)}")
    if retries < 0:
        raise DataError(f"--retries {retries} must be 0 or more")
    layout = LAYOUTS[source]
    base = (base_url or layout.base_url).rstrip("/")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir(source)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"--data-dir {data_dir}: cannot create the directory ({e}); pass another --data-dir") from e
    if sha256_manifest is None and (data_dir / "SHA256SUMS").exists():
        sha256_manifest = str(data_dir / "SHA256SUMS")
    sums = read_sha256_manifest(sha256_manifest) if sha256_manifest else {}
    names = [layout.name_of(i) for i in shard_indices(layout, num_train)]
    if sums and (missing := [n for n in names if n not in sums]):
        raise DataError(f"--sha256-manifest {sha256_manifest} has no sum for {missing[0]} "
                        f"(and {len(missing) - 1} more); use a complete manifest or none")
    todo = [n for n in names if not (data_dir / n).exists()]
    if not todo:
        log(f"download: all {len(names)} shards of {source} are already in {data_dir}; nothing to do")
        return [data_dir / n for n in names]
    log(f"download: {len(todo)} of {len(names)} {source} shards ({len(names) - 1} train + val "
        f"{layout.name_of(layout.val_index)}) from {base} into {data_dir}, {workers} workers")
    started, errors, done = time.time(), [], 0
    with httpx.Client(follow_redirects=True) as client, ThreadPoolExecutor(max(1, workers)) as pool:
        futures = {pool.submit(download_file, f"{base}/{n}", data_dir / n, sha256=sums.get(n),
                               retries=retries, backoff_s=backoff_s, timeout_s=timeout_s, client=client): n
                   for n in todo}
        try:
            for future in as_completed(futures):
                name = futures[future]
                try:
                    future.result()
                    done += 1
                    size = (data_dir / name).stat().st_size
                    log(f"download: [{done}/{len(todo)}] {name} {size / 1e6:.1f} MB ({time.time() - started:.0f}s)")
                except DataError as e:
                    errors.append(str(e))
                    log(f"download: {name} failed: {e}")
        except BaseException:  # Ctrl-C or an unexpected error: start no more shards, only finish those under way
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if errors:
        raise DataError(f"{len(errors)} of {len(todo)} shard(s) failed; first: {errors[0]}")
    log(f"download: done, {len(todo)} shard(s) in {time.time() - started:.1f}s")
    return [data_dir / n for n in names]
