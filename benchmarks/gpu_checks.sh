#!/usr/bin/env bash
# Every GPU-only check of the LoRA, offload and FP8 issues in one run (for a session lent a GPU):
# the CUDA tests that skip on CPU, then the three benchmarks on CUDA. Each step prints its JSON or
# test summary under a header; a failing step does not stop the others. Budget: ~10 minutes on one
# H100/H200.
#
#     bash benchmarks/gpu_checks.sh [PYTHON]      # default: .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export HF_HUB_OFFLINE=1

step() { echo; echo "=== $1"; shift; timeout 300 "$@" || echo "=== step failed (exit $?)"; }

"$PY" -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', torch.cuda.get_device_capability(0) if torch.cuda.is_available() else '')"
# W8A8 (_scaled_mm) against the dequantized math, and the NCCL layouts
step "fp8 w8a8 test" "$PY" -m pytest -q -x tests/test_quantization.py -k "w8a8 or W8A8"
step "nccl layouts" "$PY" -m pytest -q -x tests/test_parallel.py -k nccl
# LoRA: unmerged vs fused in bf16 on FLUX-sized blocks (target <= 1.10x at rank 16)
step "lora benchmark" "$PY" benchmarks/lora.py --device cuda --dtype bfloat16 --tokens 4096 --repeats 10
# offload: resident vs model-level vs layerwise (stream prefetch) in bf16, Qwen-Image-sized blocks
step "offload benchmark" "$PY" benchmarks/offload.py --device cuda --dtype bfloat16 --blocks 8 --image-tokens 4096 --text-tokens 256
# FP8: W8A8 vs bf16 on a Qwen-Image-width block stack (target >= 1.3x), max_memory_allocated
step "fp8 benchmark" "$PY" benchmarks/quantization.py --quick --device cuda --hidden 3072 --blocks 4 --tokens 4096
