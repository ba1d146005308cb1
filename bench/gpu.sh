#!/usr/bin/env bash
# The GPU checks, in one run on a machine whose torch sees a CUDA GPU (they are skipped everywhere else):
#   bash bench/gpu.sh OUTDIR TOKENIZER_DIR
# 1. the training side on CUDA against the CPU (tests/test_gpu.py) and the architecture matrix with PyTorch on
#    CUDA (tests/test_arch_matrix.py, FVPATCH_TEST_DEVICE=cuda); llama.cpp stays on the CPU
# 2. bench/gpu_scale.py: time and peak GPU memory of `train ffv` and the head map at 1.5B, 7B and 14B shapes
# Each step writes into OUTDIR as it goes, so a run cut short still returns what it finished.
set -u
out=${1:?OUTDIR}
tokenizer=${2:?TOKENIZER_DIR (a Hugging Face tokenizer directory of Qwen2.5, see bench/gpu_scale.py)}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, llama_cpp; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llama_cpp', llama_cpp.__version__)"
  nproc; } > "$out/machine.txt" 2>&1
FVPATCH_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_arch_matrix.py \
  > "$out/pytest.log" 2>&1
echo "pytest exit $?" >> "$out/pytest.log"
timeout 240 python3 bench/gpu_scale.py --tokenizer "$tokenizer" --out "$out" --shapes qwen2.5-1.5b qwen2.5-7b qwen2.5-14b --devices cuda \
  > "$out/gpu_scale.log" 2>&1
timeout 100 python3 bench/gpu_scale.py --tokenizer "$tokenizer" --out "$out" --shapes qwen2.5-1.5b --devices cpu --dtypes bfloat16 --prompts 1 \
  >> "$out/gpu_scale.log" 2>&1
echo "gpu_scale exit $?" >> "$out/gpu_scale.log"
