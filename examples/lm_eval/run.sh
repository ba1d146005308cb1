#!/usr/bin/env bash
# Score a vector with lm-evaluation-harness through `fvpatch serve`: one server with the vector, one without,
# the two example tasks zero-shot on each, and 10-shot on the one without (in-context learning, the baseline). lm-eval is not a dependency of fvpatch: `pip install "lm_eval[api]"` in any
# environment, and point LM_EVAL at its `lm_eval` (default: the one on PATH). Run from the repository root:
#   OMP_NUM_THREADS=1 bash examples/lm_eval/run.sh [MODEL] [VECTOR]
set -euo pipefail
MODEL=${1:-gemma-3-270m}
VECTOR=${2:-antonym.ffv-all}
LM_EVAL=${LM_EVAL:-lm_eval}
FVPATCH=${FVPATCH:-.venv/bin/fvpatch}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
$FVPATCH serve --model "$MODEL" --port 8391 --vector "$VECTOR" 2>/dev/null & pids+=($!)
$FVPATCH serve --model "$MODEL" --port 8392 2>/dev/null & pids+=($!)
for port in 8391 8392; do
  until curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; do sleep 1; done
done
run() {  # PORT SHOTS
  # the server tokenizes for lm-eval (/tokenize, /tokenizer_info), so no Hugging Face tokenizer is fetched
  HF_DATASETS_OFFLINE=1 "$LM_EVAL" --model local-completions \
    --model_args "base_url=http://127.0.0.1:$1/v1/completions,model=$MODEL,num_concurrent=1,max_retries=1" \
    --tasks fvpatch_antonym,fvpatch_antonym_ll --include_path examples/lm_eval --num_fewshot "$2" 2>/dev/null | grep '^|'
}
echo "## $MODEL, zero-shot, with $VECTOR"; run 8391 0
echo "## $MODEL, zero-shot, no vector"; run 8392 0
echo "## $MODEL, 10-shot, no vector"; run 8392 10
