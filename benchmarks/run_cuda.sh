#!/usr/bin/env bash
# The GPU checks in one go: the CUDA tests, then the overhead benchmarks and the kernel count on the GPU.
#
#   bash benchmarks/run_cuda.sh [OUT_DIR]     # OUT_DIR defaults to benchmarks/results
#
# Needs a CUDA device and an environment with torch (canonreg is taken from this checkout).
# Writes OUT_DIR/*_cuda*.json and the whole output to OUT_DIR/run_cuda.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
: > "$out/run_cuda.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' 2>&1 | tee -a "$out/run_cuda.log"
status=0
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$out/run_cuda.log" || status=1
# batch 512 as on the CPU, and a batch large enough for the GPU's matmuls to dominate launch overhead
python3 benchmarks/monitor_overhead.py --device cuda --widths 1024 4096 --batch 512 --steps 5 --rounds 3 \
    --naive-max-width 1024 --cnn-batch 256 --out "$out/monitor_overhead_cuda.json" 2>&1 | tee -a "$out/run_cuda.log" || status=1
python3 benchmarks/monitor_overhead.py --device cuda --widths 4096 --batch 8192 --steps 5 --rounds 3 --no-cnn \
    --naive-max-width 0 --out "$out/monitor_overhead_cuda_b8192.json" 2>&1 | tee -a "$out/run_cuda.log" || status=1
python3 benchmarks/launches.py --device cuda --width 1024 --batch 512 --out "$out/launches_cuda.json" 2>&1 | tee -a "$out/run_cuda.log" || status=1
python3 benchmarks/loss_overhead.py --device cuda --rounds 20 --out "$out/loss_overhead_cuda.json" 2>&1 | tee -a "$out/run_cuda.log" || status=1
python3 benchmarks/optim_overhead.py --device cuda --out "$out/optim_overhead_cuda.json" 2>&1 | tee -a "$out/run_cuda.log" || status=1
exit $status
