"""Every figure in README.md's "Measured results" section is in the results file its bullet names: a number quoted
there must equal (to the digits quoted) a number in one of the `results/*.json` files named in the same bullet, as a
value or as a percentage of one. Numbers that are not measurements (the paper's, settings) are listed below with
why. Backticked text (flags, settings, file names) is not read."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.\-])\d+(?:,\d{3})*(?:\.\d+)?(?![\w.])")
NOT_MEASURED = {  # number as written -> where it comes from
    "43.2": "the paper's BLEU-1", "38.1": "the paper's BLEU-2", "3.7": "the paper's Distinct-1",
    "31.2": "the paper's Distinct-2",
}


def results_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Measured results")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def bullets() -> list[str]:
    section = results_section()
    return ["- " + chunk for chunk in re.split(r"(?m)^- ", section)[1:]]


def named_files(bullet: str) -> list[str]:
    return re.findall(r"results/[\w./-]+\.json", bullet)


def file_numbers(path: Path) -> list[float]:
    return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", path.read_text())]


def found(quoted: str, candidates: list[float]) -> bool:
    value = float(quoted.replace(",", ""))
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    half_unit = 0.5 * 10**-decimals + 1e-9
    return any(abs(c - value) <= half_unit or abs(100 * c - value) <= half_unit for c in candidates)


def test_the_section_has_bullets_each_naming_results_files():
    assert len(bullets()) >= 2
    for bullet in bullets():
        names = named_files(bullet)
        assert names, f"a results bullet names no results/*.json file: {bullet[:80]!r}"
        for name in names:
            assert (REPO / name).is_file(), name


@pytest.mark.parametrize("index", range(len(bullets())))
def test_every_quoted_number_is_in_the_named_results_files(index):
    bullet = bullets()[index]
    candidates = [n for name in named_files(bullet) for n in file_numbers(REPO / name)]
    prose = re.sub(r"`[^`]*`", " ", bullet)
    missing = [q for q in NUMBER.findall(prose) if q not in NOT_MEASURED and not found(q, candidates)]
    assert not missing, f"README numbers not in the named results files: {missing} in {bullet[:100]!r}"


def test_the_check_catches_a_changed_number():
    bullet = next(b for b in bullets() if "results/speed.json" in b)
    candidates = [n for name in named_files(bullet) for n in file_numbers(REPO / name)]
    quoted = [q for q in NUMBER.findall(re.sub(r"`[^`]*`", " ", bullet)) if "." in q]
    assert quoted and all(found(q, candidates) for q in quoted)
    assert not found("9.87", candidates) and not found("1.84", candidates)  # 1.81 moved by 0.03
