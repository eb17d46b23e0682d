"""The report card with an older checkpoint config, other runs' eval files beside this run's, and a
disk that fills up while the report is written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from picochat.cli import main
from picochat.report.environment import code_size
from picochat.report.report import build_report
from tests.report.test_report import base_run, home, write_json  # noqa: F401  (fixtures)


def test_a_config_json_that_predates_a_field_still_reports_the_model(home):  # noqa: F811
    """A field the checkpoint's config.json lacks has its default there (as loading the checkpoint reads
    it), so the model facts are still reported, not a KeyError."""
    path = home / "checkpoints" / "base" / "d2" / "step_6" / "config.json"
    config = json.loads(path.read_text())
    del config["sequence_len"]
    path.write_text(json.dumps(config))
    text = build_report("d2").read_text()
    assert f"| context / vocab | 2,048 / {config['vocab_size']:,} |" in text
    assert "| parameters |" in text


def test_wall_time_ignores_the_eval_files_of_another_tag(home):  # noqa: F811
    """Tag x_d2's eval file, written hours later, is not part of run d2: its end is d2's own last result."""
    meta = home / "checkpoints" / "base" / "d2" / "step_6" / "meta.json"
    end = meta.stat().st_mtime
    (home / "speedrun" / "d2").mkdir(parents=True)
    (home / "speedrun" / "d2" / "started_at").write_text(str(end - 60.0))
    other = home / "eval" / "base_loss_x_d2_step6.json"
    write_json(other, {"train_bpb": 2.5, "val_bpb": 2.6})
    os.utime(other, (end + 36000.0, end + 36000.0))
    text = build_report("d2").read_text()
    assert "Total wall time: **1m 00s** (from the run start" in text


def test_a_full_disk_leaves_the_previous_report_whole(home, monkeypatch, capsys):  # noqa: F811
    assert main(["report"]) == 0
    reports = home / "reports"
    before = {p.relative_to(reports): p.read_bytes() for p in reports.rglob("*") if p.is_file()}
    real_write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if reports in self.parents:
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    capsys.readouterr()
    assert main(["report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write the report in {reports / 'd2'}") and "No space left" in err
    assert "\n" not in err
    after = {p.relative_to(reports): p.read_bytes() for p in reports.rglob("*") if p.is_file()}
    assert after == before


def test_code_size_counts_the_c_kernels(tmp_path):
    """The package's C sources (its CPU kernels) are source code too."""
    (tmp_path / "model.py").write_text("x = 1\n")
    (tmp_path / "kernel.c").write_text("int f(void) {\n    return 1;\n}\n")
    (tmp_path / "data.jsonl").write_text('{"a": 1}\n')
    assert code_size(tmp_path) == {"files": 2, "lines": 4, "chars": 36, "tokens": 9}
