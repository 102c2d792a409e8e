#!/usr/bin/env bash
# The GPU check in one run, for a machine with CUDA where PyTorch, torchvision, timm and einops
# are already installed (bnvit itself is used from src/, nothing is installed):
#
#   1. the tests that need CUDA (fp16/bf16 autocast keeps BatchNorm statistics in fp32, ...);
#   2. the benchmark suite on CUDA: training step and inference against the straightforward model
#      at equal precision (fp32 vs fp32, bf16 vs bf16, with the fp32 agreement check), one epoch end
#      to end, deployment (the article's size, and ViT-S/16 at 224), and the wall time of the
#      article's whole sweep (20 runs of 10 epochs) with its final accuracies.
#
# Everything lands in OUT_DIR: cuda.json (the benchmark results), bench.log, tests.log.
#
#   BNVIT_DATA=path/to/data bash benchmarks/gpu_check.sh OUT_DIR
#   DEVICE=cpu SMOKE=1 bash benchmarks/gpu_check.sh /tmp/out   # rehearse the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python=${PYTHON:-python3}

"$python" - "$device" <<'EOF'
import sys, torch, bnvit
device = sys.argv[1]
print(f"bnvit {bnvit.__version__}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("DEVICE is cuda but torch sees no GPU")
if torch.cuda.is_available():
    print(torch.cuda.get_device_name())
EOF

# The CUDA tests, and the fit()/precision tests that pick CUDA when it is there.
"$python" -m pytest -q -p no:cacheprovider tests/test_bn_edge_cases.py tests/test_precision.py 2>&1 | tee "$out/tests.log"

sections=${SECTIONS:-train,infer,epoch,deploy,small,sweep}
"$python" benchmarks/run.py --device "$device" --only "$sections" --json "$out/$device.json" ${SMOKE:+--smoke} \
    2>&1 | tee "$out/bench.log"
