#!/usr/bin/env bash
# Every GPU check the project asks for, in one run of at most 8.5 minutes on a machine with one CUDA device.
#
#   bash bench/gpu_session.sh [OUTDIR] [REFERENCE_CHECKOUT]
#   SMOKE=1 bash bench/gpu_session.sh /tmp/out    # the same commands on this CPU at tiny sizes (a check, no figures)
#
# Runs from the repository root with the machine's own python3 and torch (nothing is installed:
# picochat is put on PYTHONPATH). In order of importance, each with its own time limit so that a
# slow step cannot starve the rest:
#   1. bench/gpu.py at depth 12, recipes 2026 then 2025, bf16 and fp8 (rows are saved as they
#      finish): MFU, peak memory against `picochat plan`, decode against the HBM roofline,
#      checkpoint save/load;
#   2. bench/gpu.py at depth 20 (the d20 preset's recipe, 2025);
#   3. bench/train.py at depth 12 on the GPU (picochat compiled bf16; the reference's row too when a
#      checkout is given);
#   4. bench/infer.py at depth 12 on the GPU in bf16 (engine rows; the server, continuously batching,
#      and its soak when fastapi, uvicorn and httpx can be imported, which a bare GPU image may not have);
#   5. the same server with one Engine per request (--server-max-batch 1, 8 workers): batching's gain
#      on the GPU, side by side with step 4's server rows.
# Each step's log and JSON go to OUTDIR (default ./gpu-session); a summary of exit codes ends the run.
# Where only the repository is copied to the GPU machine, put the reference checkout in a git-ignored
# folder inside it (for example .ref/nanochat, listed in .git/info/exclude) and pass that path.
set -uo pipefail

out=${1:-${OUT:-$PWD/gpu-session}}
ref=${2:-}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PICOCHAT_HOME=${PICOCHAT_HOME:-/tmp/picochat-gpu-session}
py=${PYTHON:-python3}
summary=()

step() {  # step NAME SECONDS COMMAND...: run one check under a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s, $(date +%T)): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    summary+=("$name rc=$rc $((SECONDS - t0))s")
    echo "== $name rc=$rc after $((SECONDS - t0))s"
}

if [[ ${SMOKE:-0} == 1 ]]; then  # this CPU, tiny sizes, eager: checks that every command and flag works
    gpu_sizes=(--device cpu --seq-len 32 --vocab 300 --dtype fp32 --no-compile --batch 2 --warmup 1 --steps 1)
    d12=(--depths 2) d20=(--depths 2)
    train_sizes=(--device cpu --depth 2 --vocab 512 --seq-len 32 --batch-size 2 --steps 1 --warmup 1 --threads 2
                 --skip-loader)
    variants=(pico-fp32)
    infer_sizes=(--device cpu --depth 2 --dtypes fp32 --repeats 1 --prompt-tokens 8 --new-tokens 8 --threads 2
                 --server-tokens 8 --soak 4 --soak-max-prompt 16 --soak-max-tokens 8)
    ref_variant=ref-fp32
else
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/nvidia-smi.txt"
    gpu_sizes=() d12=(--depths 12) d20=(--depths 20)
    train_sizes=(--device cuda --depth 12 --steps 5 --warmup 3 --skip-loader)
    variants=(pico-bf16-compile)
    infer_sizes=(--device cuda --depth 12 --dtypes bf16 --repeats 3 --soak 200)
    ref_variant=ref-bf16-compile
fi
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/torch.txt"

step gpu-d12 210 "$py" bench/gpu.py "${d12[@]}" --recipes 2026 2025 --fp8 "${gpu_sizes[@]}" --out "$out/gpu-d12.json"
step gpu-d20 95 "$py" bench/gpu.py "${d20[@]}" --recipes 2025 "${gpu_sizes[@]}" --out "$out/gpu-d20.json"

train_ref=(--skip-reference)
if [[ -n $ref ]]; then
    train_ref=(--reference-dir "$ref")
    variants+=("$ref_variant")
fi
step train-d12 105 "$py" bench/train.py "${train_sizes[@]}" --variants "${variants[@]}" --rounds 1 "${train_ref[@]}" \
    --out "$out/train-d12.json"

infer_server=()
if ! "$py" -c "import fastapi, uvicorn, httpx" 2>/dev/null; then
    infer_server=(--skip-server --soak 0)  # the soak runs against the server too
    echo "fastapi/uvicorn/httpx are not installed here: bench/infer.py runs its engine rows only"
fi
infer_ref=()
[[ -n $ref ]] && infer_ref=(--reference-dir "$ref")
step infer-d12 60 "$py" bench/infer.py "${infer_sizes[@]}" "${infer_server[@]}" "${infer_ref[@]}" --out "$out/infer-d12.json"
if [[ ${#infer_server[@]} == 0 ]]; then
    step serve-d12-unbatched 30 "$py" bench/infer.py "${infer_sizes[@]}" --skip-engines --soak 0 --server-max-batch 1 \
        --server-workers 8 --out "$out/serve-d12-unbatched.json"
fi

echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
! grep -qv " rc=0 " "$out/summary.txt"
