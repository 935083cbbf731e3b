#!/usr/bin/env bash
# The DailyDialog experiment of docs/results.md on one GPU, end to end, as it ran on an H200:
#   bash experiments/run_gpu_experiments.sh DATA_DIR WORK_DIR [TRAIN_MINUTES]
# DATA_DIR holds the ijcnlp DailyDialog files (dialogues_{train,validation,test}.txt[.gz]). Writes WORK_DIR/DONE last.
# 1. the speed benchmark (the GPU to itself), 2. one BPE tokenizer (8 k) trained on the training split,
# 3. the runs side by side, 4. generations + latent diagnostics. Scoring follows on a machine with the MiniLM model:
#   python experiments/collect_results.py --work_dir WORK_DIR ...
set -uo pipefail
data=$1; work=$2; minutes=${3:-15}
mkdir -p "$work"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
${SKIP_BENCH:+:} python benchmarks/bench.py --fast --budget-s 220 --output "$work/speed.json" --plot "$work/speed.png" \
    > "$work/bench.log" 2>&1
python - "$data" "$work/tokenizer" <<'PY'
import sys
from dior_cvae.training.data import load_dailydialog_dir, train_tokenizer
train = load_dailydialog_dir(sys.argv[1], splits=["train"])["train"]
texts = list(dict.fromkeys(t for ex in train for t in (*ex["context"], ex["response"])))
train_tokenizer(texts, 8000).save_pretrained(sys.argv[2])
print(f"tokenizer: {len(texts)} training turns")
PY
common=(--dataset_dir "$data" --tokenizer_name "$work/tokenizer" --work_dir "$work")
python experiments/dailydialog_experiments.py "${common[@]}" --phase train --train_minutes "$minutes" > "$work/train.log" 2>&1 &
trainer=$!
# the GPU tests (eager vs static-cache + compiled decoding, bf16 prior) beside the training runs
python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_model.py -k "cuda or static" > "$work/cuda_tests.log" 2>&1
wait $trainer
python experiments/dailydialog_experiments.py "${common[@]}" --phase eval --max_parallel 8 > "$work/eval.log" 2>&1
(cd "$work" && tar czf results.tgz --exclude='*.safetensors' --exclude='*/tokenizer*' --exclude='*/step_*' \
    generations diagnostics logs commands.jsonl timings.jsonl speed.json speed.png bench.log train.log eval.log \
    cuda_tests.log models/*/log_history.jsonl models/*/eval_results.json models/*/training_curves.png \
    models/*/README.md 2>/dev/null)
touch "$work/DONE"
