#!/usr/bin/env bash
# The GPU check in one command (at most 15 minutes on one H100, each part's limit in
# gpu_check.py's TIMEOUTS; CI never runs it): the GPU tests, the ImageNet-128 sampling benchmark
# against the reference loop in fp16 and in float32 (fp16/bf16, compile on/off), Serve's batching
# gain, a Serve replica's cold and warm start, and precision/recall on the GPU, written to one
# JSON file (benchmarks/gpu_check.py says what each part measures). Needs a CUDA build of torch: see the README's GPU install line.
#   bash benchmarks/gpu_check.sh [OUT.json]      (default gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${1:-gpu_check.json}"
