"""The benchmark scripts' plumbing: machine detection, best-vs-best, the soak's request mix, the
results file, and one tiny end-to-end run of bench/infer.py (a stand-in reference included)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from picochat.config import architecture_options
from picochat.runtime import cpu_supports_fast_bf16
from picochat.train.base_train import BaseTrainConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the bench scripts import their siblings by file name

import infer
import machine
import results
import train

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes sve bf16
CPU implementer\t: 0x41
"""


def test_cpu_flags_and_model_come_from_cpuinfo():
    assert {"avx2", "avx512_bf16", "amx_bf16", "amx_tile"} <= machine.cpu_flags_of(X86_CPUINFO)
    assert machine.cpu_model_of(X86_CPUINFO) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert {"asimd", "sve", "bf16"} <= machine.cpu_flags_of(ARM_CPUINFO)
    assert machine.cpu_model_of(ARM_CPUINFO) is None
    assert machine.cpu_flags_of("") == set()


def test_machine_kind_names_the_best_matrix_unit():
    assert machine.kind_of({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, None) == "CPU AMX"
    assert machine.kind_of({"avx2", "avx512f", "avx512_bf16"}, None) == "CPU AVX512-BF16"
    assert machine.kind_of({"avx2", "fma"}, None) == "CPU AVX2"
    assert machine.kind_of({"avx2"}, "NVIDIA H100 80GB HBM3") == "CUDA NVIDIA H100 80GB HBM3"


def test_machine_record_has_every_field_and_a_header(monkeypatch):
    monkeypatch.setenv("PICOCHAT_DTYPE", "fp32")
    info = machine.describe_machine(torch.device("cpu"))
    assert info["auto_dtype"] == "fp32" and info["dtype_env"] == "fp32"  # the switch is what auto resolves to
    assert info["torch_threads"] == torch.get_num_threads() and info["torch_version"] == torch.__version__
    assert set(info["cpu_flags"]) <= set(machine.SPEED_FLAGS) and info["cpus"] >= info["cpus_usable"] >= 1
    header = machine.format_machine(info)
    assert header.startswith(f"machine: {info['kind']}") and "auto dtype fp32 ($PICOCHAT_DTYPE=fp32)" in header


def test_best_row_is_each_systems_fastest_dtype_per_batch():
    engines = {"picochat": {"fp32": {"batch1": {"decode_tok_s": 300.0}, "batch8": {"decode_tok_s": 2000.0}},
                            "bf16": {"batch1": {"decode_tok_s": 500.0}, "batch8": {"decode_tok_s": 1500.0}}},
               "reference": {"fp32": {"batch1": {"decode_tok_s": 200.0}, "batch8": {"decode_tok_s": 800.0}},
                             "bf16": {"batch1": {"decode_tok_s": 250.0}, "batch8": {"decode_tok_s": 1000.0}}}}
    best = infer.best_rows(engines)
    assert best["picochat"]["batch1"] == {"dtype": "bf16", "decode_tok_s": 500.0}
    assert best["picochat"]["batch8"]["dtype"] == "fp32"
    assert best["reference"]["batch1"]["dtype"] == "bf16"
    assert infer.best_speedups(best) == {"batch1": 2.0, "batch8": 2.0}
    assert infer.best_speedups(infer.best_rows({"picochat": engines["picochat"]})) is None


def test_soak_plan_mixes_routes_lengths_n_and_streaming_reproducibly():
    plan = infer.soak_plan(200, seed=3, max_prompt=40, max_tokens=9)
    assert plan == infer.soak_plan(200, seed=3, max_prompt=40, max_tokens=9)
    assert plan != infer.soak_plan(200, seed=4, max_prompt=40, max_tokens=9)
    assert {route for route, _ in plan} == {"chat/completions", "completions"}
    assert {body["n"] for _, body in plan} == {1, 2, 3, 4}
    assert {body["stream"] for _, body in plan} == {True, False}
    lengths = [len(body["prompt"]) if "prompt" in body else len(body["messages"][0]["content"]) for _, body in plan]
    assert min(lengths) >= 1 and max(lengths) <= 40 and len(set(lengths)) > 20
    assert {body["max_tokens"] for _, body in plan} == set(range(1, 10))
    assert all(body["stream_options"] == {"include_usage": True} for _, body in plan if body["stream"])


def test_results_file_is_written_whole_or_not_at_all(tmp_path, capsys):
    out = tmp_path / "deep" / "infer.json"
    assert results.write_results(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and not list(out.parent.glob("*.tmp"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert not results.write_results(blocker / "infer.json", {"a": 1})
    assert f"--out {blocker / 'infer.json'}: cannot write it" in capsys.readouterr().err


# A stand-in for the reference checkout: its dtype is fixed from NANOCHAT_DTYPE at import, as the
# real one's is, and its engine yields one token column per step.
STAND_IN = {
    "__init__.py": "",
    "common.py": """
        import os
        import torch
        COMPUTE_DTYPE = {"bfloat16": torch.bfloat16}.get(os.environ.get("NANOCHAT_DTYPE"), torch.float32)
    """,
    "gpt.py": """
        from dataclasses import dataclass
        import torch

        @dataclass
        class GPTConfig:
            sequence_len: int
            vocab_size: int
            n_layer: int
            n_head: int
            n_kv_head: int
            n_embd: int
            window_pattern: str

        class GPT(torch.nn.Module):
            def __init__(self, config):
                super().__init__()
                self.lm_head = torch.nn.Linear(config.n_embd, 8)

            def init_weights(self):
                torch.nn.init.zeros_(self.lm_head.weight)
    """,
    "engine.py": """
        class Engine:
            def __init__(self, model, tokenizer):
                self.model = model

            def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
                for _ in range(max_tokens):
                    yield [1] * num_samples, [1] * num_samples
    """,
}


@pytest.mark.slow
def test_infer_bench_reports_machine_dtype_rows_best_server_and_soak_memory(tmp_path, picochat_home):
    reference = tmp_path / "reference"
    (reference / "nanochat").mkdir(parents=True)
    for name, text in STAND_IN.items():
        (reference / "nanochat" / name).write_text(textwrap.dedent(text))
    env = {**os.environ, "PICOCHAT_HOME": str(picochat_home)}
    env.pop("PICOCHAT_DTYPE", None)
    proc = subprocess.run([sys.executable, str(BENCH / "infer.py"), "--depth", "1", "--threads", "1",
                           "--prompt-tokens", "4", "--new-tokens", "4", "--repeats", "1", "--dtypes", "fp32", "bf16",
                           "--reference-dir", str(reference), "--server-tokens", "2", "--soak", "6",
                           "--soak-max-prompt", "16", "--soak-max-tokens", "4", "--soak-concurrency", "3"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ")
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    saved = list((picochat_home / "bench").glob("infer-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text()) == report

    assert {"kind", "cpu_model", "cpu_flags", "cpus", "torch_threads", "torch_version", "auto_dtype"} <= set(
        report["machine"])
    for system in ("picochat", "reference"):
        for dtype in ("fp32", "bf16"):
            rows = report["engines"][system][dtype]
            assert set(rows) == {"batch1", "batch8"} and all(r["decode_tok_s"] > 0 for r in rows.values())
            assert report["workers"][f"{system}:{dtype}"]["compute_dtype"] == dtype  # each in its own process
    assert report["workers"]["picochat:bf16"]["weights_dtype"] == "bf16"  # cast once, as the server does
    assert set(report["best"]["picochat"]) == set(report["speedup"]) == {"batch1", "batch8"}
    assert report["best"]["picochat"]["batch1"]["dtype"] in ("fp32", "bf16")
    for dtype in ("fp32", "bf16"):
        soak = report["soak"][dtype]
        assert soak["requests"] == soak["ok"] == 6 and soak["errors"] == 0, soak
        assert all(soak["rss_mb"][point] > 50 for point in ("loaded", "start", "middle", "end"))
        server = report["server"][dtype]
        assert set(server) == {"clients1", "clients8", "clients32", "client_pid", "server_pid"}, server
        assert all(server[f"clients{n}"]["tok_s"] > 0 for n in (1, 8, 32))
        # the clients are a process of their own, not threads of the server's
        assert server["client_pid"] != server["server_pid"] and soak["client_pid"] != soak["server_pid"]
    # bf16 was asked for: where the CPU has no fast bf16 the report says its rows run slow code
    slow = [] if cpu_supports_fast_bf16() else ["bf16 on a CPU without AMX/AVX512-BF16: its matmuls fall back to slow code"]
    assert report["notes"] == slow


def test_train_bench_best_rows_name_their_dtype_and_bf16_mfu(capsys):
    def row(variant, tok_s, error=None):
        system, dtype, compiled = train.VARIANTS[variant]
        base = {"variant": variant, "system": system, "dtype": dtype, "compile": compiled}
        if error:
            return {**base, "error": error}
        return {**base, "tok_per_s": tok_s, "mfu_fp32_peak": tok_s / 100, "mfu_bf16_peak": tok_s / 400}

    rows = [row("pico-fp32", 3000), row("pico-bf16", 5000), row("pico-bf16-compile", 0, "exit 1"),
            row("ref-fp32", 2000), row("ref-bf16-compile", 2500)]
    best = train.best_of_each_system(rows)
    assert best["picochat"]["variant"] == "pico-bf16" and best["reference"]["variant"] == "ref-bf16-compile"
    assert train.print_best(best, {"fp32": 1e11, "bf16": 4e11}) == 2.0
    out = capsys.readouterr().out
    assert "picochat best: pico-bf16 (bf16, eager) 5,000 tok/s, MFU 12.5% of the bf16 peak, 50.0% of the fp32" in out
    assert "reference best: ref-bf16-compile (bf16, compiled)" in out and "/ reference best (ref-bf16-compile): 2.00x" in out
    assert train.print_best({"picochat": best["picochat"]}, {"fp32": 1e11}) is None
    assert "no bf16 peak: this CPU has no fast bf16 matmuls" in capsys.readouterr().out


def test_gpu_bench_builds_each_recipe_as_base_train_does_and_needs_cuda():
    import gpu

    classic, classic_muon = gpu.recipe_parts("2025")
    modern, modern_muon = gpu.recipe_parts("2026")
    assert classic == {} and classic_muon.orthogonalizer == "newton_schulz"
    assert modern["value_embeds"] and modern["window_pattern"] == "SSSL" and modern_muon.orthogonalizer == "polar_express"
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--depths", "2", "--recipes", "2026", "--fp8"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert run.returncode == 2 and "no CUDA device" in run.stderr


GPU_IMAGE_RUNNER = """
import importlib.abc, runpy, sys
ABSENT = {"rustbpe", "fastapi", "uvicorn", "starlette", "pydantic"}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"{name} is not installed on this image")
sys.meta_path.insert(0, Refuse())
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
runpy.run_path(script, run_name="__main__")
"""


def test_gpu_bench_runs_every_part_on_a_cpu_at_small_sizes(tmp_path, picochat_home):
    """--device cpu runs the GPU script's own code (training rows for both recipes with and without fp8,
    decode, checkpoint save/load) so that a broken part shows here, not on a rented GPU."""
    out = tmp_path / "gpu.json"
    # A GPU machine's image has torch but may lack picochat's serving and tokenizer-training packages:
    # the script runs with those imports refused.
    cmd = [sys.executable, "-c", GPU_IMAGE_RUNNER, str(BENCH / "gpu.py"), "--device", "cpu", "--depths", "2",
           "--recipes", "2025", "2026", "--fp8", "--seq-len", "32", "--vocab", "300", "--dtype", "fp32",
           "--no-compile", "--warmup", "1", "--steps", "1", "--batch", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "PICOCHAT_HOME": str(picochat_home)})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result
    assert result["device"].startswith("CPU") and result["dtype"] == "fp32" and result["compiled"] is False
    rows = result["rows"]
    assert [(r["recipe"], r["fp8"]) for r in rows] == [("2025", False), ("2025", True), ("2026", False), ("2026", True)]
    for r in rows:
        assert r["batch"] == 2 and r["tok_per_s"] > 0 and math.isfinite(r["loss"]) and r["peak_mem_gib"] > 0
        assert r["plan_mem_gib"] > 0 and "error" not in r
    for r in rows[0], rows[2]:  # decode and checkpoints run once per model, without fp8
        assert r["decode_tok_per_s"] > 0 and r["decode_roofline_tok_per_s"] is None  # no bandwidth entry for a CPU
        assert r["save_s"] >= 0 and r["load_s"] >= 0 and r["ckpt_gb"] > 0
    assert not any(p.name.startswith(".gpu-ckpt") for p in (picochat_home / "bench").iterdir())
    bad = subprocess.run(cmd[:4] + ["--device", "cpu", "--steps", "0"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


@pytest.mark.slow
def test_gpu_session_script_runs_every_step_with_its_flags(tmp_path, picochat_home):
    """bench/gpu_session.sh is what a machine with a GPU runs, once and within its time: SMOKE=1 runs
    the same commands and flags on this CPU at tiny sizes, so a wrong flag or a broken step shows here."""
    out = tmp_path / "session"
    env = {**os.environ, "SMOKE": "1", "PYTHON": sys.executable, "PICOCHAT_HOME": str(picochat_home)}
    run = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], cwd=BENCH.parent, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    summary = (out / "summary.txt").read_text().splitlines()
    steps = ["gpu-d12", "gpu-d20", "train-d12", "infer-d12", "serve-d12-unbatched"]
    assert [line.split()[0] for line in summary] == steps, run.stdout[-3000:]
    assert run.returncode == 0 and all(" rc=0 " in line for line in summary), (summary, run.stdout[-3000:])
    rows = json.loads((out / "gpu-d12.json").read_text())["rows"]
    assert [(r["recipe"], r["fp8"]) for r in rows] == [("2026", False), ("2026", True), ("2025", False), ("2025", True)]
    assert json.loads((out / "train-d12.json").read_text())["rows"]
    assert json.loads((out / "infer-d12.json").read_text())["engines"]["picochat"]
    unbatched = json.loads((out / "serve-d12-unbatched.json").read_text())
    assert unbatched["server_setup"] == {"workers": 8, "max_batch": 1, "tokens_per_request": 8}
    assert unbatched["server"]["fp32"]["clients8"]["tok_s"] > 0


def test_decode_rate_ends_at_the_last_token_not_at_the_generators_end(monkeypatch):
    """A generator may still work after its last column (the reference's engine runs one more
    forward pass whose logits no step uses): that time is not decoding. On a clock where the
    prefill takes 1 s, each column 1 s and the trailing work 10 s, 5 columns of batch 2 are
    8 tokens after the first in 4 s."""
    clock = [0.0]
    monkeypatch.setattr(infer.time, "perf_counter", lambda: clock[0])

    def generate():
        for _ in range(5):
            clock[0] += 1.0
            yield [7, 7], [1, 1]
        clock[0] += 10.0

    ttft_ms, tok_s = infer.time_one(generate, batch=2, max_tokens=5)
    assert ttft_ms == 1000.0 and tok_s == 2.0


def absent_packages(tmp_path: Path) -> Path:
    """A PYTHONPATH entry under which picochat serve's, the load client's and the tokenizer trainer's
    packages fail to import, as on a bare GPU image (worker processes inherit it)."""
    absent = tmp_path / "absent"
    for name in ("fastapi", "uvicorn", "starlette", "httpx", "pydantic", "rustbpe"):
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed on this image')\n")
    return absent


def test_infer_engine_rows_run_without_the_serving_packages(tmp_path, picochat_home):
    """A bare GPU image has torch but may lack fastapi, uvicorn and httpx: --skip-server --soak 0
    (what bench/gpu_session.sh passes there) still times the engines; asking for the server or the
    soak there is refused in one line."""
    absent = absent_packages(tmp_path)
    env = {**os.environ, "PICOCHAT_HOME": str(picochat_home), "PYTHONPATH": str(absent)}
    env.pop("PICOCHAT_DTYPE", None)
    base = [sys.executable, str(BENCH / "infer.py"), "--device", "cpu", "--depth", "1", "--threads", "1",
            "--prompt-tokens", "4", "--new-tokens", "4", "--repeats", "1", "--dtypes", "fp32"]
    out = tmp_path / "infer.json"
    run = subprocess.run([*base, "--skip-server", "--soak", "0", "--out", str(out)], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text())["engines"]["picochat"]["fp32"]["batch1"]["decode_tok_s"] > 0
    refused = subprocess.run([*base, "--skip-server"], capture_output=True, text=True, env=env, timeout=120,
                             check=False)
    assert refused.returncode == 2 and "--skip-server --soak 0" in refused.stderr, refused.stderr[-3000:]


def test_infer_arch_times_the_cpu_presets_model_and_skips_the_classic_only_reference(tmp_path, picochat_home):
    """--arch cpu builds the model base-train --preset cpu builds (value embeddings, smear, backout,
    windows) and, the reference having only the classic architecture, times picochat alone, saying so."""
    reference = tmp_path / "reference"
    (reference / "nanochat").mkdir(parents=True)
    (reference / "nanochat" / "engine.py").write_text("raise ImportError('never imported')\n")
    env = {**os.environ, "PICOCHAT_HOME": str(picochat_home)}
    env.pop("PICOCHAT_DTYPE", None)
    out = tmp_path / "infer.json"
    run = subprocess.run([sys.executable, str(BENCH / "infer.py"), "--device", "cpu", "--depth", "2", "--threads", "1",
                          "--prompt-tokens", "4", "--new-tokens", "4", "--repeats", "1", "--dtypes", "fp32",
                          "--arch", "cpu", "--reference-dir", str(reference), "--skip-server", "--soak", "0",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    cpu = BaseTrainConfig.defaults(preset="cpu")
    assert report["arch_options"] == architecture_options(cpu) and report["arch_options"]["value_embeds"] is True
    assert list(report["engines"]) == ["picochat"] and report["engines"]["picochat"]["fp32"]["batch1"]["decode_tok_s"] > 0
    assert any("classic architecture only" in note for note in report["notes"])


def test_gpu_session_without_the_serving_packages_runs_the_engine_rows(tmp_path, picochat_home):
    """On an image without fastapi, uvicorn and httpx the session's infer step must still time the
    engines (no server, no soak) and exit 0. Only that step runs here: a stand-in python skips
    bench/gpu.py and bench/train.py, which the test above runs."""
    absent = absent_packages(tmp_path)
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\ncase "$1" in bench/gpu.py|bench/train.py) exit 0;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    out = tmp_path / "session"
    env = {**os.environ, "SMOKE": "1", "PYTHON": str(python), "PICOCHAT_HOME": str(picochat_home),
           "PYTHONPATH": str(absent)}
    run = subprocess.run(["bash", str(BENCH / "gpu_session.sh"), str(out)], cwd=BENCH.parent, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["gpu-d12", "gpu-d20", "train-d12", "infer-d12"], run.stdout
    assert run.returncode == 0, (summary, (out / "infer-d12.log").read_text()[-3000:])
    report = json.loads((out / "infer-d12.json").read_text())
    assert report["engines"]["picochat"] and "server" not in report and "soak" not in report


def test_model_step_reports_no_warmup_time_without_warmup_steps():
    """--warmup 0: no untimed steps, so no warm-up seconds (it was a reading of the clock itself)."""
    import model_step

    config = model_step.GPTConfig.from_depth(1, 64, aspect_ratio=64, head_dim=64, max_seq_len=8)
    row = model_step.bench_variant(config, batch=1, dtype=torch.float32, compile_model=False, steps=1, warmup=0)
    assert row["warmup_s"] == 0.0 and row["step_s"] > 0
    row = model_step.bench_variant(config, batch=1, dtype=torch.float32, compile_model=False, steps=1, warmup=1)
    assert 0 < row["warmup_s"] < 60


def test_train_bench_saves_its_rows_as_they_come(tmp_path, monkeypatch):
    """A run stopped by a time limit (bench/gpu_session.sh gives each step one) keeps the rows that
    finished: run_rounds hands the best rows so far to its callback after every run."""
    fake = {"step_times": [0.5, 0.5], "flops_per_token": 100, "warmup_s": 1.0, "losses": [3.0, 2.0],
            "params": 10, "load_avg_1m": 0.1, "omp_wait_policy": "PASSIVE"}
    calls = []

    def run_worker(spec, threads, env=None):
        calls.append(spec["kind"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the time limit's signal, in the second run
        return dict(fake)

    monkeypatch.setattr(train, "run_worker", run_worker)
    args = SimpleNamespace(rounds=1, reference_env=[], reference_dir=None, threads=1)
    spec = {"batch": 2, "seq_len": 8}
    out = tmp_path / "train.json"
    with pytest.raises(KeyboardInterrupt):
        train.run_rounds(["pico-fp32", "pico-bf16"], spec, {"fp32": 1e9}, args,
                         on_row=lambda rows: results.write_results(out, {"partial": True, "rows": rows}, announce=False))
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and [r["variant"] for r in saved["rows"]] == ["pico-fp32"]
    assert saved["rows"][0]["tok_per_s"] == 32.0  # 2 x 8 tokens in a 0.5 s median step


def run_script(script: str, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_train_and_infer_refuse_a_device_that_is_not_there_in_one_line(tmp_path):
    """A wrong --device is the user's mistake: one line naming the flag and exit 2, no traceback."""
    for script, extra in (("train.py", ["--skip-reference", "--skip-loader"]),
                          ("infer.py", ["--skip-server", "--soak", "0"])):
        run = run_script(script, "--device", "nonsense", *extra, "--out", str(tmp_path / "x.json"))
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert "--device 'nonsense' is not a device" in run.stderr


def test_bench_flags_that_would_make_wrong_numbers_or_tracebacks_are_refused():
    """Each of these silently measured something else (a negative --warmup timed the warm-up steps and
    untimed the rest; one new token has no decode rate) or ended in a traceback (--steps 0 divides by
    zero, takes the median of nothing): now one line naming the flag."""
    cases = [("train.py", ["--warmup", "-1"], "--warmup must be 0 or more"),
             ("train.py", ["--loader-seconds", "0"], "--loader-seconds must be positive"),
             ("infer.py", ["--threads", "-1"], "--threads must be at least 1"),
             ("infer.py", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
             ("gpu.py", ["--device", "cpu", "--batch", "-1"], "--batch must be >= 1"),
             ("gpu.py", ["--device", "cpu", "--warmup", "-1"], "--warmup must be >= 0"),
             ("model_step.py", ["--steps", "0"], "--steps must be at least 1"),
             ("model_step.py", ["--warmup", "-1"], "--warmup must be 0 or more"),
             ("muon_options.py", ["--rounds", "0"], "--rounds must be at least 1"),
             ("muon_options.py", ["--steps", "0"], "--steps must be at least 1"),
             ("sharded_state.py", ["--steps", "0"], "--steps must be at least 1"),
             ("sharded_state.py", ["--worlds", "1", "0"], "--worlds must be at least 1"),
             ("tokenizer.py", ["--repeats", "0"], "--repeats must be at least 1"),
             ("tokenizer.py", ["--vocab-sizes", "8k"], "--vocab-sizes '8k': give sizes separated by commas"),
             ("tokenizer.py", ["--vocab-sizes", "100"], "--vocab-sizes: each must be at least")]
    for script, argv, message in cases:
        try:  # refused while parsing the flags: long before a minute (a benchmark that runs would take longer)
            run = run_script(script, *argv, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{script} {' '.join(argv)} was not refused: it ran")
        assert run.returncode == 2 and message in run.stderr, (script, argv, run.stderr[-2000:])


def test_gpu_bench_marks_the_rows_saved_before_the_end_partial(tmp_path, monkeypatch, picochat_home):
    """gpu.py saves its rows after each one (a time limit may stop it); a file saved before the end
    must say so, or a run cut short reads as a complete one with fewer rows."""
    import gpu

    made = []

    def train_row(depth, recipe, fp8, *args):
        if made:
            raise KeyboardInterrupt  # the time limit, during the second row
        made.append(depth)
        return {"depth": depth, "recipe": recipe, "fp8": fp8, "tok_per_s": 1.0}, None

    monkeypatch.setattr(gpu, "train_row", train_row)
    monkeypatch.setattr(gpu, "use_expandable_segments", lambda: None)
    out = tmp_path / "gpu.json"
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--depths", "2", "3", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        gpu.main()
    saved = json.loads(out.read_text())
    assert saved["partial"] is True and [r["depth"] for r in saved["rows"]] == [2]
    made.clear()
    monkeypatch.setattr(gpu, "train_row", lambda depth, recipe, fp8, *args: (
        {"depth": depth, "recipe": recipe, "fp8": fp8}, None))
    assert gpu.main() == 0
    saved = json.loads(out.read_text())
    assert "partial" not in saved and [r["depth"] for r in saved["rows"]] == [2, 3]


def test_infer_bench_saves_engine_rows_as_each_batch_size_finishes(tmp_path, monkeypatch, picochat_home):
    """A time limit that stops infer.py during the batch-8 rows (bench/gpu_session.sh gives it one)
    keeps the batch-1 rows that finished, marked partial."""

    class FakeWorker:
        def __init__(self, system, dtype, args):
            self.system, self.dtype, self.name = system, dtype, f"{system}:{dtype}"

        def read(self):
            return {"compute_dtype": self.dtype}

        def run(self, batch):
            if batch == 8:
                raise KeyboardInterrupt  # the time limit's signal
            return {"ttft_ms": 5.0, "decode_tok_s": 100.0}

        def close(self):
            pass

    monkeypatch.setattr(infer, "EngineWorker", FakeWorker)
    out = tmp_path / "infer.json"
    monkeypatch.setattr(sys, "argv", ["infer.py", "--device", "cpu", "--dtypes", "fp32", "--repeats", "1",
                                      "--skip-server", "--soak", "0", "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        infer.main()
    saved = json.loads(out.read_text())
    assert saved["partial"] is True
    assert saved["engines"] == {"picochat": {"fp32": {"batch1": {"ttft_ms": 5.0, "decode_tok_s": 100.0,
                                                                 "decode_tok_s_median": 100.0, "runs": 1}}}}


def test_micro_benchmarks_state_the_machine_and_write_their_json(tmp_path, picochat_home):
    """model_step.py, muon_options.py, sharded_state.py and tokenizer.py time dtypes and kernels whose
    speed depends on the CPU's kind (AVX2 alone runs bf16 matmuls ~50x slower): like the other
    scripts each starts with the machine header, puts the record in its JSON line and writes that
    line to --out."""
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(["the cat sat on the mat", "a dog ran"][i % 2] for _ in range(20))
                                  for i in range(50)))
    runs = {"model_step.py": ["--depth", "1", "--vocab", "64", "--seq", "8", "--batch", "1", "--threads", "1",
                              "--steps", "1", "--warmup", "0", "--dtype", "fp32"],
            "muon_options.py": ["--depth", "1", "--threads", "1", "--steps", "1", "--rounds", "1",
                                "--part-repeats", "1", "--dtype", "fp32"],
            "sharded_state.py": ["--depth", "1", "--vocab", "64", "--seq", "8", "--batch", "1", "--accum", "1",
                                 "--worlds", "1", "--time-world", "1", "--steps", "1", "--warmup", "0",
                                 "--rounds", "1"],
            "tokenizer.py": ["--text-file", str(text), "--vocab-sizes", "300", "--repeats", "1", "--threads", "1"]}
    env = {**os.environ, "PICOCHAT_HOME": str(picochat_home)}
    for script, argv in runs.items():
        out = tmp_path / f"{script}.json"
        run = subprocess.run([sys.executable, str(BENCH / script), *argv, "--out", str(out)], capture_output=True,
                             text=True, env=env, timeout=300, check=False)
        assert run.returncode == 0, (script, run.stderr[-3000:])
        assert run.stdout.startswith("machine: "), (script, run.stdout[:300])
        report = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
        assert {"kind", "cpu_flags", "auto_dtype", "torch_threads"} <= set(report["machine"]), script
        assert json.loads(out.read_text()) == report, script



@pytest.mark.parametrize("kind", ["packed", "bestfit", "aligned"])
def test_train_bench_loader_row_reads_with_the_loader_asked_for(tmp_path, monkeypatch, kind):
    from picochat.data import loader as loaders
    from tests.train.conftest import build_corpus

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))  # no saved tokenizer: a small one is trained
    data_dir = build_corpus(tmp_path, n_docs=120)
    kinds, real = [], loaders.make_loader
    monkeypatch.setattr(loaders, "make_loader", lambda k, *a, **kw: kinds.append(k) or real(k, *a, **kw))
    row = train.loader_row({"data_dir": str(data_dir), "batch": 2, "seq_len": 32, "loader_seconds": 0.2,
                            "loader": kind})
    assert kinds == [kind] and row["tok_per_s"] > 0 and row["batches"] >= 1
