"""DailyDialog from scratch on one GPU, on the clean protocol: train on the clean split, select on DailyDialog++ dev,
sample k responses per held-out DailyDialog++ test context.

    python experiments/dailydialog_experiments.py --dataset_dir DIR --ddpp_dir DIR --tokenizer_name DIR --work_dir /tmp/dd \\
        --phase train --runs diffusion,gaussian,standard,none --train_minutes 12
    python experiments/dailydialog_experiments.py ... --phase eval --runs diffusion,gaussian,standard,none

Both phases first write WORK_DIR/data/ (once): `ddpp_dev_pairs.jsonl`, DailyDialog++ dev as (context, response) pairs,
every context with its first reference, then every context with its second, ... (so that train.py's first N
validation pairs are N different contexts), and `ddpp_test.jsonl`, the DailyDialog++ test contexts with their 5
references. `--phase train` starts the runs' `accelerate launch examples/train.py` commands side by side (they share
the GPU; each stops after `--train_minutes`): with `--clean_split` (the default) on the training split without any
dialogue of the evaluation sets (`dior_cvae.training.clean_split`), validated on DailyDialog++ dev (`best/` = the
highest BLEU-2 of sampled dev responses). `--phase eval` runs, per trained model, `examples/generate.py` for
`--num_samples` (k = 10) top-k/top-p samples per DailyDialog++ test context (`{run}__ddpptest__10samples`), the same
at each point of the temperature sweep (the prior's τ for the latent runs, the tokens' T for the plain seq2seq:
`{run}__ddpptest__10samples_tau0.5`, `..._T0.7`), the paper protocol's single sample on DailyDialog validation and
test (`{run}__{split}__sampling`), `examples/likelihood.py` (the importance-weighted NLL per DailyDialog++ test
response, `--likelihood_samples` posterior samples; exact for the seq2seq) and, for the latent runs, the latent
diagnostics (`examples/diagnose.py`). `--sweeps` adds older extras: beam (beam 5 on DailyDialog validation/test),
posterior (the oracle: test responses decoded with latents from the posterior of the reference), solver (diffusion:
solver × steps on 1,000 validation contexts).
A run name with a seed suffix, `NAME-sN` (e.g. `memdrop0.5-s2`), is a replica of NAME trained with `--seed N`, for
seed spreads. Every command is recorded in `WORK_DIR/commands.jsonl`. Scoring (MiniLM relevance, multi-reference
metrics) runs on a CPU afterwards: `experiments/collect_results.py` turns the work folder into `results/*.json`,
`docs/results.md`'s tables and the plots. `--smoke`: the whole path on a CPU in a minute (tiny model, few contexts).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dior_cvae.training.outputs import write_atomic

REPO = Path(__file__).resolve().parents[1]

# A small from-scratch transformer (~9 M weights with the 8 k vocabulary trained on the training split): 64 k clean
# pairs: small enough that four runs share one GPU (docs/gpu_runs.md says why this size).
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
    # best/ is the evaluation with the highest BLEU-2 of 500 sampled DailyDialog++ dev responses (500 different
    # contexts, each against its first reference): the models are compared on generation, and the dev contexts share
    # no dialogue with the clean training split
    "--num_train_epochs", "100", "--num_eval_generation_samples", "500", "--metric_for_best_model", "bleu2",
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
SWEEPS = ("temperature", "beam", "posterior", "solver")
DDPP_DEV_PAIRS = "ddpp_dev_pairs.jsonl"  # under WORK_DIR/data: train.py's --validation_file
DDPP_TEST = "ddpp_test.jsonl"  # under WORK_DIR/data: generate.py's / likelihood.py's --input_file


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


def write_jsonl(path: Path, rows: list[dict]):
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def prepare_data(args) -> dict[str, Path]:
    """WORK_DIR/data/: DailyDialog++ dev as validation pairs (reference-major) and DailyDialog++ test as generation
    input (each context with its 5 references). Written once; an existing file is this script's and is kept."""
    from dior_cvae.training.clean_split import load_dailydialog_pp

    folder = Path(args.work_dir) / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"dev": folder / DDPP_DEV_PAIRS, "test": folder / DDPP_TEST}
    if not paths["dev"].is_file():
        dev = load_dailydialog_pp(args.ddpp_dir, "dev")
        depth = max(len(r["references"]) for r in dev)
        write_jsonl(paths["dev"], [{"context": r["context"], "response": r["references"][i]}
                                   for i in range(depth) for r in dev if i < len(r["references"])])
    if not paths["test"].is_file():
        write_jsonl(paths["test"], [{"context": r["context"], "reference": r["references"]}
                                    for r in load_dailydialog_pp(args.ddpp_dir, "test")])
    return paths


def config_flags(fields: str) -> list[str]:
    """`"d_model=256,prior_type=gaussian"` as train.py's config flags: `--d_model 256 --prior_type gaussian`."""
    return [word for item in fields.split(",") for word in (f"--{item.split('=', 1)[0]}", item.split("=", 1)[1])]


def train_command(args, name: str) -> list[str]:
    base, seed = split_seed(name)
    data = Path(args.work_dir) / "data"
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
        "--mixed_precision", "bf16" if args.bf16 else "no", "--dynamo_backend", "no",
        str(REPO / "examples/train.py"),
        "--dataset_dir", args.dataset_dir, "--tokenizer_name", args.tokenizer_name, "--overwrite_output_dir",
        *(["--clean_split", args.ddpp_dir] if args.clean_split else []),
        "--validation_file", str(data / DDPP_DEV_PAIRS),
        *config_flags(f"{BASE_CONFIG},{RUNS[base]}"),
        "--max_train_minutes", str(args.train_minutes),
        "--output_dir", str(Path(args.work_dir) / "models" / name),
        *TRAIN_ARGS,
        *(["--seed", str(seed)] if seed is not None else []),  # after TRAIN_ARGS' --seed: the last one counts
        *(["--torch_compile"] if args.torch_compile else []),
        *(["--cpu"] if args.smoke else []),
    ]


def model_folder(args, name: str) -> str:
    """The run's `best/` (the highest DailyDialog++ dev BLEU-2 of TRAIN_ARGS' --metric_for_best_model), else its final
    model."""
    folder = Path(args.work_dir) / "models" / name
    return str(folder / "best" if (folder / "best" / "config.json").exists() else folder)


def eval_jobs(args, name: str) -> list[tuple[str, str, list[str]]]:
    """(job name, script, arguments) for one trained model: generations, likelihood and latent diagnostics."""
    model = model_folder(args, name)
    base, _ = split_seed(name)
    ddpp_test = str(Path(args.work_dir) / "data" / DDPP_TEST)
    common = ["--model_name_or_path", model, "--batch_size", "256" if args.num_samples > 5 else "512",
              "--max_new_tokens", "40", "--dtype", "bfloat16" if args.bf16 else "float32", "--seed", "1234",
              # thousands of contexts sorted by length: many batch shapes, each a minute of compiling on CUDA
              "--disable_compile"]
    if args.smoke:
        common += ["--max_samples", "8", "--device", "cpu"]
    dd = [*common, "--dataset_dir", args.dataset_dir]
    k = f"{args.num_samples}samples"
    ddpp = [*common, "--input_file", ddpp_test, "--num_samples", str(args.num_samples), *SAMPLING]
    jobs = [(f"{name}__ddpptest__{k}", "generate.py", ddpp)]
    for split in ("validation", "test"):  # the paper's protocol: one sample per pair
        jobs.append((f"{name}__{split}__sampling", "generate.py", [*dd, "--split", split, *SAMPLING]))
    if "temperature" in args.sweeps and name in args.temperature_runs:  # the seed-1234 runs only
        flag, values, tag = (("--temperature", args.token_temperatures, "T") if base == "none" else
                             ("--prior_temperature", args.prior_temperatures, "tau"))
        for value in values:
            jobs.append((f"{name}__ddpptest__{k}_{tag}{value}", "generate.py", [*ddpp, flag, str(value)]))
    likelihood = ["--model_name_or_path", model, "--input_file", ddpp_test, "--num_samples",
                  str(args.likelihood_samples), "--batch_size", "64", "--seed", "1234"]
    if args.smoke:
        likelihood += ["--max_samples", "2", "--device", "cpu"]
    jobs.append((f"{name}__likelihood", "likelihood.py", likelihood))
    if "beam" in args.sweeps:
        for split in ("validation", "test"):
            jobs.append((f"{name}__{split}__beam5", "generate.py", [*dd, "--split", split, *BEAM]))
    if base == "none":
        return jobs
    if "posterior" in args.sweeps:  # the oracle: what the prior loses against what the decoder does
        jobs.append((f"{name}__test__sampling_posterior", "generate.py",
                     [*dd, "--split", "test", *SAMPLING, "--latents", "posterior"]))
    diag = ["--model_name_or_path", model, "--dataset_dir", args.dataset_dir, "--split", "validation",
            "--max_samples", "32" if args.smoke else "2000"]
    jobs.append((f"{name}__diagnostics", "diagnose.py", diag))
    if name == "diffusion" and "solver" in args.sweeps:
        subset = [*dd, "--split", "validation", "--max_samples", "1000", *SAMPLING]
        for sampler in SOLVERS:
            for steps in SOLVER_STEPS:
                tag = f"{sampler.replace('+', 'p')}{steps}"
                solver = ["--prior_sampler", sampler, "--num_inference_steps", str(steps)]
                jobs.append((f"{name}__validation1000__{tag}", "generate.py", [*subset, *solver]))
                jobs.append((f"{name}__diagnostics__{tag}", "diagnose.py",
                             [*diag, "--max_samples", "1000", *solver]))
    return jobs


OUTPUT_FOLDERS = {"generate.py": ("generations", ".jsonl"), "diagnose.py": ("diagnostics", ".json"),
                  "likelihood.py": ("likelihood", ".json")}


def run_parallel(commands: list[tuple[str, list[str], Path]], max_parallel: int, work_dir: Path):
    """Run (name, command, log file) jobs, at most `max_parallel` at a time; return {name: exit code}. Each finished
    job appends its line to WORK_DIR/timings.jsonl at once (a job polling the folder sees progress)."""
    pending, running, codes, started = list(commands), {}, {}, {}
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
                with open(work_dir / "timings.jsonl", "a") as f:
                    f.write(json.dumps({"name": name, "seconds": seconds, "exit": proc.returncode,
                                        "concurrent": min(max_parallel, len(commands))}) + "\n")
                print(f"[{time.strftime('%H:%M:%S')}] finished {name}: exit {proc.returncode}", flush=True)
        time.sleep(0.5 if len(commands) < 20 else 2)
    return codes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="the ijcnlp DailyDialog folder")
    p.add_argument("--ddpp_dir", required=True, help="the DailyDialog++ folder (dev.json.gz, test.json.gz)")
    p.add_argument("--tokenizer_name", required=True)
    p.add_argument("--work_dir", required=True)
    p.add_argument("--phase", choices=["train", "eval"], required=True)
    p.add_argument("--runs", default="diffusion,gaussian,standard,none",
                   help="comma-separated run names; NAME-sN is a replica of NAME trained with --seed N")
    p.add_argument("--train_minutes", type=float, default=12.0)
    p.add_argument("--clean_split", action=argparse.BooleanOptionalAction, default=True,
                   help="train without the dialogues of the evaluation sets (train.py --clean_split)")
    p.add_argument("--num_samples", type=int, default=10, help="samples per DailyDialog++ test context (k)")
    p.add_argument("--likelihood_samples", type=int, default=50,
                   help="posterior samples of the importance-weighted NLL (examples/likelihood.py)")
    p.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train with train.py --torch_compile (default: on where CUDA is available; it needs "
                        "transformers >= 5.23; docs/performance.md compares it with eager); the compile counts in "
                        "--train_minutes")
    p.add_argument("--max_parallel", type=int, default=4, help="concurrent jobs in --phase eval")
    p.add_argument("--sweeps", default="temperature",
                   help=f"extra --phase eval jobs, comma-separated, from {', '.join(SWEEPS)}: temperature (prior / "
                        "token temperature of the --temperature_runs on DailyDialog++ test), beam (beam 5 on "
                        "DailyDialog validation/test), posterior (the oracle), solver (diffusion: solver x steps)")
    p.add_argument("--smoke", action="store_true",
                   help="a CPU check of the whole path: tiny shapes, 3 updates, 8 contexts, fp32, every other sweep point")
    p.add_argument("--prior_temperatures", type=floats, default=PRIOR_TEMPERATURES,
                   help="comma-separated prior temperatures of the latent runs' sweep")
    p.add_argument("--token_temperatures", type=floats, default=TOKEN_TEMPERATURES,
                   help="comma-separated token temperatures of the plain seq2seq's sweep")
    p.add_argument("--temperature_runs", default=",".join(TEMPERATURE_RUNS),
                   help="comma-separated runs of the temperature sweep (token temperature for none, prior for the rest)")
    args = p.parse_args(argv)
    for flag in ("num_samples", "likelihood_samples", "max_parallel"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.train_minutes < float("inf"):
        p.error(f"--train_minutes must be a finite number > 0, got {args.train_minutes}")
    for flag in ("dataset_dir", "ddpp_dir"):
        if not Path(getattr(args, flag)).is_dir():
            p.error(f"--{flag}: no such folder: {getattr(args, flag)}")
    args.temperature_runs = set(filter(None, args.temperature_runs.split(",")))
    args.sweeps = set(filter(None, args.sweeps.split(",")))
    bad_sweeps = args.sweeps - set(SWEEPS)
    if bad_sweeps:
        p.error(f"--sweeps: unknown {sorted(bad_sweeps)}; choose from {', '.join(SWEEPS)}")
    args.names = args.runs.split(",")
    unknown = [n for n in [*args.names, *args.temperature_runs] if split_seed(n)[0] not in RUNS]
    if unknown:
        p.error(f"--runs / --temperature_runs: unknown {unknown}; choose from {sorted(RUNS)}, each optionally with a "
                "seed suffix -sN (a replica trained with --seed N, e.g. memdrop0.5-s2)")
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if args.torch_compile is None:
        args.torch_compile = cuda
    args.bf16 = cuda
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.smoke:
        global BASE_CONFIG, SOLVER_STEPS
        BASE_CONFIG = (BASE_CONFIG.replace("d_model=256", "d_model=32").replace("ffn_dim=1024", "ffn_dim=64")
                       .replace("denoiser_hidden_size=512", "denoiser_hidden_size=32"))
        SOLVER_STEPS = (1, 5)
        args.prior_temperatures, args.token_temperatures = args.prior_temperatures[::2], args.token_temperatures[::2]
        TRAIN_ARGS.extend(["--max_train_steps", "3", "--max_eval_samples", "16", "--num_eval_generation_samples", "4",
                           "--per_device_eval_batch_size", "16", "--max_train_samples", "256", "--num_sample_contexts",
                           "0"])
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prepare_data(args)
    if args.phase == "train":
        jobs = []
        for name in args.names:
            command = train_command(args, name)
            record(work_dir, f"train:{name}", command)
            jobs.append((name, command, work_dir / "logs" / f"train_{name}.log"))
        codes = run_parallel(jobs, max_parallel=len(jobs), work_dir=work_dir)
    else:
        jobs = []
        for name in args.names:
            for job, script, job_args in eval_jobs(args, name):
                folder, suffix = OUTPUT_FOLDERS[script]
                out = work_dir / folder / f"{job}{suffix}"
                out.parent.mkdir(parents=True, exist_ok=True)
                command = [sys.executable, str(REPO / "examples" / script), *job_args, "--output", str(out)]
                if script == "diagnose.py" and "__" not in job.split("__diagnostics")[-1]:
                    command += ["--plot", str(out.with_suffix(".png"))]
                record(work_dir, f"{script}:{job}", command)
                jobs.append((job, command, work_dir / "logs" / f"{job}.log"))
        # the DailyDialog++ generations first: the primary results reach the work folder before the extras
        jobs.sort(key=lambda job: "__ddpptest__" not in job[0])
        codes = run_parallel(jobs, max_parallel=args.max_parallel, work_dir=work_dir)
    failed = {k: v for k, v in codes.items() if v != 0}
    print(json.dumps({"phase": args.phase, "jobs": len(codes), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
