#!/usr/bin/env bash
# The kl_free_bits sweep of docs/results.md on one GPU: three diffusion runs side by side, 3 minutes each, then
# validation generations (1,000 contexts, sampling) and latent diagnostics; score them with examples/score.py.
#   bash experiments/free_bits_sweep.sh DATA_DIR TOKENIZER_DIR OUT_DIR
set -uo pipefail
data=$1; tok=$2; OUT=$3
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the recipe of experiments/dailydialog_experiments.py (model shape, training arguments); later flags override earlier
# ones: a shorter KL annealing for 3 minutes, no validation passes during training, fewer validation examples
mapfile -t MODEL < <(python3 -c "import sys; sys.path.insert(0, 'experiments'); import dailydialog_experiments as e; print(*e.config_flags(e.BASE_CONFIG), sep='\n')")
mapfile -t RECIPE < <(python3 -c "import sys; sys.path.insert(0, 'experiments'); import dailydialog_experiments as e; print(*e.TRAIN_ARGS, sep='\n')")
for fb in 1.0 0.25 0.1; do
  python3 -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16 --dynamo_backend no examples/train.py \
    --dataset_dir "$data" --tokenizer_name "$tok" --overwrite_output_dir \
    "${MODEL[@]}" --prior_type diffusion --kl_free_bits "$fb" --max_train_minutes 3 --output_dir "$OUT/fb$fb" \
    "${RECIPE[@]}" --kl_annealing_steps 1000 --num_eval_generation_samples 0 --eval_steps 100000 \
    --num_sample_contexts 0 --max_eval_samples 500 > "$OUT/train_$fb.log" 2>&1 &
done
wait
for fb in 1.0 0.25 0.1; do
  python3 examples/generate.py --model_name_or_path "$OUT/fb$fb" --dataset_dir "$data" --batch_size 512 \
    --max_new_tokens 40 --dtype bfloat16 --seed 1234 --split validation --max_samples 1000 --decoding sampling \
    --top_k 50 --top_p 0.9 --output "$OUT/gen_$fb.jsonl" > "$OUT/gen_$fb.log" 2>&1 &
  python3 examples/diagnose.py --model_name_or_path "$OUT/fb$fb" --dataset_dir "$data" --max_samples 1000 \
    --output "$OUT/diag_$fb.json" > "$OUT/diag_$fb.log" 2>&1 &
done
wait
for fb in 1.0 0.25 0.1; do
  echo "== $fb"; tail -c 1500 "$OUT/train_$fb.log" | tr '\r' '\n' | tail -4; cat "$OUT/fb$fb"/log_history.jsonl
  tail -3 "$OUT/gen_$fb.log" "$OUT/diag_$fb.log"
done > "$OUT/logs.txt" 2>&1
grep -h '"active_units_fraction"\|norm_ratio"\|"kl"' "$OUT"/diag_*.json
