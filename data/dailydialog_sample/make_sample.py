#!/usr/bin/env python
"""Regenerate the shipped DailyDialog sample from the official ijcnlp release.

Usage::

    python data/dailydialog_sample/make_sample.py --source /path/to/ijcnlp_dailydialog

``--source`` is a folder holding ``dialogues_{train,validation,test}.txt`` (or
``.txt.gz``; the per-split sub-folders of the original zips also work). The
first 1,000 train, 100 validation and 100 test dialogues (lines) are copied
unchanged to ``{train,validation,test}.txt.gz`` in ``--out`` (default: this
script's folder), gzip level 9 with no file name and mtime 0 (like
``gzip -9 -n``), so reruns are byte-identical. Needs only the standard library.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

COUNTS = {"train": 1000, "validation": 100, "test": 100}


def find_source(source: Path, split: str) -> Path:
    prefix = "dialogues_"  # the official file names
    for folder in (source, source / split):
        for name in (f"{prefix}{split}.txt", f"{prefix}{split}.txt.gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"no {prefix}{split}.txt(.gz) under {source}")


def read_lines(path: Path, n: int) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[str] = []
    with opener(path, "rt", encoding="utf-8", newline="\n") as handle:
        for line in handle:
            if len(lines) == n:
                break
            lines.append(line if line.endswith("\n") else line + "\n")
    if len(lines) < n:
        raise ValueError(f"{path}: only {len(lines)} dialogues, {n} requested")
    return lines


def count_pairs(lines: list[str]) -> int:
    """PLATO rule: one pair per utterance from the 2nd on."""
    total = 0
    for line in lines:
        pieces = [p.strip() for p in line.split("__eou__")]
        if pieces and pieces[-1] == "":
            pieces.pop()
        total += max(len(pieces) - 1, 0)
    return total


def write_gzip(path: Path, lines: list[str]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        gz.write("".join(lines).encode("utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="folder with the ijcnlp dialogue files")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in COUNTS.items():
        lines = read_lines(find_source(args.source, split), n)
        target = args.out / f"{split}.txt.gz"
        write_gzip(target, lines)
        print(f"{target}: {len(lines)} dialogues, {count_pairs(lines)} pairs")


if __name__ == "__main__":
    main()
