#!/usr/bin/env bash
# One GPU session's checks, in one call (device time is short): the CUDA test suite, then the
# benchmark on the GPU shapes. Usage: bash benchmarks/gpu_session.sh OUTDIR [tests|bench|all]
#   [pytest-args / benchmark-args via XTF_GPU_TESTS / XTF_GPU_BENCH]
# Peers that the GPU machine lacks travel as wheels in .whl/ (cut-cross-entropy, liger-kernel).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [tests|bench|all]}
what=${2:-all}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  timeout "${XTF_GPU_TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfE \
    ${XTF_GPU_TESTS:-tests/backends/test_triton_backend.py tests/masked_ce/test_masked_ce.py tests/xtf/test_attention_received.py} \
    2>&1 | tee "$out/pytest.log"
fi
if [[ $what == bench || $what == all ]]; then
  timeout "${XTF_GPU_BENCH_TIMEOUT:-240}" python3 -m benchmarks.masked_ce --out "$out" \
    ${XTF_GPU_BENCH:---shapes llama3-8k} 2>&1 | grep -v "it/s\|case/s\|s/case" | tee "$out/bench.log"
fi
