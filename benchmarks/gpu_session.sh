#!/usr/bin/env bash
# One GPU session's checks in one call (issue 21), well under 10 minutes on an H100 / H200:
# environment, the CUDA tests of the Triton backend and the attention kernel, the masked-CE
# benchmark at llama3-8k and gemma2-8k (every method), `xtf score` at L = 4096 against its floor;
# every step under its own time limit (530 s in all), at most 8 files (CSVs + one log) in OUTDIR.
#   bash benchmarks/gpu_session.sh OUTDIR [--dry-run]
# --dry-run: the same steps and command lines on this CPU with tiny problems (a test runs it).
# The logic is in benchmarks/gpu_session.py (its docstring says what each step runs).
#
# Peers the GPU machine lacks travel as wheels (it reaches no package index). Here, once:
#   python3 -m pip download --no-deps -d .whl cut-cross-entropy liger-kernel
# (.whl/ is git-ignored), then the device call carries it and runs this script:
#   run(command="bash benchmarks/gpu_session.sh $OUT", carry=[".whl"], timeout_s=600)
# The script installs .whl/*.whl with pip --no-index --no-deps into a temporary folder.
# Results stay in OUTDIR: copy them into benchmarks/results/ and remove the GPU files they
# supersede (git keeps the old ones).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec python3 -m benchmarks.gpu_session "$@"
