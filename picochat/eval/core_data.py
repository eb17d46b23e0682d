"""CORE task bundles on disk: read the DCLM `eval_bundle` layout and download its zip.

A bundle directory holds
  core.yaml              `icl_tasks:` a list of {label, dataset_uri, num_fewshot, icl_task_type,
                         continuation_delimiter}
  eval_meta_data.csv     one row per task with its "Random baseline" in percent
  eval_data/<uri>        one jsonl per task, one item per line:
                           multiple_choice   {"query", "choices", "gold"}
                           schema            {"context_options", "continuation", "gold"}
                           language_modeling {"context", "continuation"}
The DCLM zip (eval_bundle.zip) and our offline bundle (picochat.eval.core_offline) share it.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import yaml
from filelock import FileLock

from picochat.data.jsonl import iter_jsonl
from picochat.data.registry import sha256_file
from picochat.errors import DataError
from picochat.eval.core import TASK_TYPES, CoreTask
from picochat.fileio import write_text, writing
from picochat.runtime import home, log0

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# The zip's sha256 is not pinned: its host is unreachable from where this code was written.
# When no hash is given, the first download's hash is recorded next to the bundle instead.
EVAL_BUNDLE_SHA256: str | None = None

REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


def eval_dir() -> Path:
    """$PICOCHAT_HOME/eval: bundles and results."""
    d = home() / "eval"
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- reading a bundle -------------------------------------------------------------------------
def find_bundle_root(path: Path) -> Path:
    """The directory holding core.yaml: `path` itself or its `eval_bundle/` child."""
    for candidate in (path, path / "eval_bundle"):
        if (candidate / "core.yaml").is_file():
            return candidate
    raise DataError(f"{path} holds no core.yaml (nor eval_bundle/core.yaml); pass a CORE bundle directory")


def read_baselines(csv_path: Path) -> dict[str, float]:
    """Task label -> random baseline as a fraction, from eval_meta_data.csv (percent in the file)."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path} is missing; a CORE bundle needs it for the random baselines")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Eval Task" not in reader.fieldnames or "Random baseline" not in reader.fieldnames:
            raise DataError(f"{csv_path}: needs the columns 'Eval Task' and 'Random baseline' (got {reader.fieldnames})")
        out = {}
        for line, row in enumerate(reader, start=2):
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"]) / 100.0
            except (TypeError, ValueError) as e:
                raise DataError(f"{csv_path}:{line}: 'Random baseline' {row['Random baseline']!r} is not a number") from e
    return out


def read_items(path: Path, task_type: str, label: str) -> list[dict]:
    """The items of one jsonl file, checked for the fields its task type needs."""
    if not path.is_file():
        raise DataError(f"task {label}: data file {path} is missing; rebuild or re-download the bundle")
    items = []
    for line_no, item in iter_jsonl(path):
        if not isinstance(item, dict):
            raise DataError(f"{path}:{line_no}: a {task_type} item must be a JSON object, not {item!r}")
        if missing := [k for k in REQUIRED_FIELDS[task_type] if k not in item]:
            raise DataError(f"{path}:{line_no}: a {task_type} item needs {missing}")
        if task_type != "language_modeling":
            options = item["choices" if task_type == "multiple_choice" else "context_options"]
            if not isinstance(item["gold"], int) or not 0 <= item["gold"] < len(options):
                raise DataError(f"{path}:{line_no}: gold {item['gold']!r} is not an index into its {len(options)} options")
        items.append(item)
    if not items:
        raise DataError(f"task {label}: {path} holds no items")
    return items


def load_bundle(path: str | os.PathLike, only: list[str] | None = None) -> list[CoreTask]:
    """The CORE tasks of a bundle in core.yaml order (optionally only the labels in `only`)."""
    root = find_bundle_root(Path(path))
    try:
        spec = yaml.safe_load((root / "core.yaml").read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{root / 'core.yaml'} is not valid YAML: {e}") from e
    entries = (spec or {}).get("icl_tasks")
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{root / 'core.yaml'} has no `icl_tasks:` list")
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("label") or not entry.get("dataset_uri"):
            raise DataError(f"{root / 'core.yaml'}: every `icl_tasks:` entry needs a label and a dataset_uri "
                            f"(got {entry!r})")
    baselines = read_baselines(root / "eval_meta_data.csv")
    labels = [e.get("label") for e in entries]
    if only and (unknown := sorted(set(only) - set(labels))):
        raise DataError(f"--tasks names {unknown}, which the bundle at {root} lacks; it has: {', '.join(labels)}")
    tasks = []
    for entry in entries:
        label = entry.get("label")
        if only and label not in only:
            continue
        task_type = entry.get("icl_task_type")
        if task_type not in TASK_TYPES:
            raise DataError(f"{root / 'core.yaml'}: task {label}: icl_task_type {task_type!r} is not one of {TASK_TYPES}")
        if label not in baselines:
            raise DataError(f"{root / 'eval_meta_data.csv'} has no 'Random baseline' row for task {label}")
        if not 0.0 <= baselines[label] < 1.0:  # also refuses nan
            raise DataError(f"{root / 'eval_meta_data.csv'}: task {label}: 'Random baseline' "
                            f"{baselines[label] * 100:g} is not a chance rate in percent, >= 0 and < 100")
        shots = entry.get("num_fewshot", [0])
        shots = shots[0] if isinstance(shots, list) and shots else shots
        if not isinstance(shots, int) or shots < 0:
            raise DataError(f"{root / 'core.yaml'}: task {label}: num_fewshot {entry['num_fewshot']!r} is not a "
                            "count >= 0 (write e.g. [10])")
        items = read_items(root / "eval_data" / entry["dataset_uri"], task_type, label)
        tasks.append(CoreTask(label=label, task_type=task_type, items=items, num_fewshot=shots,
                              continuation_delimiter=entry.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    return tasks


# ---- downloads --------------------------------------------------------------------------------
def download_file(url: str, dest: Path, sha256: str | None = None, retries: int = 4,
                  timeout: float = 60.0, backoff: float = 1.0) -> Path:
    """Stream `url` into `dest` via a temp file renamed at the end; network errors are retried with
    exponential backoff, a sha256 mismatch is refused at once."""
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            h = hashlib.sha256()
            with writing(dest, "wb") as out, httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
                r.raise_for_status()
                for chunk in r.iter_bytes(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                if sha256 is not None and h.hexdigest() != sha256:
                    # A complete transfer with the wrong bytes will not get better by asking again.
                    raise DataError(f"{url}: sha256 {h.hexdigest()} does not match the pinned {sha256}; refusing it")
            return dest
        except (httpx.HTTPError, OSError) as e:
            last_error = e
            if attempt < retries:
                log0(f"download {url} failed ({e}); retry {attempt}/{retries - 1}")
                time.sleep(backoff * 2 ** (attempt - 1))
    raise DataError(f"could not download {url} after {retries} tries: {last_error}")


def download_eval_bundle(dest_dir: Path | None = None, url: str = EVAL_BUNDLE_URL,
                         sha256: str | None = EVAL_BUNDLE_SHA256, retries: int = 4, backoff: float = 1.0) -> Path:
    """The DCLM eval bundle under `dest_dir` (default $PICOCHAT_HOME/eval), downloaded and unzipped once."""
    dest_dir = Path(dest_dir) if dest_dir is not None else eval_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / "eval_bundle"
    with FileLock(str(dest_dir / "eval_bundle.lock")):
        if (final / "core.yaml").is_file():
            return final
        zip_path = download_file(url, dest_dir / "eval_bundle.zip", sha256, retries=retries, backoff=backoff)
        try:
            if not zipfile.is_zipfile(zip_path):
                raise DataError(f"{url} did not return a zip file; check the URL")
            with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".eval_bundle.") as tmp:
                with zipfile.ZipFile(zip_path) as z:
                    if bad := [n for n in z.namelist() if n.startswith("/") or ".." in Path(n).parts]:
                        raise DataError(f"{zip_path} has unsafe member paths ({bad[0]}); refusing to extract")
                    z.extractall(Path(tmp) / "unzipped")
                root = find_bundle_root(Path(tmp) / "unzipped")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(root, final)
            write_text(dest_dir / "eval_bundle.sha256", sha256_file(zip_path) + "  eval_bundle.zip\n")
        finally:
            zip_path.unlink(missing_ok=True)
        return final
