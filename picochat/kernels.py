"""C kernels for the CPU, compiled on first use with the system's C compiler.

A kernel is one C source file inside the package. `build(source, fallback)` compiles it with
`$CC` (else cc / gcc / clang) into $PICOCHAT_KERNEL_DIR (default $PICOCHAT_HOME/kernels), once
per source, compiler and flags (the file name carries their hash), building beside the target
and renaming it into place, so concurrent builders never expose a half-written library. Where
there is no compiler, no writable place, or the build fails, it says so in one warning line
ending with `fallback` (what the caller does instead) and returns None: every kernel is an
optimisation with a torch fallback, never a requirement. PICOCHAT_CPU_KERNEL=0 turns them all off.

Flags: -O3 with OpenMP (the runtime torch already loaded), fused multiply-adds, and -mavx2 -mfma on x86-64 CPUs that
have them, plus AVX-512 (f, bw, vl, dq) where torch itself runs its AVX-512 kernels; not -march=native, so one
shared home may serve several CPU models (each flag set builds its own library). The kernels choose their
vector width from the compiler's macros (__AVX512F__: 16 fp32 lanes, else 8).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from picochat.fileio import aside
from picochat.runtime import home, warn


def compiler(language: str = "C") -> str | None:
    """The C compiler ($CC, else cc / gcc / clang), or with "C++" the one torch.compile builds its CPU
    kernels with ($CXX, else g++ / clang++); None where there is none."""
    names = (os.environ.get("CC"), "cc", "gcc", "clang") if language == "C" else (os.environ.get("CXX"), "g++", "clang++")
    return next((shutil.which(name) for name in names if name and shutil.which(name)), None)


def build(source: Path, fallback: str) -> Path | None:
    """The compiled library of `source` (compiling it if needed), or None with the reason warned."""
    cc = compiler()
    if cc is None:
        warn(f"no C compiler found (cc, gcc, clang or $CC): {fallback}")
        return None
    # -std=c99 alone turns off fusing a * b + c into one FMA instruction (ISO C's default):
    # -ffp-contract=fast turns it back on (half the arithmetic instructions in both kernels).
    options = ["-O3", "-shared", "-fPIC", "-fopenmp", "-std=c99", "-ffp-contract=fast"]
    capability = torch.backends.cpu.get_cpu_capability()  # what torch found this CPU to run: DEFAULT, AVX2, AVX512
    if platform.machine() in ("x86_64", "AMD64") and capability != "DEFAULT":
        options += ["-mavx2", "-mfma"]
        if capability == "AVX512":  # torch's test: avx512f, bw, vl and dq all present
            options += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    key = hashlib.sha256(source.read_bytes() + " ".join([cc, *options, platform.machine()]).encode()).hexdigest()
    try:
        directory = Path(os.environ.get("PICOCHAT_KERNEL_DIR") or home() / "kernels").expanduser()
        target = directory / f"{source.stem}-{key[:16]}.so"
        if target.exists():
            return target
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a read-only home, or a file where the directory should be
        warn(f"no place to build {source.name} ({e}): {fallback}")
        return None
    try:
        with aside(target) as partial:
            result = subprocess.run([cc, *options, str(source), "-o", str(partial), "-lm"], check=False,
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise subprocess.SubprocessError((result.stderr.strip().splitlines() or ["no message"])[-1])
        return target
    except (OSError, subprocess.SubprocessError) as e:
        warn(f"could not compile {source.name} ({e}): {fallback}")
        return None


_CTYPES = {"p": ctypes.c_void_p, "l": ctypes.c_long, "i": ctypes.c_int, "f": ctypes.c_float}


def load(source: Path, fallback: str, signatures: dict[str, str]) -> ctypes.CDLL | None:
    """The loaded library of `source` (built if needed), or None with the reason warned; None at
    once when PICOCHAT_CPU_KERNEL=0. `signatures` declares each function's C signature in short:
    a letter per argument, then ">" and the result's letter (none for void), with p a pointer,
    l a long, i an int and f a float; "pllp>i" is int f(void *, long, long, void *)."""
    path = build(source, fallback) if os.environ.get("PICOCHAT_CPU_KERNEL", "1") != "0" else None
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        warn(f"could not load {path} ({e}): {fallback}")
        return None
    for name, code in signatures.items():
        arguments, result = code.split(">")
        function = getattr(lib, name)
        function.argtypes, function.restype = [_CTYPES[c] for c in arguments], _CTYPES.get(result)
    return lib
