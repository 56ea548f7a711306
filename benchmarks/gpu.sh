#!/usr/bin/env bash
# The GPU path, proven in one short run (a few minutes on one GPU; H200 sized).
#
# 1. The real CLI on a GPT-2-small-shaped model (random weights, the test tokenizer and
#    text): nsn convert, nsn finetune --device cuda --dtype bfloat16 (plain, then
#    torchrun --nproc-per-node 1 ... --fsdp), nsn profile --device cuda. Each must
#    succeed; the finetune summaries and the profile table are printed.
# 2. benchmarks/gpu.py on GPT-2 small and Llama-3.2-1B shapes: SVD per layer shape on
#    the GPU, bf16 finetune step time and peak memory (whole model vs FSDP on one
#    device), nested/dense latency per budget with CUDA events.
#
#    bash benchmarks/gpu.sh              # needs an NVIDIA GPU; PYTHON=... to choose python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
WORK=$(mktemp -d -t nsn-gpu-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== 1. the CLI on a GPT-2-small shape"
$PY - "$WORK/src" <<'PY'
import sys
sys.path.insert(0, "benchmarks")
from common import build_model
from tests.helpers import make_tokenizer
build_model("gpt2").save_pretrained(sys.argv[1])
make_tokenizer().save_pretrained(sys.argv[1])
PY
T0=$(date +%s)
$PY -m nsn_cli convert "$WORK/src" "$WORK/project"
echo "convert: $(( $(date +%s) - T0 )) s"
cp -r "$WORK/project" "$WORK/project-fsdp"
FT=(--data tests/data/tiny.txt --seq-len 128 --batch-size 8 --steps 20 --eval-every 10
    --eval-samples 16 --save-every 10 --device cuda --dtype bfloat16)
$PY -m nsn_cli finetune "$WORK/project" "${FT[@]}"
$PY -m torch.distributed.run --standalone --nproc-per-node 1 -m nsn_cli finetune \
    "$WORK/project-fsdp" "${FT[@]}" --fsdp
$PY -m nsn_cli profile "$WORK/project" --device cuda --dtype bfloat16 --seq-len 128 \
    --batch-size 8 --budgets 0.25,0.5,0.75,1.0

echo "== 2. ratios on GPT-2 small and Llama-3.2-1B shapes"
$PY benchmarks/gpu.py --device cuda --models gpt2,llama-1b --batch 8 --seq-len 512
