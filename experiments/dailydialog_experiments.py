"""DailyDialog from scratch on one GPU: the paper's "w/o PLM" setting and its ablations, end to end.

    python experiments/dailydialog_experiments.py --dataset_dir DIR --tokenizer_name DIR --work_dir /tmp/dd \\
        --phase train --runs diffusion,gaussian --train_minutes 20
    python experiments/dailydialog_experiments.py ... --phase eval --runs diffusion,gaussian

`--phase train` starts the runs' `accelerate launch examples/train.py` commands side by side (they share the GPU;
each stops after `--train_minutes`), `--phase eval` samples responses from the trained models with
`examples/generate.py` (validation and test, top-k/top-p sampling and beam 5, 5 prior draws for 1,000 test contexts,
a solver × steps sweep for the diffusion run, and a temperature sweep: the prior's for the latent runs, the tokens'
for the plain seq2seq; and, for the latent runs, test responses decoded with latents drawn from the posterior of the
reference, `--latents posterior`: the oracle that separates what the prior loses from what the decoder does) and
writes their latent diagnostics with `examples/diagnose.py`.
A run name with a seed suffix, `NAME-sN` (e.g. `memdrop0.5-s2`), is a replica of NAME trained with `--seed N`, for
seed spreads. Every command is recorded in `WORK_DIR/commands.jsonl`. Scoring (`examples/score.py`: paper metrics, MiniLM
relevance, DailyDialog++ multi-reference BLEU, trivial responders) runs where the embedding model is, and
`experiments/collect_results.py` turns the scores into `results/dailydialog.json`, `docs/results.md` and the plots.
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

# A small from-scratch transformer (~9 M weights with the 8 k vocabulary trained on the training split): 76 k pairs
# and 15 minutes with six to eight runs sharing one GPU (docs/results.md says why this size).
BASE_CONFIG = (
    "d_model=256,encoder_layers=4,decoder_layers=4,encoder_attention_heads=4,decoder_attention_heads=4,"
    "encoder_ffn_dim=1024,decoder_ffn_dim=1024,max_position_embeddings=320,latent_size=16,denoiser_hidden_size=512,"
    "dropout=0.1,attention_dropout=0.0,activation_dropout=0.0"
)
RUNS = {
    "diffusion": "prior_type=diffusion",  # the defaults: memory dropout 0.7
    "gaussian": "prior_type=gaussian",
    "standard": "prior_type=standard",
    "none": "prior_type=none",  # the plain seq2seq control: exactly BART
    "memdrop0": "prior_type=diffusion,memory_dropout=0.0",
    "memdrop0.3": "prior_type=diffusion,memory_dropout=0.3",
    "memdrop0.5": "prior_type=diffusion,memory_dropout=0.5",
    "memdrop0.9": "prior_type=diffusion,memory_dropout=0.9",
    # a 16-nat free-bits floor instead of 64 (docs/results.md), alone and with less memory dropout (0.3 is what the
    # authors' code effectively drops, configuration_dior.py): a latent that carries less, a decoder that sees more
    "freebits0.25": "prior_type=diffusion,kl_free_bits=0.25",
    "freebits0.25-memdrop0.3": "prior_type=diffusion,kl_free_bits=0.25,memory_dropout=0.3",
    "freebits0.25-memdrop0": "prior_type=diffusion,kl_free_bits=0.25,memory_dropout=0.0",
    "gaussian-freebits0.25-memdrop0.3": "prior_type=gaussian,kl_free_bits=0.25,memory_dropout=0.3",
    "standard-freebits0.25-memdrop0.3": "prior_type=standard,kl_free_bits=0.25,memory_dropout=0.3",
}
TRAIN_ARGS = [
    "--max_source_length", "256", "--max_target_length", "64",
    "--per_device_train_batch_size", "128", "--per_device_eval_batch_size", "512",
    "--learning_rate", "7e-4", "--weight_decay", "0.01", "--adam_beta2", "0.98",
    "--lr_scheduler_type", "inverse_sqrt", "--num_warmup_steps", "500",
    "--kl_annealing", "linear", "--kl_annealing_steps", "2500",
    # best/ is the evaluation with the highest BLEU-2 of 1,000 sampled validation responses: the goal's metric (the
    # loss-best model is an earlier one, and a fifth of the validation pairs also occur in the training split)
    "--num_train_epochs", "100", "--num_eval_generation_samples", "1000", "--metric_for_best_model", "bleu2",
    "--eval_steps", "2000",
    "--logging_steps", "100", "--seed", "1234", "--num_sample_contexts", "3", "--max_eval_samples", "2000",
]
SAMPLING = ["--decoding", "sampling", "--top_k", "50", "--top_p", "0.9"]
BEAM = ["--decoding", "beam", "--num_beams", "5"]
SOLVER_STEPS = (1, 2, 5, 10, 20, 50)
SOLVERS = ("dpmsolver++", "ddim", "ddpm")
# The diversity knob of each model, swept at the same token sampling (top-k 50 / top-p 0.9): the prior's temperature τ
# for the latent runs (1 = the prior itself, the main rows), the token temperature for the plain seq2seq control.
PRIOR_TEMPERATURES = (0.0, 0.25, 0.5, 0.75)
TOKEN_TEMPERATURES = (0.7, 0.85, 1.15, 1.3)
TEMPERATURE_RUNS = ("diffusion", "gaussian", "standard", "none")


def floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not all(0 <= v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be finite numbers >= 0, got {text!r}")
    return values


def record(work_dir: Path, name: str, command: list[str]):
    with open(work_dir / "commands.jsonl", "a") as f:
        f.write(json.dumps({"name": name, "command": shlex.join(command)}) + "\n")


def split_seed(name: str) -> tuple[str, int | None]:
    """`memdrop0.5-s2` → ("memdrop0.5", 2): a replica of a run with another training seed;
    `memdrop0.5` → ("memdrop0.5", None): the run itself (seed 1234 of TRAIN_ARGS)."""
    base, sep, seed = name.rpartition("-s")
    if sep and base in RUNS and seed.isdigit():
        return base, int(seed)
    return name, None


def config_flags(fields: str) -> list[str]:
    """`"d_model=256,prior_type=gaussian"` as train.py's config flags: `--d_model 256 --prior_type gaussian`."""
    return [word for item in fields.split(",") for word in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]


def train_command(args, name: str) -> list[str]:
    base, seed = split_seed(name)
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        str(REPO / "examples/train.py"),
        "--dataset_dir", args.dataset_dir, "--tokenizer_name", args.tokenizer_name, "--overwrite_output_dir",
        *config_flags(f"{BASE_CONFIG},{RUNS[base]}"),
        "--max_train_minutes", str(args.train_minutes),
        "--output_dir", str(Path(args.work_dir) / "models" / name),
        *TRAIN_ARGS,
        *(["--seed", str(seed)] if seed is not None else []),  # after TRAIN_ARGS' --seed: the last one counts
        *(["--torch_compile"] if getattr(args, "torch_compile", False) else []),
    ]


def model_folder(args, name: str) -> str:
    """The run's `best/` (the highest validation BLEU-2 of TRAIN_ARGS' --metric_for_best_model), else its final
    model."""
    folder = Path(args.work_dir) / "models" / name
    return str(folder / "best" if (folder / "best" / "config.json").exists() else folder)


def eval_jobs(args, name: str) -> list[tuple[str, list[str]]]:
    """(job name, script, arguments) for one trained model: generations and latent diagnostics."""
    model = model_folder(args, name)
    base, _ = split_seed(name)
    common = ["--model_name_or_path", model, "--dataset_dir", args.dataset_dir, "--batch_size", "512",
              "--max_new_tokens", "40", "--dtype", "bfloat16", "--seed", "1234",
              # thousands of contexts sorted by length: many batch shapes, each a minute of compiling on CUDA
              "--disable_compile"]
    if args.smoke:
        common += ["--max_samples", "32"]
    jobs = []
    for split in ("validation", "test"):
        jobs.append((f"{name}__{split}__sampling", "generate.py", [*common, "--split", split, *SAMPLING]))
        jobs.append((f"{name}__{split}__beam5", "generate.py", [*common, "--split", split, *BEAM]))
    five = ["--split", "test", "--max_samples", "1000", "--num_samples", "5", *SAMPLING]
    jobs.append((f"{name}__test__5samples", "generate.py", [*common, *five]))
    if "temperature" in args.sweeps and name in args.temperature_runs:  # the seed-1234 runs only
        flag, values, tag = (("--temperature", args.token_temperatures, "T") if name == "none" else
                             ("--prior_temperature", args.prior_temperatures, "tau"))
        for value in values:
            knob = [flag, str(value)]
            jobs.append((f"{name}__validation__sampling_{tag}{value}", "generate.py",
                         [*common, "--split", "validation", *SAMPLING, *knob]))
            jobs.append((f"{name}__test__sampling_{tag}{value}", "generate.py",
                         [*common, "--split", "test", *SAMPLING, *knob]))
            jobs.append((f"{name}__test__5samples_{tag}{value}", "generate.py", [*common, *five, *knob]))
    if base == "none":
        return jobs
    # the oracle: latents from the posterior of the reference, to tell what the prior loses from what the decoder does
    jobs.append((f"{name}__test__sampling_posterior", "generate.py",
                 [*common, "--split", "test", *SAMPLING, "--latents", "posterior"]))
    diag = ["--model_name_or_path", model, "--dataset_dir", args.dataset_dir, "--split", "validation",
            "--max_samples", "2000"]
    jobs.append((f"{name}__diagnostics", "diagnose.py", diag))
    if name == "diffusion" and "solver" in args.sweeps:
        subset = [*common, "--split", "validation", "--max_samples", "1000", *SAMPLING]
        for sampler in SOLVERS:
            for steps in SOLVER_STEPS:
                tag = f"{sampler.replace('+', 'p')}{steps}"
                solver = ["--prior_sampler", sampler, "--num_inference_steps", str(steps)]
                jobs.append((f"{name}__validation1000__{tag}", "generate.py", [*subset, *solver]))
                jobs.append((f"{name}__diagnostics__{tag}", "diagnose.py",
                             [*diag, "--max_samples", "1000", *solver]))
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
    p.add_argument("--runs", default="diffusion,gaussian,standard,none,memdrop0,memdrop0.3,memdrop0.5,memdrop0.9",
                   help="comma-separated run names; NAME-sN is a replica of NAME trained with --seed N")
    p.add_argument("--train_minutes", type=float, default=15.0)
    p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train with train.py --torch_compile (default: on where CUDA is available; it needs "
                        "transformers >= 5.23). On one H200 the recipe's model made 3.0x the updates/s of eager "
                        "(68.3 vs 23.2, docs/performance.md); the compile (about a minute) counts in --train_minutes")
    p.add_argument("--max_parallel", type=int, default=4, help="concurrent generation jobs in --phase eval")
    p.add_argument("--sweeps", default="solver,temperature",
                   help="extra --phase eval generations, comma-separated: solver (diffusion: solver x steps), "
                        "temperature (prior / token temperature of the --temperature_runs)")
    p.add_argument("--smoke", action="store_true", help="a CPU check of the whole pipeline: tiny shapes, 32 contexts")
    p.add_argument("--prior_temperatures", type=floats, default=PRIOR_TEMPERATURES,
                   help="comma-separated prior temperatures of the latent runs' sweep")
    p.add_argument("--token_temperatures", type=floats, default=TOKEN_TEMPERATURES,
                   help="comma-separated token temperatures of the plain seq2seq's sweep")
    p.add_argument("--temperature_runs", default=",".join(TEMPERATURE_RUNS),
                   help="comma-separated runs of the temperature sweep (token temperature for none, prior for the rest)")
    args = p.parse_args()
    args.temperature_runs = set(filter(None, args.temperature_runs.split(",")))
    if args.torch_compile is None:
        import torch

        args.torch_compile = torch.cuda.is_available()
    if args.smoke:
        global BASE_CONFIG, SOLVER_STEPS
        BASE_CONFIG = BASE_CONFIG.replace("d_model=256", "d_model=32").replace("ffn_dim=1024", "ffn_dim=64")
        SOLVER_STEPS = (1, 5)
        TRAIN_ARGS.extend(["--max_train_steps", "3", "--max_eval_samples", "32", "--num_eval_generation_samples", "4"])
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    args.sweeps = set(filter(None, args.sweeps.split(",")))
    bad_sweeps = args.sweeps - {"solver", "temperature"}
    if bad_sweeps:
        raise SystemExit(f"--sweeps: unknown {sorted(bad_sweeps)}; choose from solver, temperature")
    names = args.runs.split(",")
    unknown = [n for n in [*names, *args.temperature_runs] if split_seed(n)[0] not in RUNS]
    if unknown:
        raise SystemExit(f"--runs / --temperature_runs: unknown {unknown}; choose from {sorted(RUNS)}, each optionally "
                         "with a seed suffix -sN (a replica trained with --seed N, e.g. memdrop0.5-s2)")

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
            for job, script, job_args in eval_jobs(args, name):
                folder = "diagnostics" if script == "diagnose.py" else "generations"
                out = work_dir / folder / f"{job}.json{'l' if folder == 'generations' else ''}"
                out.parent.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, str(REPO / "examples" / script), *job_args, "--output", str(out)]
                if script == "diagnose.py" and "__" not in job.split("__diagnostics")[-1]:
                    command += ["--plot", str(out.with_suffix(".png"))]
                record(work_dir, f"{script}:{job}", command)
                jobs.append((job, command, work_dir / "logs" / f"{job}.log"))
        codes = run_parallel(jobs, max_parallel=args.max_parallel)
    failed = {k: v for k, v in codes.items() if v != 0}
    print(json.dumps({"phase": args.phase, "jobs": len(codes), "failed": failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
