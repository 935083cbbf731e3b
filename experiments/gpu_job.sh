#!/usr/bin/env bash
# The clean-protocol quality job (issue 36) on one GPU, detached, with partial results packed as it goes:
#   bash experiments/gpu_job.sh prepare SHARED_DATA  here, once: copy the data to .gpu/data and download the wheels to .whl
#                                              (both ignored by git, both carried by the device call)
#   bash experiments/gpu_job.sh start [--smoke]   start the job in its own session (setsid nohup) and return
#   bash experiments/gpu_job.sh poll SECONDS      wait up to SECONDS for the job to end, then copy its packed results
#                                              (at most 4 files) to $OUT and print the end of its status
#   bash experiments/gpu_job.sh run [--smoke]     the job itself, in the foreground
#   bash experiments/gpu_job.sh score FILES WORK [collect_results.py options]
#                                              on the CPU afterwards: unpack FILES/*.tgz into WORK and score them
# The job: an 8 k BPE tokenizer trained on the clean training split; the runs diffusion, gaussian, standard and none
# side by side on the clean split for $TRAIN_MINUTES (default 12), checkpoints chosen on DailyDialog++ dev; then
# k = 10 samples per DailyDialog++ test context for every run and temperature-sweep point, the paper's single sample
# on DailyDialog validation/test, the importance-weighted NLL (K = 50) and the latent diagnostics
# (experiments/dailydialog_experiments.py). Data: $DATA_DIR/{dailydialog/ijcnlp,dailydialog_plusplus} (default
# .gpu/data, carried; docs/results.md "GPU runs: how to reproduce"). Wheels in .whl/ (a newer transformers for the
# compiled training step, nltk) are installed to /tmp/site first. Work folder and packed results: $JOB_DIR (default
# /tmp/dior_gpu_job); $RUNS: other runs (comma-separated); $EVAL_ARGS: more options of the eval phase; --smoke: the whole path on the CPU in a few minutes (tiny
# model, 3 updates, 8 contexts).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cmd=${1:?usage: gpu_job.sh start|poll|run|score ...}; shift
JOB_DIR=${JOB_DIR:-/tmp/dior_gpu_job}
DATA_DIR=${DATA_DIR:-$repo/.gpu/data}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIOR_CVAE_CACHE=${DIOR_CVAE_CACHE:-$JOB_DIR/cache}

pack() {  # the small result files, each written to a temporary name and renamed: a poll never copies half a file
    local work=$JOB_DIR/work out=$JOB_DIR/out
    mkdir -p "$out"
    (cd "$work" 2>/dev/null && tar czf "$out/.train.tgz" --ignore-failed-read commands.jsonl timings.jsonl tokenizer.log \
        logs/train_*.log models/*/log_history.jsonl models/*/eval_results.json models/*/training_curves.png \
        models/*/best/eval_results.json 2>/dev/null; mv -f "$out/.train.tgz" "$out/train.tgz")
    (cd "$work" 2>/dev/null && tar czf "$out/.eval.tgz" --ignore-failed-read generations likelihood diagnostics \
        data/ddpp_test.jsonl $(ls logs/*.log 2>/dev/null | grep -v '/train_') 2>/dev/null; mv -f "$out/.eval.tgz" "$out/eval.tgz")
    cp "$JOB_DIR/status.txt" "$out/.status.txt" 2>/dev/null && mv -f "$out/.status.txt" "$out/status.txt"
}

status() { echo "[$(date -u +%H:%M:%S)] $*" >> "$JOB_DIR/status.txt"; }

case $cmd in
prepare)
    shared=${1:?prepare SHARED_DATA (the folder holding dailydialog/ijcnlp and dailydialog_plusplus)}
    mkdir -p "$repo/.gpu/data/dailydialog"
    cp -r "$shared/dailydialog/ijcnlp" "$repo/.gpu/data/dailydialog/" && cp -r "$shared/dailydialog_plusplus" "$repo/.gpu/data/"
    # the image has transformers 5.17 (no compiled training step: dior_compat.COMPILED_TRAINING_MIN_TRANSFORMERS)
    # and no nltk; transformers 5.25 needs huggingface_hub >= 2.4 (with httpx2, hf-xet, click), kernels, defusedxml
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$repo/.whl" transformers==5.25.0 huggingface_hub==2.5.0 "kernels>=0.19.1,<0.20" nltk==3.10.4 regex==2026.12.2 \
        hf-xet==1.8.0 httpx2==2.17.0 httpcore2==2.17.0 click==8.5.1 tomlkit==0.15.3 defusedxml==0.7.1 anyio==4.16.0 \
        idna==3.21 truststore==0.10.5
    du -sh "$repo/.gpu" "$repo/.whl"
    ;;
start)
    mkdir -p "$JOB_DIR"
    [ -e "$JOB_DIR/status.txt" ] && { echo "gpu_job.sh: $JOB_DIR already holds a job (status.txt); set JOB_DIR" >&2; exit 1; }
    setsid nohup bash "$0" run "$@" > "$JOB_DIR/job.log" 2>&1 < /dev/null &
    echo "started: $JOB_DIR (pid $!)"
    ;;
poll)
    seconds=${1:?poll SECONDS}
    end=$((SECONDS + seconds))
    while [ $SECONDS -lt $end ] && [ ! -e "$JOB_DIR/DONE" ]; do sleep 5; done
    [ -e "$JOB_DIR/DONE" ] || pack
    cp "$JOB_DIR"/out/*.tgz "$JOB_DIR"/out/status.txt "${OUT:?poll copies to \$OUT}/" 2>/dev/null
    tail -n 25 "$JOB_DIR/status.txt"
    [ -e "$JOB_DIR/job.log" ] && tail -n 5 "$JOB_DIR/job.log"  # a job begun with start
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    [ -e "$JOB_DIR/out/train.tgz" ]  # the exit status: whether there is anything to fetch
    ;;
run)
    smoke=""; [ "${1:-}" = "--smoke" ] && smoke=--smoke
    compile_flag=""
    mkdir -p "$JOB_DIR/work"
    cd "$repo"
    if [ -z "$smoke" ] && ls .whl/*.whl > /dev/null 2>&1; then  # the GPU image: the smoke run uses this environment
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || status "wheel install failed"
        export PYTHONPATH=/tmp/site:$repo
        if ! python3 -c "import transformers, nltk, dior_cvae.training.clean_split" 2>> "$JOB_DIR/work/imports.log"; then
            # the carried transformers does not import here: the image's own (no compiled training step) and nltk alone
            status "carried wheels do not import (imports.log): image transformers, eager training"
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_nltk .whl/nltk-*.whl
            export PYTHONPATH=/tmp/site_nltk:$repo
            compile_flag=--no-torch_compile
        fi
    else
        export PYTHONPATH=$repo
    fi
    dd=$DATA_DIR/dailydialog/ijcnlp; ddpp=$DATA_DIR/dailydialog_plusplus; work=$JOB_DIR/work
    status "job started ${smoke:-(GPU)}: $(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
    ( while [ ! -e "$JOB_DIR/DONE" ]; do sleep 30; pack; done ) &
    vocab=8000; parallel=4; [ -n "$smoke" ] && vocab=400 && parallel=2
    python3 - "$dd" "$ddpp" "$work/tokenizer" "$vocab" > "$work/tokenizer.log" 2>&1 <<'PY' || status "tokenizer failed (tokenizer.log)"
import sys
from dior_cvae.training.data import train_tokenizer
from dior_cvae.training.clean_split import build_clean_split
clean = build_clean_split(sys.argv[1], sys.argv[2])  # cached for the training runs
texts = list(dict.fromkeys(turn for _, turns in clean.train_dialogues for turn in turns))
train_tokenizer(texts, int(sys.argv[4])).save_pretrained(sys.argv[3])
print(f"tokenizer: {len(texts)} distinct turns of the {len(clean.train_dialogues)} clean training dialogues;",
      {k: clean.report[k] for k in ("removed_dialogues", "removed_pairs") if k in clean.report})
PY
    status "tokenizer: $(tail -n 1 "$work/tokenizer.log")"
    common=(--dataset_dir "$dd" --ddpp_dir "$ddpp" --tokenizer_name "$work/tokenizer" --work_dir "$work"
            --runs "${RUNS:-diffusion,gaussian,standard,none}" $smoke)
    train_extra=(); [ -n "$compile_flag" ] && train_extra=("$compile_flag")
    python3 experiments/dailydialog_experiments.py "${common[@]}" --phase train --train_minutes "${TRAIN_MINUTES:-12}" "${train_extra[@]}" \
        > "$work/train.log" 2>&1
    status "train phase exit $?: $(tail -n 1 "$work/train.log")"
    python3 experiments/dailydialog_experiments.py "${common[@]}" --phase eval --max_parallel "${MAX_PARALLEL:-$parallel}" ${EVAL_ARGS:-} \
        > "$work/eval.log" 2>&1
    status "eval phase exit $?: $(tail -n 1 "$work/eval.log")"
    pack
    touch "$JOB_DIR/DONE"
    status "DONE"
    pack
    ;;
score)
    files=${1:?score FILES WORK}; work=${2:?score FILES WORK}; shift 2
    mkdir -p "$work"
    for f in "$files"/train.tgz "$files"/eval.tgz; do tar xzf "$f" -C "$work"; done
    python3 "$repo/experiments/collect_results.py" --work_dir "$work" "$@"
    ;;
*)
    echo "gpu_job.sh: unknown command $cmd (start, poll, run, score)" >&2; exit 2
    ;;
esac
