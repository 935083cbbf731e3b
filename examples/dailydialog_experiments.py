"""DailyDialog from scratch on one GPU: the paper's "w/o PLM" setting and its ablations, end to end.

    python examples/dailydialog_experiments.py --dataset_dir DIR --tokenizer_name DIR --work_dir /tmp/dd \\
        --phase train --runs diffusion,gaussian --train_minutes 20
    python examples/dailydialog_experiments.py ... --phase eval --runs diffusion,gaussian

`--phase train` starts the runs' `accelerate launch examples/train.py` commands side by side (they share the GPU;
each stops after `--train_minutes`), `--phase eval` generates and scores the trained models with
`examples/generate.py` / `examples/score.py`. Every command is recorded in `WORK_DIR/commands.jsonl`, every score
in `WORK_DIR/scores/*.json`; `examples/collect_results.py` turns them into `results/dailydialog.json`,
`docs/results.md` and the plots.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# bart-base depth, half its width: ~17 M backbone weights + the 50 k-token embedding, which 76 k pairs and a
# 20-minute budget can train (see docs/results.md for why not the full bart-base width).
BASE_CONFIG = (
    "d_model=512,encoder_layers=6,decoder_layers=6,encoder_attention_heads=8,decoder_attention_heads=8,"
    "encoder_ffn_dim=2048,decoder_ffn_dim=2048,max_position_embeddings=320,latent_size=32"
)
RUNS = {
    "diffusion": "prior_type=diffusion",
    "gaussian": "prior_type=gaussian",
    "standard": "prior_type=standard",
    "memdrop0": "prior_type=diffusion,memory_dropout=0.0",
    "x0": "prior_type=diffusion,prediction_type=sample",
    "memdrop0.1": "prior_type=diffusion,memory_dropout=0.1",
    "memdrop0.4": "prior_type=diffusion,memory_dropout=0.4",
    "memdrop1.0": "prior_type=diffusion,memory_dropout=1.0",
}
TRAIN_ARGS = [
    "--max_source_length", "256", "--max_target_length", "64",
    "--per_device_train_batch_size", "96", "--per_device_eval_batch_size", "256",
    "--learning_rate", "5e-4", "--weight_decay", "0.01", "--adam_beta2", "0.98",
    "--lr_scheduler_type", "inverse_sqrt", "--num_warmup_steps", "1000",
    "--kl_annealing", "linear", "--kl_annealing_steps", "4000",
    "--num_train_epochs", "100", "--num_eval_generation_samples", "200",
    "--logging_steps", "100", "--seed", "1234", "--num_sample_contexts", "3",
]
SAMPLING = ["--decoding", "sampling", "--top_k", "50", "--top_p", "0.9"]
BEAM = ["--decoding", "beam", "--num_beams", "5"]


def record(work_dir: Path, name: str, command: list[str]):
    with open(work_dir / "commands.jsonl", "a") as f:
        f.write(json.dumps({"name": name, "command": shlex.join(command)}) + "\n")


def train_command(args, name: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        str(REPO / "examples/train.py"),
        "--dataset_dir", args.dataset_dir, "--tokenizer_name", args.tokenizer_name,
        "--config_overrides", f"{BASE_CONFIG},{RUNS[name]}",
        "--max_train_minutes", str(args.train_minutes),
        "--output_dir", str(Path(args.work_dir) / "models" / name),
        *TRAIN_ARGS,
    ]


def eval_jobs(args, name: str) -> list[tuple[str, list[str]]]:
    """(job name, generate.py arguments) for one trained model."""
    model = str(Path(args.work_dir) / "models" / name)
    common = ["--model_name_or_path", model, "--dataset_dir", args.dataset_dir, "--batch_size", "256",
              "--max_new_tokens", "40", "--dtype", "bfloat16", "--seed", "1234"]
    jobs = [
        (f"{name}__validation__sampling", [*common, "--split", "validation", *SAMPLING]),
        (f"{name}__test__sampling", [*common, "--split", "test", *SAMPLING]),
        (f"{name}__test__beam5", [*common, "--split", "test", *BEAM]),
        (f"{name}__test__5samples", [*common, "--split", "test", "--max_samples", "1000", "--num_samples", "5",
                                     *SAMPLING]),
    ]
    if name == "diffusion" or name == "x0":
        subset = [*common, "--split", "validation", "--max_samples", "2000", *SAMPLING]
        for sampler in ("ddpm", "ddim"):
            for steps in (1, 5, 10, 25, 50):
                jobs.append((f"{name}__validation2000__{sampler}{steps}",
                             [*subset, "--prior_sampler", sampler, "--num_inference_steps", str(steps)]))
        for guidance in (0.0, 0.1, 1.0):
            jobs.append((f"{name}__validation2000__w{guidance}", [*subset, "--prior_guidance_scale", str(guidance)]))
    return jobs


def run_parallel(commands: list[tuple[str, list[str], Path]], max_parallel: int):
    """Run (name, command, log file) jobs, at most `max_parallel` at a time; return {name: exit code}."""
    pending, running, codes, started = list(commands), {}, {}, {}
    timings_file = commands[0][2].parent.parent / "timings.jsonl" if commands else None
    while pending or running:
        while pending and len(running) < max_parallel:
            name, command, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            running[name] = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)
            started[name] = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] started {name}", flush=True)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                codes[name] = proc.returncode
                del running[name]
                seconds = time.time() - started[name]
                with open(timings_file, "a") as f:
                    f.write(json.dumps({"name": name, "seconds": seconds, "exit": proc.returncode,
                                        "concurrent": min(max_parallel, len(commands))}) + "\n")
                print(f"[{time.strftime('%H:%M:%S')}] finished {name}: exit {proc.returncode}", flush=True)
        time.sleep(2)
    return codes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--tokenizer_name", required=True)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--phase", choices=["train", "eval"], required=True)
    p.add_argument("--runs", default="diffusion,gaussian,standard,memdrop0,x0")
    p.add_argument("--train_minutes", type=float, default=20.0)
    p.add_argument("--max_parallel", type=int, default=4, help="concurrent generation jobs in --phase eval")
    args = p.parse_args()
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {sorted(RUNS)}")

    if args.phase == "train":
        jobs = []
        for name in names:
            command = train_command(args, name)
            record(work_dir, f"train:{name}", command)
            jobs.append((name, command, work_dir / "logs" / f"train_{name}.log"))
        codes = run_parallel(jobs, max_parallel=len(jobs))
    else:
        jobs = []
        for name in names:
            for job, gen_args in eval_jobs(args, name):
                out = work_dir / "generations" / f"{job}.jsonl"
                command = [sys.executable, str(REPO / "examples/generate.py"), *gen_args, "--output", str(out)]
                record(work_dir, f"generate:{job}", command)
                jobs.append((job, command, work_dir / "logs" / f"gen_{job}.log"))
        codes = run_parallel(jobs, max_parallel=args.max_parallel)
        (work_dir / "scores").mkdir(exist_ok=True)
        for job, code in codes.items():
            if code != 0:
                continue
            gen = work_dir / "generations" / f"{job}.jsonl"
            command = [sys.executable, str(REPO / "examples/score.py"), "--input", str(gen), "--no_semantic",
                       "--output", str(work_dir / "scores" / f"{job}.json")]
            record(work_dir, f"score:{job}", command)
            subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=False)
    failed = {k: v for k, v in codes.items() if v != 0}
    print(json.dumps({"phase": args.phase, "jobs": len(codes), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
