"""The report's plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the report module imports this one
    from picochat.report.report import StageRun


def _pyplot():
    import matplotlib  # ~0.5 s to import: only when a report draws its plots

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_training(run: StageRun, path: Path) -> bool:
    """Training curve (loss, or reward for RL) and the eval metrics over steps, side by side."""
    key = "reward" if any("reward" in r for r in run.steps) else "loss"
    points = [(r["step"], r[key]) for r in run.steps if isinstance(r.get(key), (int, float))]
    smooth = [(r["step"], r["smooth_loss"]) for r in run.steps if isinstance(r.get("smooth_loss"), (int, float))]
    eval_keys = sorted({k for e in run.evals for k, v in e["eval"].items() if isinstance(v, (int, float))})
    panels = bool(points) + bool(eval_keys)
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    if points:
        ax = axes.pop(0)
        ax.plot(*zip(*points), color="tab:blue", alpha=0.35 if smooth else 1.0, label=key)
        if smooth and key == "loss":
            ax.plot(*zip(*smooth), color="tab:blue", label="smoothed loss")
        ax.set(xlabel="step", ylabel=key, title=f"{run.stage}: {key}")
    if eval_keys:
        ax = axes.pop(0)
        for k in eval_keys:
            series = [(e["step"], e["eval"][k]) for e in run.evals if isinstance(e["eval"].get(k), (int, float))]
            ax.plot(*zip(*series), marker="o", label=k)
        ax.set(xlabel="step", title=f"{run.stage}: evals")
    for ax in fig.axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_bars(labels: list[str], series: dict[str, list[float | None]], path: Path, title: str,
              xlabel: str) -> None:
    """Horizontal grouped bars: one group per label, one bar per series (missing values skipped)."""
    plt = _pyplot()
    n = max(1, len(series))
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) * max(1, n * 0.6) + 1.2))
    for i, (name, values) in enumerate(series.items()):
        ys = [j + i * height for j, v in enumerate(values) if v is not None]
        ax.barh(ys, [v for v in values if v is not None], height=height, label=name)
    ax.set_yticks([j + height * (n - 1) / 2 for j in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    if n > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
