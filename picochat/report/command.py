"""`picochat report`: write the report card of a run.

    picochat report                      # the newest run (or $PICOCHAT_RUN, set by `picochat speedrun`)
    picochat report --run d20            # $PICOCHAT_HOME/reports/d20/report.md (+ plots), reports/latest.md
    picochat report --run cpu --tag d4   # name the report "cpu", read the checkpoints tagged d4

See picochat/report/report.py for what it reads.
"""

from __future__ import annotations

import argparse

from picochat.report.report import build_report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default=None,
                   help="run name: the report's directory and the speedrun's markers (default: $PICOCHAT_RUN, "
                        "else the checkpoint tag)")
    p.add_argument("--tag", default=None,
                   help="checkpoint tag of the stages to report (default: the run name if checkpoints carry it, "
                        "else the newest tag)")


def run(args: argparse.Namespace) -> int:
    path = build_report(args.run, args.tag)
    print(f"report written to {path} (copy: {path.parent.parent / 'latest.md'})")
    return 0
