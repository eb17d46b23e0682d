"""Reading DCLM-layout CORE bundles, and downloading eval_bundle.zip (from a server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from picochat.errors import DataError
from picochat.eval.core import evaluate_core
from picochat.eval.core_data import download_eval_bundle, download_file, load_bundle
from tests.eval.fixtures.core_bundles import LocalServer, dclm_bundle_zip, write_dclm_bundle
from tests.eval.fixtures.core_fakes import AnswerKeyModel, ByteTokenizer


def test_load_bundle_reads_types_shots_delimiters_and_baselines(tmp_path: Path):
    write_dclm_bundle(tmp_path)
    tasks = {t.label: t for t in load_bundle(tmp_path)}  # the parent of eval_bundle/ works too
    assert list(tasks) == ["copa", "winogrande", "jeopardy"]
    assert tasks["copa"].task_type == "multiple_choice" and tasks["copa"].random_baseline == 0.5
    assert tasks["winogrande"].task_type == "schema" and len(tasks["winogrande"].items) == 1
    assert tasks["jeopardy"].num_fewshot == 10 and tasks["jeopardy"].continuation_delimiter == "\nAnswer: "
    assert tasks["jeopardy"].random_baseline == 0.0
    assert [t.label for t in load_bundle(tmp_path / "eval_bundle", only=["jeopardy"])] == ["jeopardy"]


def test_bundle_scores_end_to_end_with_a_scripted_model(tmp_path: Path):
    tasks = load_bundle(write_dclm_bundle(tmp_path))
    # jeopardy has 3 items and 10 shots: the prompts use the 2 others. The delimiter "\nAnswer: "
    # leaves " sound" as the scored continuation.
    model = AnswerKeyModel([" water flowed.", " she ate it.", "Sarah was happy.", " sound", " jeep"])
    result = evaluate_core(model, ByteTokenizer(), tasks, log=lambda s: None)
    acc = {t.label: t.accuracy for t in result.tasks}
    assert acc == {"copa": 0.5, "winogrande": 1.0, "jeopardy": pytest.approx(2 / 3)}
    assert result.core == pytest.approx(((0.5 - 0.5) / 0.5 + 1.0 + 2 / 3) / 3)


@pytest.mark.parametrize("breakage, message", [
    (lambda root: (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\n"), "winogrande"),
    (lambda root: (root / "eval_data/commonsense_reasoning/copa.jsonl").write_text(
        json.dumps({"query": "q", "choices": ["a"], "gold": 3}) + "\n"), "gold"),
    (lambda root: (root / "eval_data/commonsense_reasoning/copa.jsonl").write_text("{not json\n"), "JSON"),
    (lambda root: (root / "eval_data/world_knowledge/jeopardy_all.jsonl").write_text(
        json.dumps({"context": "only a context"}) + "\n"), "continuation"),
    (lambda root: (root / "core.yaml").write_text("icl_tasks:\n- label: copa\n  icl_task_type: cloze\n"), "cloze"),
    (lambda root: (root / "core.yaml").unlink(), "core.yaml"),
    (lambda root: (root / "core.yaml").write_text("icl_tasks:\n- label: copa\n  icl_task_type: multiple_choice\n"),
     "dataset_uri"),
    (lambda root: (root / "core.yaml").write_text("icl_tasks:\n- copa\n"), "label and a dataset_uri"),
    (lambda root: (root / "core.yaml").write_text(
        "icl_tasks:\n- label: copa\n  dataset_uri: commonsense_reasoning/copa.jsonl\n  num_fewshot: [ten]\n"
        "  icl_task_type: multiple_choice\n"), "num_fewshot"),
    (lambda root: (root / "eval_data/commonsense_reasoning/copa.jsonl").write_text("5\n"), "JSON object"),
])
def test_broken_bundles_are_data_errors_naming_the_culprit(tmp_path: Path, breakage, message: str):
    root = write_dclm_bundle(tmp_path)
    breakage(root)
    with pytest.raises(DataError, match=message):
        load_bundle(root)


@pytest.mark.parametrize("baseline", ["100", "-5", "nan"])
def test_a_random_baseline_outside_0_to_100_percent_is_refused_when_the_bundle_is_read(tmp_path: Path,
                                                                                        baseline: str):
    """Not after the task has been scored: centering by it would divide by zero or mean nothing."""
    root = write_dclm_bundle(tmp_path)
    (root / "eval_meta_data.csv").write_text(
        f"Eval Task,Random baseline\ncopa,{baseline}\nwinogrande,50\njeopardy,0\n")
    with pytest.raises(DataError, match=r"eval_meta_data\.csv.*copa"):
        load_bundle(root)
    assert [t.label for t in load_bundle(root, only=["jeopardy"])] == ["jeopardy"]  # unused rows are not checked


def test_unknown_task_names_are_refused(tmp_path: Path):
    with pytest.raises(DataError, match="hellaswag"):
        load_bundle(write_dclm_bundle(tmp_path), only=["hellaswag"])


def test_download_eval_bundle_retries_verifies_and_unzips_once(tmp_path: Path):
    payload = dclm_bundle_zip(tmp_path / "src")
    sha = hashlib.sha256(payload).hexdigest()
    dest = tmp_path / "home" / "eval"
    with LocalServer({"/eval_bundle.zip": payload}, fail_first=2) as server:
        root = download_eval_bundle(dest, url=server.url + "/eval_bundle.zip", sha256=sha, backoff=0.01)
        assert root == dest / "eval_bundle" and len(server.hits) == 3  # two 500s, then the file
        assert [t.label for t in load_bundle(root)] == ["copa", "winogrande", "jeopardy"]
        assert (dest / "eval_bundle.sha256").read_text().split()[0] == sha
        assert not list(dest.glob(".*.tmp")) and not list(dest.glob(".eval_bundle*"))
        assert not (dest / "eval_bundle.zip").exists()
        download_eval_bundle(dest, url=server.url + "/eval_bundle.zip", sha256=sha)
        assert len(server.hits) == 3  # already there: no second download


def test_download_refuses_a_checksum_mismatch_and_leaves_nothing(tmp_path: Path):
    dest = tmp_path / "eval"
    with (LocalServer({"/eval_bundle.zip": dclm_bundle_zip(tmp_path / "src")}) as server,
          pytest.raises(DataError, match="sha256")):
        download_eval_bundle(dest, url=server.url + "/eval_bundle.zip", sha256="0" * 64, retries=2, backoff=0.01)
    assert not (dest / "eval_bundle").exists() and not list(dest.glob(".*.tmp")) and not list(dest.glob("*.zip"))


def test_download_refuses_something_that_is_not_a_zip(tmp_path: Path):
    with (LocalServer({"/eval_bundle.zip": b"<html>not found</html>"}) as server,
          pytest.raises(DataError, match="zip")):
        download_eval_bundle(tmp_path, url=server.url + "/eval_bundle.zip")
    assert not (tmp_path / "eval_bundle").exists()


def test_download_file_gives_up_after_its_retries(tmp_path: Path):
    with LocalServer({}) as server:
        with pytest.raises(DataError, match="after 3 tries"):
            download_file(server.url + "/missing", tmp_path / "f", retries=3, backoff=0.01)
        assert len(server.hits) == 3
    assert list(tmp_path.iterdir()) == []
