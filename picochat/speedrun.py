"""`picochat speedrun`: the whole pipeline in one command, resumable after a crash.

    picochat speedrun --preset cpu            # a laptop: built-in corpus, 23-40 minutes
    picochat speedrun --preset d20 --nproc-per-node 8
    picochat speedrun --preset d32 --nproc-per-node 8 --nnodes 2 --node-rank R --master-addr HOST0 --master-port 29500

Stages run in order as child processes (under torchrun when --nproc-per-node > 1):
data -> tok-train -> tok-eval -> base-train -> base-loss -> base-eval -> mid-train ->
chat-eval + chat-probe (mid) -> sft -> chat-eval + chat-probe (sft) -> [rl -> chat-eval + chat-probe (rl)] -> report.
A stage that finished leaves a marker in $PICOCHAT_HOME/speedrun/<run>/; running the
same command again skips finished stages and resumes the training stage that was
interrupted from its last checkpoint. --force-from STAGE re-runs from that stage on, its
training stages from scratch (without --resume; a fresh run replaces its tag's checkpoints).
--run NAME also tags every checkpoint the run writes and reads with NAME, so a second run of
one preset trains its own models instead of resuming the first one's.

Several nodes: run the same command on every node with its --node-rank. Every node needs
the same $PICOCHAT_HOME on a shared filesystem (each training stage checks this at start and
fails on every rank with one message if not). The single-process stages (data, tokenizer,
report) run on node 0 only; the other nodes go straight to the next distributed stage, whose
rendezvous waits for node 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from picochat.config import PRESETS, add_preset_argument
from picochat.data.shards import default_data_dir
from picochat.errors import UserError
from picochat.fileio import write_json, write_text
from picochat.report.report import check_name
from picochat.runtime import home
from picochat.train.base_train import BaseTrainConfig, horizon_tokens

# Pretraining text needed per token of the horizon, to size a hub download: characters per token of a
# 32K-65K BPE on web text (measured 4.2-4.8; the low end, so the estimate errs towards more), characters per
# hub shard, and the share of tokens the best-fit loader crops away; 10% spare on top.
CHARS_PER_TOKEN = 4.2
SHARD_CHARS = 250e6
BESTFIT_CROPPED = 0.35


def shards_needed(preset: str) -> int:
    """Train shards the preset's pretraining horizon reads once, from its tokens (and loader)."""
    cfg = BaseTrainConfig.defaults(preset=preset)
    tokens = horizon_tokens(cfg, PRESETS[preset].get("vocab_size", 32768))
    kept = 1.0 - (BESTFIT_CROPPED if cfg.loader == "bestfit" else 0.0)
    # A time budget sets the horizon at run time (0 tokens here): one shard, the least a run can train on.
    return max(1, math.ceil(1.1 * tokens / kept * CHARS_PER_TOKEN / SHARD_CHARS))


def plan(preset: str, rl: bool, data_source: str, shards: int,
         tag: str | None = None) -> list[tuple[str, list[str], bool]]:
    """(stage name, command args, runs on the torchrun world) for every stage, in order.

    `tag` (the speedrun's --run) names the checkpoints every stage writes and reads, so two runs of one
    preset keep apart; without it they go under the preset's own tag (d<depth>).
    """
    caps = PRESETS[preset]["speedrun"]
    p = ["--preset", preset]
    t = ["--tag", tag] if tag else []  # what a stage writes, or which checkpoint an eval reads
    f = ["--from-tag", tag] if tag else []  # the checkpoint a chat stage starts from
    data = (["data", "prepare"] if data_source == "builtin"
            else ["data", "download", "--source", data_source, "-n", str(shards)])
    # The stages that read the shards default to the built-in corpus: hub shards are named.
    d = [] if data_source == "builtin" else ["--data-dir", str(default_data_dir(data_source))]
    stages = [
        ("data", data, False),
        ("tok-train", ["tok-train", *p, *d], False),
        ("tok-eval", ["tok-eval", *d], False),
        ("base-train", ["base-train", *p, *d, *t, "--resume"], True),
        ("base-loss", ["base-loss", *caps["loss"], *d, *t], True),
        ("base-eval", ["base-eval", *caps["core"], *t], True),
    ]
    # Each chat stage trains from the one before, then is evaluated and probed.
    for command, stage in [("mid-train", "mid"), ("sft", "sft")] + ([("rl", "rl")] if rl else []):
        stages += [(command, [command, *p, *f, *t, "--resume"], True),
                   (f"chat-eval-{stage}", ["chat-eval", "--stage", stage, *caps["chat"], *t], True),
                   (f"chat-probe-{stage}", ["chat-probe", "--stage", stage, *t], False)]
    return [*stages, ("report", ["report"], False)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_preset_argument(p, default="cpu")
    p.add_argument("--rl", action="store_true", help="also run RL on GSM8K-format problems and evaluate it")
    p.add_argument("--data", choices=["builtin", "fineweb-edu", "climbmix"], default=None,
                   help="pretraining text (default: the preset's: builtin on cpu presets, a hub dataset on GPU presets)")
    p.add_argument("--shards", type=int, default=None,
                   help="train shards to download for hub data (default: what the preset's horizon reads, plus 10%%)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) for training and eval stages")
    p.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0 .. nnodes-1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0, reachable from every node")
    p.add_argument("--master-port", type=int, default=29500, help="free TCP port on node 0 for the rendezvous")
    p.add_argument("--run", default=None,
                   help="run name: its markers, report and checkpoint tag, so runs of one preset keep apart "
                        "(default: the preset; checkpoints then go under d<depth>)")
    p.add_argument("--force-from", default=None, metavar="STAGE", help="re-run this stage and every later one")
    p.add_argument("--dry-run", action="store_true", help="print the stages and exit")


def launcher(args: argparse.Namespace) -> list[str]:
    """How a distributed stage starts: torchrun across nodes, on one node, or a plain process."""
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}"]
    if args.nnodes > 1:
        return [*base, f"--nnodes={args.nnodes}", f"--node_rank={args.node_rank}",
                f"--master_addr={args.master_addr}", f"--master_port={args.master_port}", "-m", "picochat"]
    if args.nproc_per_node > 1:
        return [*base, "--standalone", "-m", "picochat"]
    return [sys.executable, "-m", "picochat"]


def run(args: argparse.Namespace) -> int:
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise UserError(f"--nnodes {args.nnodes} --nproc-per-node {args.nproc_per_node}: both must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank} must be in 0 .. {args.nnodes - 1} (--nnodes {args.nnodes})")
    data_source = args.data or PRESETS[args.preset]["speedrun"]["data"]
    shards = args.shards
    if data_source != "builtin" and shards is None:
        shards = shards_needed(args.preset)
        print(f"speedrun: {shards} train shards cover the {args.preset} horizon once (--shards overrides)", flush=True)
    if args.run:
        check_name("--run", args.run)
    stages = plan(args.preset, args.rl, data_source, shards, tag=args.run)
    names = [s[0] for s in stages]
    if args.force_from and args.force_from not in names:
        raise UserError(f"--force-from {args.force_from!r} is not a stage; stages: {', '.join(names)}")
    run_name = args.run or args.preset
    marker_dir = home() / "speedrun" / run_name  # made by the first file written into it
    forced = set(names[names.index(args.force_from):]) if args.force_from else set()
    if not args.dry_run:  # a dry run changes nothing
        for name in forced:
            (marker_dir / f"{name}.done").unlink(missing_ok=True)
    start_file = marker_dir / "started_at"
    if not start_file.exists():
        write_text(start_file, str(time.time()))
    t_all = time.time()
    for i, (name, cmd, distributed) in enumerate(stages, 1):
        marker = marker_dir / f"{name}.done"
        if name in forced:  # trains again from its parent, not from its own last checkpoint
            cmd = [a for a in cmd if a != "--resume"]
        elif marker.exists():
            print(f"[{i}/{len(stages)}] {name}: done earlier, skipping", flush=True)
            continue
        if not distributed and args.node_rank > 0:
            print(f"[{i}/{len(stages)}] {name}: runs on node 0", flush=True)
            continue
        full = [*launcher(args), *cmd] if distributed else [sys.executable, "-m", "picochat", *cmd]
        print(f"[{i}/{len(stages)}] {name}: picochat {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        rc = subprocess.call(full, env={**os.environ, "PICOCHAT_RUN": run_name})
        dt = time.time() - t0
        if rc != 0:
            again = "the same command without --force-from" if forced else "the same command"
            print(f"speedrun: stage {name} failed (exit {rc}) after {dt:.0f}s; fix the cause and run {again} "
                  "again to continue from there", file=sys.stderr)
            return rc
        write_json(marker, {"seconds": dt, "finished_at": time.time(), "command": cmd})
        print(f"[{i}/{len(stages)}] {name}: finished in {dt / 60:.1f} min", flush=True)
    if args.dry_run:
        return 0
    total = sum(stage_seconds(marker_dir).values())
    print(f"\nspeedrun {run_name}: all stages done ({total / 60:.1f} min of stage time, "
          f"{(time.time() - t_all) / 60:.1f} min in this invocation)")
    report = home() / "reports" / run_name / "report.md"
    print(f"report: {report if report.exists() else home() / 'reports'}")
    which = f"--stage {'rl' if args.rl else 'sft'}" + (f" --tag {args.run}" if args.run else "")
    print(f"talk to it:   picochat chat {which}\n"
          f"serve it:     picochat serve {which}   (then open http://127.0.0.1:8000)")
    return 0


def stage_seconds(marker_dir: Path) -> dict[str, float]:
    """Seconds per finished stage of a speedrun (for the report)."""
    return {p.stem: json.loads(p.read_text())["seconds"] for p in sorted(marker_dir.glob("*.done"))}
