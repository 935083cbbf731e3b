"""Run every row of `robustness_cases.CASES` and write each outcome as JSON (counts per class).

    python tests/record_robustness.py results/robustness_after.json [-k SUBSTRING]

Each row: {"case", "class", "outcome": "holds" or "fails", "detail"}, with the counts per class. A case still
running after CASE_SECONDS fails as "did not end" (an unbounded run). Rows already in OUT are kept, not rerun (a
recording that was stopped goes on where it stopped).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
CASE_SECONDS = 300


class DidNotEnd(Exception):
    pass


def _alarm(signum, frame):
    raise DidNotEnd(f"did not end within {CASE_SECONDS} s")


def main(argv: list[str]) -> None:
    import torch

    from conftest import tiny_config_kwargs
    from robustness_cases import CASES, Context

    from dior_cvae import DiorCVAEConfig, DiorCVAEForConditionalGeneration

    out = Path(argv[0])
    only = argv[2] if len(argv) > 2 and argv[1] == "-k" else None
    done = json.loads(out.read_text())["cases"] if out.is_file() else []
    rows = list(done)
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory() as shared:
        os.environ["ROBUSTNESS_SHARED_TMP"] = shared
        for name, kind, check in CASES:
            if (only and only not in name) or any(r["case"] == name for r in done):
                continue
            torch.manual_seed(0)
            tiny = DiorCVAEForConditionalGeneration(DiorCVAEConfig(**tiny_config_kwargs())).eval()
            with tempfile.TemporaryDirectory() as tmp:
                cwd = os.getcwd()
                os.chdir(tmp)
                try:
                    signal.alarm(CASE_SECONDS)
                    check(Context(Path(tmp), tiny))
                    outcome, detail = "holds", ""
                except BaseException as exc:  # noqa: BLE001 - every outcome is recorded
                    if isinstance(exc, KeyboardInterrupt):
                        raise
                    outcome = "fails"
                    detail = f"{type(exc).__name__}: {exc}"[:600] if isinstance(exc, AssertionError) else (
                        "unexpected " + "".join(traceback.format_exception_only(type(exc), exc)).strip()[:600])
                finally:
                    signal.alarm(0)
                    os.chdir(cwd)
            rows.append({"case": name, "class": kind, "outcome": outcome, "detail": detail})
            print(f"{outcome:5}  {kind:9}  {name}  {detail[:150]}", file=sys.stderr, flush=True)
            write(out, argv, rows, CASES)
    print(json.dumps(write(out, argv, rows, CASES), indent=1))


def write(out: Path, argv: list[str], rows: list[dict], cases) -> dict:
    counts = {}
    for kind in dict.fromkeys(k for _, k, _ in cases):
        c = Counter(r["outcome"] for r in rows if r["class"] == kind)
        counts[kind] = {"cases": sum(c.values()), "holds": c["holds"], "fails": c["fails"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python tests/record_robustness.py " + " ".join(argv), "counts": counts,
                               "cases": rows}, indent=1) + "\n")
    return counts


if __name__ == "__main__":
    main(sys.argv[1:])
