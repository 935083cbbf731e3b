"""Mutation check: each targeted mutant of the code must make the tests that guard it fail.

For every mutant below, a copy of the working tree (the files git tracks or would track) gets one textual change,
and the mutant's tests run on that copy (`python -m pytest -x` with the copy first on `sys.path`); the mutant is
killed when they fail. The unmutated copy runs the same tests first, which must pass. Writes a JSON report and exits
non-zero if a mutant survives or the baseline fails.

    python .ci/mutation_check.py --output results/mutation_check.json

It is not part of `python -m pytest` (it runs the relevant tests once per mutant); run it after changing a guarded
line or its tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (file, the exact original text (must occur once), its replacement, the tests that must fail)
MUTANTS = {
    "free-bits split: the prior's share ignores beta": (
        "dior_cvae/latent_dior.py",
        "prior_share = 1 - kl_weight * above",
        "prior_share = 1 - above",
        ["tests/test_one_to_many.py::test_free_bits_split_the_kl_gradient_between_posterior_and_prior"],
    ),
    "free-bits floor: no gradient cut below the floor": (
        "dior_cvae/latent_dior.py",
        "objective = kl_weight * (above * kl_loss + (1 - above) * floor)",
        "objective = kl_weight * (kl_loss + (1 - above) * floor)",
        ["tests/test_one_to_many.py::test_free_bits_split_the_kl_gradient_between_posterior_and_prior"],
    ),
    "VDM bound: diffusion term without its 1/2": (
        "dior_cvae/prior_dior.py",
        "diffusion = 0.5 * (lam_max - lam_min) * squared_error",
        "diffusion = (lam_max - lam_min) * squared_error",
        ["tests/test_prior.py::test_bound_is_tight_for_gaussian_data_with_the_optimal_denoiser"],
    ),
    "VDM bound: decoder term at the wrong end point": (
        "dior_cvae/prior_dior.py",
        "decoder = dim * 0.5 * (math.log(2 * math.pi * math.e) - lam_max)",
        "decoder = dim * 0.5 * (math.log(2 * math.pi * math.e) - lam_max + 0.05)",
        ["tests/test_prior.py::test_bound_is_tight_for_gaussian_data_with_the_optimal_denoiser"],
    ),
    "CFG lerp: conditional and unconditional branches swapped": (
        "dior_cvae/prior_dior.py",
        "torch.lerp(prediction[1], prediction[0], 1 + guidance)",
        "torch.lerp(prediction[0], prediction[1], 1 + guidance)",
        ["tests/test_model.py::test_guidance_is_applied_at_every_sampling_step"],
    ),
    "memory dropout: keeps with probability p instead of 1 - p": (
        "dior_cvae/attention_dior.py",
        "(keep >= probability)",
        "(keep < probability)",
        ["tests/test_model.py::test_memory_dropout_rate_train_only_and_never_the_latent_slot"],
    ),
    "cache path: static cross-attention cache without the latent slot's position": (
        "dior_cvae/modeling_dior.py",
        "layer.max_cache_len += 1",
        "layer.max_cache_len += 0",
        ["tests/test_model.py::test_static_cache_gives_the_dynamic_cache_tokens"],
    ),
    "cache path: captured decoding keeps the draws of the steps past the end": (
        "dior_cvae/generation_dior.py",
        "if do_sample and steps < len(generated):",
        "if False:",
        ["tests/test_graph_decoding.py::test_the_global_rng_after_generate_is_transformers_loops"],
    ),
    "cache path: a call the captured step cannot serve still gets the static cache": (
        "dior_cvae/generation_dior.py",
        "captures_decoding(model, generation_config)\n        and specs is not None",
        "captures_decoding(model, generation_config)\n        and True",
        ["tests/test_graph_decoding.py::test_where_the_step_cannot_serve_transformers_loop_runs_as_transformers_sets_it_up"],
    ),
    "evaluation: condition dropout also in eval": (
        "dior_cvae/prior_dior.py",
        "if self.training and config.cfg_dropout > 0:",
        "if config.cfg_dropout > 0:",
        ["tests/test_prior.py::test_condition_dropout_only_in_training"],
    ),
    "diagnostics: mutual information's mixture over the wrong axis": (
        "dior_cvae/training/diagnostics.py",
        "torch.logsumexp(log_q, dim=1)",
        "torch.logsumexp(log_q, dim=0)",
        ["tests/test_diagnostics.py"],
    ),
}


def copy_tree(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def test_env(tree: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1"}


def run_tests(tree: Path, tests: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=tree,
                          env=test_env(tree), capture_output=True, text=True)


def summary(result: subprocess.CompletedProcess) -> str:
    """pytest's last "N passed / M failed" line."""
    lines = [line.strip("= ") for line in result.stdout.splitlines() if " passed" in line or " failed" in line]
    return re.sub(r" in [\d.]+s.*", "", lines[-1]) if lines else f"no summary (exit code {result.returncode})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    parser.add_argument("--only", help="run only the mutants whose name contains this text")
    args = parser.parse_args(argv)
    mutants = {name: m for name, m in MUTANTS.items() if args.only is None or args.only in name}
    if not mutants:
        parser.error(f"--only {args.only!r} matches no mutant")
    report = {"command": "python .ci/mutation_check.py" + (f" --only {args.only!r}" if args.only else ""),
              "mutants": []}
    with tempfile.TemporaryDirectory(prefix="mutation_check_") as temporary:
        tree = Path(temporary) / "tree"
        copy_tree(tree)
        imported = subprocess.run([sys.executable, "-c", "import dior_cvae; print(dior_cvae.__file__)"], cwd=tree,
                                  env=test_env(tree), capture_output=True, text=True, check=True).stdout.strip()
        if not Path(imported).is_relative_to(tree):
            raise SystemExit(f"the copy's dior_cvae is not the one imported ({imported}): PYTHONPATH does not win")
        all_tests = sorted({test for _, _, _, tests in mutants.values() for test in tests})
        baseline = run_tests(tree, all_tests)
        report["baseline"] = {"tests": all_tests, "passed": baseline.returncode == 0, "summary": summary(baseline)}
        print(f"baseline: {report['baseline']['summary']}", flush=True)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:], file=sys.stderr)
        for name, (path, original, replacement, tests) in mutants.items():
            source = tree / path
            text = source.read_text()
            if text.count(original) != 1:
                raise SystemExit(f"mutant {name!r}: {original!r} occurs {text.count(original)} times in {path}, not once")
            source.write_text(text.replace(original, replacement))
            try:
                result = run_tests(tree, tests)
            finally:
                source.write_text(text)
            killed = result.returncode != 0
            report["mutants"].append({"name": name, "file": path, "original": original, "mutant": replacement,
                                      "tests": tests, "killed": killed, "summary": summary(result)})
            print(f"{'killed  ' if killed else 'SURVIVED'} {name}: {summary(result)}", flush=True)
    survivors = [m["name"] for m in report["mutants"] if not m["killed"]]
    report["killed"] = f"{len(report['mutants']) - len(survivors)} / {len(report['mutants'])}"
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"killed {report['killed']}")
    return 1 if survivors or not report["baseline"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
