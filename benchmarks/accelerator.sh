#!/usr/bin/env bash
# On a machine with a GPU or TPU: every benchmark that needs one, as JSON lines with the goals beside the figures.
#   bash benchmarks/accelerator.sh [model_throughput.py options, e.g. --config configs/nemotron_h_8b.yaml]
# PYTHON picks the interpreter (default .venv/bin/python, else python3). CPU ratio benchmarks: `make bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
backend=$($PY -c "import jax; print(jax.default_backend())")
if [ "$backend" = cpu ]; then
    echo "accelerator.sh: JAX sees no GPU or TPU (backend cpu); nothing here runs without one" >&2
    exit 1
fi
echo "# backend $backend. Goals: SSD kernel fwd+bwd >= 2x the XLA chunked SSD and fwd as fast as mamba_ssm's Triton;"
echo "# matmul4 >= 2.5x bf16 at M = 1 (int4 >= 3x); decode at batch 1 >= 70% of the weight-bandwidth roofline;"
echo "# training >= 30% MFU. Each record says whether its goal is met."
echo "## SSD kernel vs XLA chunked SSD (and mamba_ssm when installed)"
$PY benchmarks/ssd_kernel.py
echo "## 4-bit matmul vs bf16"
$PY benchmarks/matmul4.py
echo "## model prefill / decode / train step"
$PY benchmarks/model_throughput.py "$@"
