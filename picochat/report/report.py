"""The run report card: one markdown file (plus PNG plots) per run, from what is on disk.

A run's stages share a checkpoint tag: `picochat base-train --tag d20` and the mid/SFT/RL
stages that start from it (they inherit the tag). The run's name is that tag, or the name
`picochat speedrun --run NAME` gave it. The report reads, under $PICOCHAT_HOME:

  checkpoints/<stage>/<tag>/step_<N>/   config.json, meta.json (metrics), tokenizer/
  logs/<stage>-<tag>.jsonl              per-step records and {"step", "eval": {...}} records
  tokenizer/tok_eval.json               compression vs GPT-2/GPT-4 (picochat tok-eval)
  eval/base_loss_<tag>_step<N>.json     train/val bpb and samples (picochat base-loss)
  eval/base_eval_<tag>_step<N>.json     CORE per task (picochat base-eval)
  eval/chat_eval_<stage>_<tag>_step<N>.json   chat task accuracies and ChatCORE (picochat chat-eval)
  eval/chat_probe_<stage>_<tag>_step<N>.json  everyday-prompt answers and their figures (picochat chat-probe)
  speedrun/<run>/started_at, *.done     run start and per-stage seconds, if `picochat speedrun` made the run

and writes reports/<run>/report.md, its plots beside it, and a copy at reports/latest.md (written
aside and moved in when complete: a failure leaves the previous report as it was).
Every section is optional: the report renders from whatever subset of stages exists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from picochat.checkpoint import STAGES, list_steps
from picochat.errors import UserError
from picochat.eval.base_loss import same_tokens_as_training
from picochat.eval.chat_probe import render_markdown as render_chat_probe
from picochat.model.gpt import GPT, GPTConfig
from picochat.report.environment import PACKAGE_DIR, code_size, environment
from picochat.report.plots import plot_bars, plot_training
from picochat.runtime import home

STAGE_TITLES = {"base": "Base model (pretraining)", "mid": "Mid-training", "sft": "Supervised fine-tuning (SFT)",
                "rl": "Reinforcement learning (RL)"}
SUMMARY_METRICS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")
WARMUP_STEPS = 3  # the training loop leaves its first steps (warm-up, compilation) out of the timings


# ---- reading the run's files ---------------------------------------------------------------------
def _json_object(text: str) -> dict | None:
    """`text` parsed, if it is a JSON object."""
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    records = map(_json_object, path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [r for r in records if r is not None and isinstance(r.get("step"), int)]


def latest_segment(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of the newest run in a log that may hold several.

    Every run of a stage and tag appends to the same log. Within one run steps never go
    back, and each step has one record of each kind; a record that breaks this starts a new
    run (a fresh start, or a resume from the checkpoint at step k). The new run supersedes the
    records after its starting checkpoint; those up to it stay (a resume continues them).
    """
    steps: list[dict] = []
    evals: list[dict] = []
    previous = None
    for r in records:
        s, is_eval = r["step"], "eval" in r
        same_kind = evals if is_eval else steps
        if (previous is not None and s < previous) or (same_kind and s <= same_kind[-1]["step"]):
            start = s if is_eval else s - 1  # the checkpoint step this run started from
            steps = [x for x in steps if x["step"] <= start] if start > 0 else []
            evals = [e for e in evals if e["step"] < start or (e["step"] == start and not is_eval)] if start > 0 else []
        (evals if is_eval else steps).append(r)
        previous = s
    return steps, evals


def newest_result(directory: Path, prefix: str) -> tuple[dict | None, int | None]:
    """(contents, N) of the `<prefix>_step<N>.json` file of `directory` with the largest N (contents: None
    if unreadable); (None, None) without one."""
    pattern = re.compile(rf"^{re.escape(prefix)}_step(\d+)\.json$")
    found = [(p, int(m.group(1))) for p in (directory.iterdir() if directory.is_dir() else ())
             if (m := pattern.match(p.name))]
    if not found:
        return None, None
    path, step = max(found, key=lambda f: f[1])  # the first of equal steps, as the directory lists them
    return read_json(path), step


def read_json(path: Path) -> dict | None:
    try:
        return _json_object(path.read_text(encoding="utf-8")) if path.exists() else None
    except UnicodeDecodeError:
        return None


def throughput_rows(steps: list[dict]) -> list[list]:
    """tokens/s and MFU over the timed steps (each process's warm-up steps left out, a resumed one's too):
    their tokens over their seconds, and MFU weighted by each step's seconds, so that a slow step counts
    for the time it took (a plain mean of per-step rates overstates a run whose step time varies)."""
    timed = [r for r in steps if r.get("timed", r["step"] > WARMUP_STEPS)] or steps
    timed = [r for r in timed if finite([r.get("dt")]) and r["dt"] > 0]
    seconds = sum(r["dt"] for r in timed)
    rows = []
    tokens = finite(r.get("tokens") for r in timed)
    if seconds > 0 and len(tokens) == len(timed):
        rows.append(["tokens/s (timed steps)", sum(tokens) / seconds])
    with_mfu = [r for r in timed if finite([r.get("mfu")])]
    mfu_seconds = sum(r["dt"] for r in with_mfu)
    if mfu_seconds > 0:
        rows.append(["MFU % (timed steps)", sum(r["mfu"] * r["dt"] for r in with_mfu) / mfu_seconds])
    return rows


def finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


@dataclass
class StageRun:
    """Everything recorded about one stage of a run."""

    stage: str
    checkpoint: Path | None = None
    meta: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    chat_eval: dict | None = None
    chat_eval_step: int | None = None

    @property
    def exists(self) -> bool:
        return self.checkpoint is not None or bool(self.steps) or self.chat_eval is not None

    def train_time_s(self) -> float:
        """Seconds the training loop ran up to the newest checkpoint, every process of the training with its
        evals and saves (the loop's `wall_time_s`, in every checkpoint), else the sum of step times."""
        recorded = self.meta.get("metrics", {}).get("wall_time_s")
        if isinstance(recorded, (int, float)):
            return float(recorded)
        return sum(finite(r.get("dt") for r in self.steps))

    def final_eval(self) -> dict:
        """Last value of every eval metric (meta.json's metrics, then the log's eval records)."""
        out = {k: v for k, v in self.meta.get("metrics", {}).items()
               if isinstance(v, (int, float)) and not k.endswith("_time_s")}
        for record in self.evals:
            out.update({k: v for k, v in record["eval"].items() if isinstance(v, (int, float))})
        return out


def load_stage(root: Path, stage: str, tag: str) -> StageRun:
    run = StageRun(stage)
    ckpt_dir = root / "checkpoints" / stage / tag
    if steps := list_steps(ckpt_dir):
        run.checkpoint = ckpt_dir / f"step_{steps[-1]}"
        run.meta = read_json(run.checkpoint / "meta.json") or {}
        run.config = read_json(run.checkpoint / "config.json") or {}
    run.steps, run.evals = latest_segment(read_jsonl(root / "logs" / f"{stage}-{tag}.jsonl"))
    run.chat_eval, run.chat_eval_step = newest_result(root / "eval", f"chat_eval_{stage}_{tag}")
    return run


def newest_tag(root: Path) -> str | None:
    """The tag with the most recently written checkpoint, over all stages."""
    metas = [m for m in (root / "checkpoints").glob("*/*/step_*/meta.json") if m.parts[-4] in STAGES]
    return max(metas, key=lambda m: m.stat().st_mtime).parts[-3] if metas else None


# ---- formatting ----------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    h, m = s // 3600, s % 3600 // 60
    return f"{h}h {m:02d}m {s % 60:02d}s" if h else (f"{m}m {s % 60:02d}s" if m else f"{seconds:.1f}s")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in cells]
    return "\n".join(lines)


# ---- sections ------------------------------------------------------------------------------------
def environment_section(env: dict, code: dict) -> str:
    git, source = env["git"], "not a git checkout"
    if git.get("commit"):
        source = f"`{git['commit'][:12]}` on {git.get('branch') or '?'}" + (
            f", **dirty** ({git['changed_files']} changed files)" if git["dirty"] else ", clean")
    rows = [["picochat source", source], ["platform", env["platform"]],
            ["CPU", f"{env['cpu']} ({env['cpu_cores']} cores)"],
            ["RAM", f"{env['ram_gib']:.1f} GiB" if env["ram_gib"] else "-"],
            ["GPU", ", ".join(env["gpus"]) if env["gpus"] else "none"],
            ["Python", env["python"]], ["torch", env["torch"] + (f" (CUDA {env['cuda']})" if env["cuda"] else "")]]
    code_rows = [["files", code["files"]], ["lines", code["lines"]], ["characters", code["chars"]],
                 ["tokens (approx., chars/4)", code["tokens"]]]
    return ("## Environment\n\n" + md_table(["", ""], rows)
            + "\n\n## Code size\n\nThe `picochat` package's source files (.py, .html, ...):\n\n"
            + md_table(["", ""], code_rows))


def tokenizer_section(root: Path, runs: dict[str, StageRun]) -> str | None:
    payload = read_json(root / "tokenizer" / "tokenizer.json")
    tok_eval = read_json(root / "tokenizer" / "tok_eval.json")
    used = {r.meta.get("tokenizer_hash") for r in runs.values() if r.meta.get("tokenizer_hash")}
    if payload is None and tok_eval is None and not used:
        return None
    lines = ["## Tokenizer"]
    if payload is not None:
        lines.append(f"\n`$PICOCHAT_HOME/tokenizer`: vocab {fmt(payload.get('vocab_size'))}, hash "
                     f"`{payload.get('hash')}`, {len(payload.get('special_tokens', {}))} special tokens.")
    if used:
        same = payload is not None and used == {payload.get("hash")}
        lines.append(f"\nCheckpoints of this run were trained with tokenizer {', '.join(f'`{h}`' for h in sorted(used))}"
                     + ("." if same or payload is None else " (differs from the one in $PICOCHAT_HOME/tokenizer)."))
    if tok_eval and tok_eval.get("rows"):
        refs = list(tok_eval.get("references", {}))
        header = ["text", "bytes", "ours B/tok"] + [f"{r} B/tok" for r in refs] + [f"vs {r}" for r in refs]
        rows = [[row["text"], row["bytes"], row["ours"]["bytes_per_token"],
                 *[row.get(r, {}).get("bytes_per_token") for r in refs],
                 *[f"{row[r]['relative_diff_pct']:+.1f}%" if r in row else "-" for r in refs]]
                for row in tok_eval["rows"]]
        lines.append("\nCompression (UTF-8 bytes per token, higher is better; vs X: fewer tokens than X is "
                     "positive):\n\n" + md_table(header, rows))
    return "\n".join(lines)


def stage_tokens(run: StageRun, step) -> int | None:
    """Tokens the stage trained on up to `step`: the sum of every step's record (a resume may have changed
    the batch; padded SFT rows and RL rollouts give each step its own count), else, with a record missing,
    steps x the fixed count of one step (None where a step's count varies)."""
    if not isinstance(step, int):
        return None
    counts = {r["step"]: r.get("tokens") for r in run.steps if r["step"] <= step}
    if step > 0 and set(counts) == set(range(1, step + 1)) and all(isinstance(c, int) for c in counts.values()):
        return sum(counts.values())
    tokens_per_step = (run.meta.get("loop") or {}).get("tokens_per_step")
    return step * tokens_per_step if isinstance(tokens_per_step, int) and tokens_per_step > 0 else None


def model_facts(run: StageRun) -> dict[str, Any]:
    """Parameter counts and FLOPs from config.json (the model is declared on the meta device)."""
    if not run.config:
        return {}
    try:  # an older config.json may lack fields: their defaults, as loading the checkpoint uses
        c = GPTConfig.from_dict(run.config)
        with torch.device("meta"):
            model = GPT(c)
    except (UserError, TypeError, KeyError) as e:  # a config from another version: say so, keep the report
        return {"model": f"config.json not readable by this version ({type(e).__name__})"}
    return {"layers / width / heads (kv)": f"{c.n_layer} / {c.n_embd} / {c.n_head} ({c.n_kv_head})",
            "context / vocab": f"{c.sequence_len:,} / {c.vocab_size:,}",
            "parameters": model.num_params(), "scaling parameters": model.num_scaling_params(),
            "FLOPs per token": model.flops_per_token()}


def stage_section(run: StageRun, out_dir: Path, root: Path) -> str:
    rows: list[list[Any]] = []
    if run.checkpoint is not None:
        rows.append(["checkpoint", f"`{run.checkpoint.relative_to(root)}`"])
        parent = run.meta.get("parent") or {}
        if parent.get("stage"):
            rows.append(["started from", f"{parent['stage']}/{parent.get('tag')} step {parent.get('step')}"])
    facts = model_facts(run) if run.stage == "base" else {}
    rows += [[name, value] for name, value in facts.items()]
    step = run.meta.get("step", run.steps[-1]["step"] if run.steps else None)
    total = run.meta.get("num_iterations", run.meta.get("num_steps"))
    rows.append(["steps", f"{fmt(step)}" + (f" of {total:,}" if isinstance(total, int) else "")])
    if (tokens := stage_tokens(run, step)) is not None:
        rows.append(["tokens", tokens])
        if "scaling parameters" in facts:
            rows += [["tokens per scaling parameter", tokens / facts["scaling parameters"]],
                     ["training FLOPs", float(facts["FLOPs per token"] * tokens)]]
    if run.steps:
        last = run.steps[-1]
        for key in ("smooth_loss", "loss", "reward", "solved"):
            if isinstance(last.get(key), (int, float)):
                rows.append([f"final {key.replace('_', ' ')}", last[key]])
        rows += throughput_rows(run.steps)
    rows.append(["training time", fmt_duration(run.train_time_s()) if run.steps or run.meta else "-"])
    if run.meta.get("world_size"):
        rows.append(["processes", run.meta["world_size"]])
    rows += [[f"eval: {name}", value] for name, value in run.final_eval().items()]
    lines = [f"## {STAGE_TITLES[run.stage]}", "\n" + md_table(["", ""], rows)]
    plot = out_dir / f"{run.stage}_training.png"
    if plot_training(run, plot):
        lines.append(f"\n![{run.stage} training]({plot.name})")
    return "\n".join(lines)


def base_loss_section(root: Path, tag: str) -> str | None:
    payload, step = newest_result(root / "eval", f"base_loss_{tag}")
    if payload is None:
        return None
    lines = [f"### Base loss (step {step})\n",
             md_table(["split", "bits per byte", "standard error"],
                      [[split, payload.get(f"{split}_bpb"), payload.get(f"{split}_bpb_se")] for split in ("train", "val")]),
             "\n" + base_loss_note(payload)]
    if payload.get("train_tokens") not in (None, payload.get("tokens_per_split")):
        lines.append(f"Train bpb over the first {fmt(payload['train_tokens'])} tokens of the train shards.")
    if samples := payload.get("samples"):
        lines.append("\nGreedy samples (prompt → completion):\n\n```")
        lines += [f"{s.get('prompt', '')}{s.get('completion', '')!r}"[:300] for s in samples]
        lines.append("```")
    return "\n".join(lines)


def base_loss_note(payload: dict) -> str:
    """Which val bpb this is, next to the in-training eval's."""
    tokens = payload.get("tokens_per_split")
    note = f"Val bpb over the first {fmt(tokens)} tokens of the val shard" if tokens else "Val bpb"
    train_tokens, train_bpb = payload.get("training_eval_tokens"), payload.get("training_eval_val_bpb")
    if train_tokens is None:
        return note + "."
    if same_tokens_as_training(payload):
        return (note + f": the same tokens as the in-training eval (its last value {fmt(train_bpb)}); "
                "standard errors across batches.")
    world = payload.get("training_eval_world_size", 1)
    processes = f" on {world} processes" if world != payload.get("world_size", 1) else ""
    return (note + f"; the in-training eval read the first {fmt(train_tokens)}{processes} (its last value "
            f"{fmt(train_bpb)}), so the two differ by which text they score.")


def chat_probe_section(root: Path, stage: str, tag: str) -> str | None:
    payload, _ = newest_result(root / "eval", f"chat_probe_{stage}_{tag}")
    try:
        return render_chat_probe(payload) if payload is not None else None
    except (KeyError, TypeError):
        return None


def base_eval_section(root: Path, tag: str, out_dir: Path) -> tuple[str | None, float | None, float]:
    """(markdown, CORE, seconds) of the newest base-eval result of the run."""
    payload, step = newest_result(root / "eval", f"base_eval_{tag}")
    if payload is None:
        return None, None, 0.0
    tasks = payload.get("tasks") or []
    rows = [[t["label"], t.get("num_fewshot"), t.get("items"), t.get("accuracy"), t.get("random_baseline"),
             t.get("centered")] for t in tasks]
    rows.append(["**CORE**", "", "", "", "", payload.get("core")])
    lines = [f"### CORE (base-eval, step {step}, {fmt_duration(payload.get('seconds'))})\n",
             md_table(["task", "shots", "items", "accuracy", "chance", "centered"], rows)]
    if tasks:
        plot = out_dir / "base_eval_core.png"
        plot_bars([t["label"] for t in tasks], {"centered": [t.get("centered") for t in tasks]}, plot,
                  f"CORE tasks (CORE = {fmt(payload.get('core'))})", "centered accuracy")
        lines.append(f"\n![CORE per task]({plot.name})")
    return "\n".join(lines), payload.get("core"), float(payload.get("seconds") or 0.0)


def chat_eval_section(run: StageRun) -> str | None:
    if run.chat_eval is None:
        return None
    details = run.chat_eval.get("details") or {}
    rows = [[name, d.get("items"), value, d.get("baseline"), d.get("centered")]
            for name, value in run.chat_eval.items()
            if name not in ("details", "run", "ChatCORE") and isinstance(value, (int, float))
            for d in [details.get(name, {})]]
    rows.append(["**ChatCORE**", "", "", "", run.chat_eval.get("ChatCORE")])
    seconds = (run.chat_eval.get("run") or {}).get("seconds")
    return (f"### Chat evaluation (step {run.chat_eval_step}, {fmt_duration(seconds)})\n\n"
            + md_table(["task", "items", "accuracy", "chance", "centered"], rows))


def speedrun_times(root: Path, run_name: str) -> tuple[float | None, dict[str, float], float | None]:
    """(start time, seconds per finished stage in pipeline order, when the last one finished), read
    from the markers `picochat speedrun` leaves in speedrun/<run>/; (None, {}, None) without them."""
    marker_dir = root / "speedrun" / run_name
    start = None
    with contextlib.suppress(OSError, ValueError):
        start = float((marker_dir / "started_at").read_text().strip())
    finished = []
    for marker in marker_dir.glob("*.done") if marker_dir.is_dir() else []:
        payload = read_json(marker) or {}  # empty for a marker torn by a crash
        if not finite([payload.get("seconds")]):
            continue
        when = finite([payload.get("finished_at")]) or [marker.stat().st_mtime]
        finished.append((when[0], marker.stem, float(payload["seconds"])))
    finished.sort()
    return start, {name: s for _, name, s in finished}, (finished[-1][0] if finished else None)


def is_run_eval(name: str, tag: str) -> bool:
    """Whether eval/<name> is a result of tag `tag` (another tag may end with this one, e.g. x_d2 and d2)."""
    stages = "|".join(STAGES)
    return re.fullmatch(rf"(base_loss|base_eval|(chat_eval|chat_probe)_({stages}))_{re.escape(tag)}_step\d+(_t.*)?\.json",
                        name) is not None


def wall_time_line(root: Path, run_name: str, tag: str, runs: dict[str, StageRun], eval_seconds: float) -> str:
    """Total wall time: from the run's start file to its last artefact, else the sum of recorded stage times."""
    start, stage_seconds, last_finished = speedrun_times(root, run_name)
    stage_times = ", ".join(f"{s} {fmt_duration(r.train_time_s())}" for s, r in runs.items())
    training = f"; training by stage: {stage_times}." if stage_times else "."
    if start is not None:
        stamps = [(r.checkpoint / "meta.json").stat().st_mtime for r in runs.values() if r.checkpoint]
        stamps += [p.stat().st_mtime for p in (root / "eval").glob("*.json") if is_run_eval(p.name, tag)]
        end = max([*stamps, last_finished or 0.0])
        if end > start:
            return (f"Total wall time: **{fmt_duration(end - start)}** (from the run start, "
                    f"{dt.datetime.fromtimestamp(start):%Y-%m-%d %H:%M}, to its last result){training}")
    if stage_seconds:
        return (f"Total wall time: **{fmt_duration(sum(stage_seconds.values()))}** (sum of the speedrun's "
                f"stage times){training}")
    total = sum(r.train_time_s() for r in runs.values()) + eval_seconds
    return f"Total wall time: **{fmt_duration(total)}** (sum of the recorded training and eval times){training}"


def pipeline_section(root: Path, run_name: str) -> str | None:
    """Seconds per pipeline stage, when the run was made by `picochat speedrun`."""
    _, seconds, _ = speedrun_times(root, run_name)
    if not seconds:
        return None
    rows = [[name, fmt_duration(s)] for name, s in seconds.items()]
    rows.append(["**total**", fmt_duration(sum(seconds.values()))])
    return "## Pipeline timing (speedrun)\n\n" + md_table(["stage", "time"], rows)


# ---- the report ----------------------------------------------------------------------------------
def check_name(flag: str, name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"{flag} {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def has_tag(root: Path, tag: str) -> bool:
    return any((root / "checkpoints" / s / tag).is_dir() or (root / "logs" / f"{s}-{tag}.jsonl").exists()
               for s in STAGES)


def resolve_names(root: Path, run_name: str | None, tag: str | None) -> tuple[str, str]:
    """(run name, checkpoint tag). The run name is --run, else $PICOCHAT_RUN (set by the speedrun),
    else the tag; the tag is --tag, else the run name if checkpoints carry it, else the newest tag."""
    run_name = run_name or os.environ.get("PICOCHAT_RUN") or None
    for flag, name in (("--run", run_name), ("--tag", tag)):
        if name:
            check_name(flag, name)
    if run_name and not (has_tag(root, run_name) or (root / "speedrun" / run_name).is_dir()
                         or (tag and has_tag(root, tag))):
        known = sorted({p.name for p in (root / "checkpoints").glob("*/*") if p.is_dir()})
        raise UserError(f"--run {run_name!r}: no checkpoints, logs or speedrun of that name under {root} "
                        f"(known: {', '.join(known) or 'none'}); omit --run for the newest run")
    if not tag:
        tag = run_name if run_name and has_tag(root, run_name) else newest_tag(root) or run_name or "default"
    return run_name or tag, tag


def stage_sections(root: Path, tag: str, runs: dict[str, StageRun], out_dir: Path) -> tuple[list[str], float | None, float]:
    """(one markdown section per stage, CORE, seconds spent in evals)."""
    sections, core, eval_seconds = [], None, 0.0
    for stage in STAGES:
        run, extra = runs.get(stage), []
        if stage == "base":
            core_text, core, seconds = base_eval_section(root, tag, out_dir)
            extra = [t for t in (base_loss_section(root, tag), core_text) if t]
            eval_seconds += seconds
        if run:
            eval_seconds += float(((run.chat_eval or {}).get("run") or {}).get("seconds") or 0.0)
            parts = [stage_section(run, out_dir, root), *extra, chat_eval_section(run),
                     chat_probe_section(root, stage, tag)]
            sections.append("\n\n".join(p for p in parts if p))
        elif extra:
            sections.append("\n\n".join([f"## {STAGE_TITLES[stage]}", *extra]))
    return sections, core, eval_seconds


def summary_section(runs: dict[str, StageRun], core: float | None, out_dir: Path) -> str:
    """The summary table, metric by stage (None where not measured), and a plot of the chat metrics."""
    table: dict[str, dict[str, float | None]] = {m: dict.fromkeys(STAGES) for m in SUMMARY_METRICS}
    table["CORE"]["base"] = core
    for stage, run in runs.items():
        for metric in SUMMARY_METRICS:
            value = (run.chat_eval or {}).get(metric)
            if isinstance(value, (int, float)):
                table[metric][stage] = float(value)
    rows = [[m] + [table[m][s] for s in STAGES] for m in SUMMARY_METRICS]
    parts = ["## Summary\n\n" + md_table(["metric"] + [s.upper() for s in STAGES], rows)]
    chat_metrics = [m for m in SUMMARY_METRICS if m != "CORE" and any(v is not None for v in table[m].values())]
    if chat_metrics:
        plot = out_dir / "chat_eval.png"
        series = {s.upper(): [table[m][s] for m in chat_metrics] for s in STAGES
                  if any(table[m][s] is not None for m in chat_metrics)}
        plot_bars(chat_metrics, series, plot, "Chat evaluation by stage", "accuracy (ChatCORE: centered)")
        parts.append(f"![chat evaluation by stage]({plot.name})")
    return "\n\n".join(parts)


def build_report(run_name: str | None = None, tag: str | None = None) -> Path:
    """Write reports/<run>/report.md (+ plots) and reports/latest.md; returns the report's path."""
    root = home()
    run_name, tag = resolve_names(root, run_name, tag)
    out_dir = root / "reports" / run_name
    # Everything is written into a temporary directory beside it first and moved in when complete: a
    # failure (a full disk) leaves the previous report, its plots and latest.md as they were.
    staging = out_dir.parent / f".{run_name}.tmp-{os.getpid()}"
    for stale in out_dir.parent.glob(f".{run_name}.tmp-*"):  # left by a report that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        text = render_report(root, run_name, tag, staging)
        (staging / "report.md").write_text(text, encoding="utf-8")
        # The top-level copy sits one directory up: point its image links into the run directory.
        latest = re.sub(r"\]\(([^)/]+\.png)\)", rf"]({run_name}/\1)", text)
        (staging / "latest.md").write_text(latest, encoding="utf-8")
        out_dir.mkdir(exist_ok=True)
        plots = {p.name for p in staging.glob("*.png")}
        for plot in sorted(plots):
            os.replace(staging / plot, out_dir / plot)
        os.replace(staging / "report.md", out_dir / "report.md")
        os.replace(staging / "latest.md", out_dir.parent / "latest.md")
    except OSError as e:
        raise UserError(f"cannot write the report in {out_dir} ({e.strerror or e}); free some space or make "
                        "$PICOCHAT_HOME/reports writable") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in out_dir.glob("*.png"):  # plots of stages that no longer exist must not linger
        if old.name not in plots:
            old.unlink(missing_ok=True)
    return out_dir / "report.md"


def render_report(root: Path, run_name: str, tag: str, out_dir: Path) -> str:
    """The report's markdown; its plots are written into `out_dir`."""
    runs = {s: r for s in STAGES if (r := load_stage(root, s, tag)).exists}
    sections, core, eval_seconds = stage_sections(root, tag, runs, out_dir)
    head = (f"# picochat report: `{run_name}`\n\nGenerated {dt.datetime.now():%Y-%m-%d %H:%M:%S} from {root}; "
            f"checkpoint tag `{tag}`, stages found: {', '.join(runs) or 'none'}.")
    if not runs:
        head += f"\n\nNo checkpoints, logs or evals found for tag `{tag}` under {root}."
    parts = [head, summary_section(runs, core, out_dir), wall_time_line(root, run_name, tag, runs, eval_seconds),
             environment_section(environment(), code_size(PACKAGE_DIR)), pipeline_section(root, run_name),
             tokenizer_section(root, runs), *sections]
    return "\n\n".join(p for p in parts if p) + "\n"
