#!/usr/bin/env bash
# The whole GPU check in one call (device time is scarce): kernel tests in bf16, the kernel benchmark,
# and a miniature `python train.py` on CUDA. Writes into ${OUT:-/tmp/gpu_out}.
#   bash bench/gpu_run.sh
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -m gpu tests/test_logprobs.py tests/test_linear_logprobs.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 260 python3 -m bench.gpu --out="$OUT/gpu.md" --budget_s=190 2>&1 | tee "$OUT/bench.log"
timeout 120 python3 train.py --out_dir=/tmp/gpurun --n_sft=2000 --sft_steps=60 --n_construct=200 --n_test=200 \
  --eval_rounds=1 2>&1 | tail -40 | tee "$OUT/train.log"
cp /tmp/gpurun/report.md "$OUT/report.md" 2>/dev/null
exit 0
