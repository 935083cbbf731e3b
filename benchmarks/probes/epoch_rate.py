"""Updates/s and the time of one epoch, read from train.py runs' `log_history.jsonl`, with a plot (updates against
time, loss against updates).

    python benchmarks/probes/epoch_rate.py --run eager=W/eager/log_history.jsonl --run compiled=W/compiled/log_history.jsonl \\
        --output OUT.json --plot OUT.png

The steady rate of a run is taken between its first logged update at least `--skip_s` seconds after its first
logged update (past the compile of `--torch_compile`, the loader's warm-up) and its last one, from the logged
`train_time_s`; the updates of an epoch come from the last row's `step` / `epoch` (`--torch_compile` drops the last
partial batch). The first logged update's time is reported too: for a compiled run it holds the compile. Prints a
table last.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, write_json  # noqa: E402


def read_rows(path: str) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"epoch_rate.py: {path}:{number}: not JSON ({error.msg})") from None
        if "rc_loss" in row and "train_time_s" in row:  # a training log row (not an evaluation)
            rows.append(row)
    if len(rows) < 2:
        raise SystemExit(f"epoch_rate.py: {path}: fewer than 2 training log rows with train_time_s")
    return rows


def steady_rate(rows: list[dict], skip_s: float) -> dict:
    first = rows[0]
    start = next((r for r in rows if r["train_time_s"] >= first["train_time_s"] + skip_s), None)
    if start is None or start is rows[-1]:
        raise SystemExit(f"epoch_rate.py: no logged update {skip_s} s after the first one: lower --skip_s")
    last = rows[-1]
    rate = (last["step"] - start["step"]) / (last["train_time_s"] - start["train_time_s"])
    return {"updates_per_s": rate, "from_step": start["step"], "to_step": last["step"],
            "first_logged_step": first["step"], "first_logged_s": first["train_time_s"],
            "train_time_s": last["train_time_s"], "epochs": last.get("epoch")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=LOG",
                        help="a run's name and its log_history.jsonl (repeat)")
    parser.add_argument("--skip_s", type=float, default=15.0)
    parser.add_argument("--output", required=True, help="JSON file")
    parser.add_argument("--plot", default=None, help="PNG: updates against time, loss against updates")
    args = parser.parse_args(argv)
    runs, history = {}, {}
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--run {spec!r}: expected NAME=PATH")
        history[name] = read_rows(path)
        runs[name] = steady_rate(history[name], args.skip_s) | {"log": path}
        last = history[name][-1]
        if not last.get("epoch"):
            raise SystemExit(f"epoch_rate.py: {path}: its last training row has no `epoch`")
        runs[name]["steps_per_epoch"] = round(last["step"] / last["epoch"])
        runs[name]["epoch_s"] = runs[name]["steps_per_epoch"] / runs[name]["updates_per_s"]
    result = {"skip_s": args.skip_s, "runs": runs,
              "loss_curves": {n: [[r["train_time_s"], r["step"], r["loss"]] for r in rows] for n, rows in history.items()}}
    write_json(result, args.output)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (progress, loss) = plt.subplots(1, 2, figsize=(11, 4))
        for name, rows in history.items():
            label = f"{name}: {runs[name]['updates_per_s']:.1f} updates/s, {runs[name]['epoch_s']:.1f} s/epoch"
            progress.plot([r["train_time_s"] for r in rows], [r["step"] for r in rows], label=label)
            loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name, linewidth=0.8)
        progress.set_xlabel("training time (s)")
        progress.set_ylabel("updates")
        progress.legend()
        loss.set_xlabel("update")
        loss.set_ylabel("training loss (per response)")
        loss.set_title("the same curve per update (it rises while the KL weight anneals)", fontsize=9)
        loss.legend()
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    print(format_table([("run", "updates/s", "updates/epoch", "epoch s", "first logged (step @ s)", "epochs")] + [
        (name, f"{r['updates_per_s']:.2f}", r["steps_per_epoch"], f"{r['epoch_s']:.1f}",
         f"{r['first_logged_step']} @ {r['first_logged_s']:.1f} s", f"{r['epochs'] or 0:.2f}") for name, r in runs.items()]))


if __name__ == "__main__":
    main()
