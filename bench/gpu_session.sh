#!/usr/bin/env bash
# The one prepared script for a GPU machine (an H200; at most 15 minutes of GPU time in all).
#
#   on a machine with PyPI, once: bash bench/gpu_wheels.sh   (fills .whl/)
#   on the GPU machine, with .whl/ beside the checkout: bash bench/gpu_session.sh   (580 s limit)
#
# In order, each step under its own time limit so one hang cannot eat the rest:
#   1. the device and package versions;
#   2. every kernel test on the GPU under compute-sanitizer memcheck (the check the interpreter
#      corruption finding in kernels/README.md asks for: an out-of-bounds access is an error;
#      the caching allocator is off so every tensor is its own allocation);
#   3. bench/kernels.py at GLM-4.5 shapes (issue 4's table: fused MoE vs _grouped_mm + permutes,
#      FP8 block GEMM vs bf16 mm);
#   4. bench/train.py --device cuda (glmc's compiled step vs transformers eager, bf16 autocast);
#   5. bench/generate.py --device cuda --bf16 only: decode tokens/s in bf16 of transformers generate() (default
#      cache; static cache + compiled forward with CUDA graphs) against glmc's static-cache
#      runtime (eager; compiled with mode="reduce-overhead", i.e. CUDA graphs), batch 1 and 8,
#      and MTP K=1..3 on the demo model it trains (fewer steps than on CPU: the limit is tight).
# Logs go to $OUT when it is set, else to ./gpu-out. Copy the tables into
# bench/RESULTS.md with the date and the device line.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=8
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_session: installing .whl/ failed"; exit 2; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.txt, never abort the script
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$OUT/$name.txt"
}

step env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
    python3 -c "import torch, triton, transformers, pydantic, glmc; print(torch.__version__, triton.__version__, transformers.__version__, pydantic.__version__, torch.cuda.get_device_name())"'
step sanitizer 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -q -x -p no:cacheprovider tests/kernels -k "not cutlass and not triton_aot"
step kernels 160 python3 bench/kernels.py --no-cutlass
step train 110 python3 bench/train.py --device cuda --batch 8 --seq 1024 --steps 10
step generate 130 python3 bench/generate.py --device cuda --threads 8 --steps 150 --repeats 2 --new-tokens 64 --bf16 only
