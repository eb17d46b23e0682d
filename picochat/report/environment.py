"""Where a run ran and how big the code is: git state, hardware, versions, source size."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCE_SUFFIXES = {".py", ".c", ".h", ".html", ".js", ".css", ".md", ".toml", ".yaml", ".yml", ".sh"}


def _run_git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(package_dir: Path) -> dict:
    """Commit, branch and dirty flag of the picochat source tree (None outside a git checkout)."""
    commit = _run_git(["rev-parse", "HEAD"], package_dir)
    if commit is None:
        return {"commit": None}
    status = _run_git(["status", "--porcelain", "--", "."], package_dir) or ""
    return {"commit": commit, "branch": _run_git(["rev-parse", "--abbrev-ref", "HEAD"], package_dir),
            "dirty": bool(status), "changed_files": len(status.splitlines())}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    if sys.platform == "darwin":
        brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=False, capture_output=True,
                               text=True)
        if brand.returncode == 0 and brand.stdout.strip():
            return brand.stdout.strip()
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict:
    ram = None
    with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = []
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        gpus = [f"{p.name} ({p.total_memory / 2**30:.0f} GiB)" for p in props]
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gpus.append("Apple MPS")
    return {
        "git": git_state(PACKAGE_DIR),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": ram / 2**30 if ram else None,
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def code_size(package_dir: Path) -> dict:
    """Files, lines, characters and approximate tokens (chars / 4) of the package's source."""
    files = [p for p in package_dir.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
             and "__pycache__" not in p.parts]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    lines = sum(text.count("\n") + (0 if text.endswith("\n") or not text else 1) for text in texts)
    chars = sum(map(len, texts))
    return {"files": len(files), "lines": lines, "chars": chars, "tokens": chars // 4}
