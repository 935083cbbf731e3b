"""Score a JSON Lines file of generations with the Dior-CVAE metrics.

Each input line is ``{"context": str | list[str], "reference": str | list[str],
"samples": list[str]}``. Prints one JSON object of metrics (see
``dior_cvae.metrics.score_generations``).

Usage:
    python examples/score.py --input generations.jsonl [--output scores.json]
        [--no_semantic] [--embedding_model PATH]
        [--multiref_file ../shared/data/dailydialog_plusplus/test.json.gz]

``--multiref_file`` attaches the 5 DailyDialog++ references to every row whose
context (turns joined, whitespace and case normalised) matches a DailyDialog++
context; the row's own first reference is kept first when it is one of them.
"""

from __future__ import annotations

import argparse
import json
import sys

from dior_cvae.metrics import (
    load_embedding_model,
    load_multiref_references,
    read_generations,
    score_generations,
)


def _normalise(context: str | list[str]) -> str:
    """Joined context turns, lowercased, with whitespace collapsed."""
    text = context if isinstance(context, str) else " ".join(context)
    return " ".join(text.lower().split())


def attach_multiref(rows: list[dict], multiref_path: str) -> int:
    """Replace the references of rows whose context is in DailyDialog++; return the match count."""
    lookup = {_normalise(r["context"]): r["references"] for r in load_multiref_references(multiref_path)}
    matched = 0
    for row in rows:
        refs = lookup.get(_normalise(row.get("context", "")))
        if refs is None:
            continue
        own = row.get("reference")  # validated later by score_generations
        own = own[0] if isinstance(own, list) and own else own
        row["reference"] = sorted(refs, key=lambda ref: ref != own)  # stable: own reference first
        matched += 1
    return matched


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="generations JSON Lines file")
    parser.add_argument("--output", help="also write the metrics JSON here")
    parser.add_argument("--no_semantic", action="store_true", help="skip the embedding-based sample_cosine")
    parser.add_argument("--embedding_model", help="sentence-transformers path or name (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--multiref_file", help="DailyDialog++ JSON Lines (.gz) for multi-reference BLEU")
    args = parser.parse_args(argv)

    try:
        rows = read_generations(args.input)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:  # a truncated / non-UTF-8 file: name it
        raise SystemExit(f"score.py: error: --input {args.input}: {type(exc).__name__}: {exc}") from None
    if args.multiref_file:
        try:
            matched = attach_multiref(rows, args.multiref_file)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
            raise SystemExit(f"score.py: error: --multiref_file {args.multiref_file}: {type(exc).__name__}: {exc}") from None
        print(f"multiref: matched {matched}/{len(rows)} rows to DailyDialog++ contexts", file=sys.stderr)
    model = None if args.no_semantic else load_embedding_model(args.embedding_model)
    text = json.dumps(score_generations(rows, embedding_model=model, semantic=not args.no_semantic), indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
