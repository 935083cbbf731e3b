"""Dialogue data loading, tokenisation and batching for Dior-CVAE.

The DailyDialog folder, ParlAI PersonaChat and JSON Lines readers are plain
Python (``transformers``/``tokenizers`` for the tokenizer helpers), so training
on them needs no ``datasets``. The optional ``datasets`` dependency is imported
lazily, by :func:`load_dialog_dataset` (any Hub dataset, or JSON / CSV files,
with configurable column names), the ``*_hub`` loaders and
:func:`tokenize_dataset` (a cached, batched ``Dataset.map``).

An *example* is a dict::

    {"context": list[str],   # dialogue turns, oldest first (at least one)
     "response": str,        # the next turn, to be generated
     "persona": list[str]}   # persona sentences; may be empty

Loaders
    * :func:`load_dailydialog_dir` / :func:`load_dailydialog_hub`: DailyDialog,
      paired exactly like PLATO / DialogVED (76,053 / 7,069 / 6,740 pairs).
    * :func:`load_personachat_parlai` / :func:`load_personachat_hub`: PersonaChat.
    * :func:`load_jsonl`: user data, one JSON object per line (errors name ``path:line``).
    * :func:`load_dialog_dataset`: any Hub dataset or JSON / JSON Lines / CSV file via ``datasets``.

Model inputs
    * :func:`format_context`, :func:`encode_example`, :func:`encode_examples`, :func:`tokenize_dataset`.
    * Batches: ``transformers.DataCollatorForSeq2Seq(tokenizer)`` (labels padded with -100).

Tokenizers
    * :func:`train_tokenizer`: a byte-level BPE with BART's special tokens, trained offline.
    * :func:`load_bart_tokenizer_files`: BART's tokenizer from ``vocab.json`` + ``merges.txt``.

Turn separator: following the Dior-CVAE paper (Sec. 2.1), turns are joined with
the tokenizer's eos token ``</s>`` by default. It is a parameter
(``turn_separator``) everywhere; it is inserted verbatim, with no spaces
around it. So each turn is tokenised exactly as the first turn after ``<s>``
is (no prefix space), which is how BART encodes sentence pairs
(``<s> A </s></s> B </s>``).
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..pipeline_dior import tokenize_contexts

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = [
    "DataFormatError",
    "LengthGroupedSampler",
    "DEFAULT_SPLITS",
    "BART_SPECIAL_TOKENS",
    "dailydialog_line_to_utterances",
    "dialog_to_examples",
    "load_dailydialog_dir",
    "load_dailydialog_hub",
    "load_personachat_parlai",
    "load_personachat_hub",
    "load_jsonl",
    "parse_record",
    "split_turns",
    "load_dialog_dataset",
    "dailydialog_pairs",
    "personachat_pairs",
    "example_features",
    "tokenize_dataset",
    "format_context",
    "encode_example",
    "encode_examples",
    "train_tokenizer",
    "load_bart_tokenizer_files",
]

Example = dict[str, Any]
PathLike = str | os.PathLike

DEFAULT_SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: BART / RoBERTa special tokens, in id order 0..4 for :func:`train_tokenizer`.
BART_SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")

_EOU = "__eou__"
_RIGHT_SINGLE_QUOTE = "\u2019"


class DataFormatError(ValueError):
    """A malformed line in a user data file.

    The message starts with ``path:lineno:``; ``path`` and ``lineno`` are also
    available as attributes.
    """

    def __init__(self, path: PathLike, lineno: int, reason: str) -> None:
        self.path = str(path)
        self.lineno = lineno
        self.reason = reason
        super().__init__(f"{self.path}:{lineno}: {reason}")


def _open_text(path: PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file for reading, transparently gunzipping ``*.gz``.

    Universal newlines are *not* translated away beyond ``\\n``; a stray
    ``\\r`` inside a line is kept (DailyDialog has none).
    """
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline="\n")


def _read_lines(path: PathLike):
    """``(lineno, raw bytes)`` of a file, gunzipping ``*.gz``; a truncated or corrupt gzip stream raises
    :class:`DataFormatError` naming the file and the last line read."""
    path = Path(path)
    lineno = 0
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            for lineno, line in enumerate(handle, start=1):
                yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFormatError(path, lineno + 1, f"truncated or corrupt gzip file ({exc})") from None


def _decode(line: bytes, lineno: int) -> str:
    """One line as UTF-8 (a BOM on the first line is dropped); `ValueError` names the offending byte."""
    try:
        return line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {line[exc.start]:#04x} at column {exc.start + 1})") from None


# ---------------------------------------------------------------------------
# Generic pairing
# ---------------------------------------------------------------------------


def dialog_to_examples(
    utterances: Sequence[str], persona: Sequence[str] | None = None
) -> list[Example]:
    """One example per utterance from the 2nd on; context = all previous turns.

    Utterances are used as given (callers normalise them first).
    """
    persona_list = list(persona) if persona else []
    utts = list(utterances)
    return [
        {"context": utts[:i], "response": utts[i], "persona": list(persona_list)}
        for i in range(1, len(utts))
    ]


# ---------------------------------------------------------------------------
# DailyDialog
# ---------------------------------------------------------------------------


def _normalise_dailydialog_utterance(text: str) -> str:
    """PLATO's only normalisation: strip, and map U+2019 to an ASCII apostrophe."""
    return text.strip().replace(_RIGHT_SINGLE_QUOTE, "'")


def dailydialog_line_to_utterances(line: str) -> list[str]:
    """Split one ijcnlp DailyDialog line into normalised utterances.

    The PLATO / DialogVED rule: split on ``__eou__``, strip each piece, drop the
    empty last piece (every line ends with ``__eou__``), and replace ``’``
    (U+2019) with ``'``.
    """
    pieces = [p.strip() for p in line.split(_EOU)]
    if pieces and pieces[-1] == "":
        pieces.pop()
    return [p.replace(_RIGHT_SINGLE_QUOTE, "'") for p in pieces]


def _find_split_file(folder: Path, split: str) -> Path:
    candidates = [
        folder / f"dialogues_{split}.txt",
        folder / f"dialogues_{split}.txt.gz",
        folder / f"{split}.txt",
        folder / f"{split}.txt.gz",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"DailyDialog split {split!r} not found: none of "
        + ", ".join(str(c) for c in candidates)
        + " exists"
    )


def load_dailydialog_dir(
    path: PathLike, splits: Sequence[str] = DEFAULT_SPLITS,
    exclude_dialogues: Mapping[str, Iterable[int]] | None = None,
) -> dict[str, list[Example]]:
    """Load DailyDialog (context, response) pairs from a folder.

    For each split the folder must hold one of ``dialogues_{split}.txt``,
    ``dialogues_{split}.txt.gz`` (the names in the ijcnlp archive) or ``{split}.txt``,
    ``{split}.txt.gz`` (tried in that order); one dialogue per line, utterances
    separated by ``__eou__``.

    Pairs follow PLATO / DialogVED exactly (see
    :func:`dailydialog_line_to_utterances`): the official files give
    76,053 / 7,069 / 6,740 pairs and the validation/test pairs, rendered as
    ``" __eou__ ".join(context) + "\\t" + response``, equal PLATO's
    ``dial.valid`` / ``dial.test`` line for line. ``persona`` is always ``[]``.

    ``exclude_dialogues[split]`` names dialogues of that split to leave out by their 1-based line number (the
    dialogue ids of :func:`dior_cvae.training.clean_split.build_clean_split`, whose
    ``removed_train_dialogue_ids`` give the clean training split).

    Raises:
        FileNotFoundError: a split file is missing (the message names the paths tried).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"DailyDialog folder not found: {folder}")
    result: dict[str, list[Example]] = {}
    for split in splits:
        file = _find_split_file(folder, split)
        examples: list[Example] = []
        dropped = 0
        excluded = set((exclude_dialogues or {}).get(split, ()))
        for lineno, raw in _read_lines(file):
            if lineno in excluded:
                continue
            try:
                line = _decode(raw, lineno).rstrip("\n")
            except ValueError as exc:
                raise DataFormatError(file, lineno, str(exc)) from None
            if not line.strip():
                continue
            utterances = dailydialog_line_to_utterances(line)
            kept = [u for u in utterances if u]  # an empty turn would become an empty response or context turn
            dropped += len(utterances) - len(kept)
            examples.extend(dialog_to_examples(kept))
        if dropped:
            logger.warning("%s: dropped %d empty utterance(s)", file, dropped)
        result[split] = examples
    return result


def _dailydialog_batch(batch: dict[str, list]) -> dict[str, list]:
    out: dict[str, list] = {"context": [], "response": [], "persona": []}
    for dialog in batch["dialog"]:
        utts = [_normalise_dailydialog_utterance(u) for u in dialog]
        while utts and utts[-1] == "":
            utts.pop()
        for example in dialog_to_examples(utts):
            for key in out:
                out[key].append(example[key])
    return out


def dailydialog_pairs(dialogs: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    """A Hub-style DailyDialog split (a ``"dialog"`` column of utterance lists) -> one row per (context, response)
    pair, with the PLATO rule of :func:`load_dailydialog_dir` (``Dataset.map``, batched)."""
    return dialogs.map(_dailydialog_batch, batched=True, remove_columns=dialogs.column_names,
                       features=example_features(), num_proc=num_proc, desc="DailyDialog pairs")


def load_dailydialog_hub(
    name: str = "daily_dialog", splits: Sequence[str] = DEFAULT_SPLITS, num_proc: int | None = None, **load_kwargs: Any
) -> datasets.DatasetDict:
    """DailyDialog from the HuggingFace Hub (``datasets.load_dataset(name, **load_kwargs)``), paired as
    :func:`dailydialog_pairs` does. Needs network access (the offline tests cover :func:`dailydialog_pairs`)."""
    datasets = _require_datasets("--dataset_name daily_dialog")
    dataset = datasets.load_dataset(name, **load_kwargs)
    return datasets.DatasetDict({split: dailydialog_pairs(dataset[split], num_proc) for split in splits})


# ---------------------------------------------------------------------------
# PersonaChat
# ---------------------------------------------------------------------------

_SELF_PERSONA = "your persona:"
_PARTNER_PERSONA = "partner's persona:"
_SILENCE = {"__SILENCE__", "__ SILENCE __"}


def _flush_episode(
    persona: list[str], turns: list[tuple[str, str]], out: list[Example]
) -> None:
    history: list[str] = []
    for partner, self_utt in turns:
        if partner not in _SILENCE:
            history.append(partner)
        if history:  # the self speaker opened the episode: nothing to condition on
            out.append({"context": list(history), "response": self_utt, "persona": list(persona)})
        history.append(self_utt)


def load_personachat_parlai(path: PathLike) -> list[Example]:
    """Load PersonaChat in ParlAI's "original" text format (``.txt`` or ``.txt.gz``).

    Each line is ``N text``; ``N`` restarts at 1 for every episode and otherwise
    increases by one. An episode starts with ``N your persona: ...`` lines
    (``partner's persona:`` lines, as in the ``both_*`` variants, are ignored),
    followed by turn lines ``N partner\\tself\\t\\tcand1|cand2|...`` (reward and
    candidates are optional and ignored).

    Returns one example per *self* utterance, with ``context`` = all earlier
    turns of the episode (partner first, alternating) and ``persona`` = the
    ``your persona:`` sentences (prefix removed). A ``__SILENCE__`` partner turn
    (ConvAI2) is left out of the context; a self turn with no preceding turn
    yields no example but stays in the history.

    Raises:
        ValueError: a malformed line; the message starts with ``path:lineno:``.
    """
    path = Path(path)
    out: list[Example] = []
    persona: list[str] = []
    turns: list[tuple[str, str]] = []
    prev_number = 0
    with _open_text(path) as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            number_str, sep, text = line.partition(" ")
            if not sep or not number_str.isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'N text' with a line number N, got {line[:60]!r}")
            number = int(number_str)
            if number == 1:
                if prev_number:
                    _flush_episode(persona, turns, out)
                persona, turns = [], []
            elif number != prev_number + 1:
                raise ValueError(
                    f"{path}:{lineno}: line number {number} does not follow {prev_number} "
                    "(numbering must restart at 1 or increase by 1)"
                )
            prev_number = number

            if text.startswith(_SELF_PERSONA):
                if turns:
                    raise ValueError(f"{path}:{lineno}: persona line after the dialogue turns of an episode")
                sentence = text[len(_SELF_PERSONA):].strip()
                if not sentence:
                    raise ValueError(f"{path}:{lineno}: empty persona sentence")
                persona.append(sentence)
                continue
            if text.startswith(_PARTNER_PERSONA):
                continue
            fields = text.split("\t")
            if len(fields) < 2:
                raise ValueError(
                    f"{path}:{lineno}: expected 'partner<TAB>self[<TAB><TAB>candidates]', found no TAB"
                )
            partner, self_utt = fields[0].strip(), fields[1].strip()
            if not partner or not self_utt:
                raise ValueError(f"{path}:{lineno}: empty partner or self utterance")
            turns.append((partner, self_utt))
    if prev_number:
        _flush_episode(persona, turns, out)
    return out


def _personachat_batch(batch: dict[str, list]) -> dict[str, list]:
    out: dict[str, list] = {"context": [], "response": [], "persona": []}
    for history, candidates, personality in zip(batch["history"], batch["candidates"], batch["personality"]):
        context = [t.strip() for t in history if t.strip() and t.strip() not in _SILENCE]
        response = candidates[-1].strip()
        if context and response:
            out["context"].append(context)
            out["response"].append(response)
            out["persona"].append([p.strip() for p in personality or [] if p.strip()])
    return out


def personachat_pairs(rows: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    """A ``bavard/personachat_truecased``-style split (``personality``, ``history`` partner first, ``candidates``
    with the gold response last) -> examples; ``__ SILENCE __`` turns are dropped, rows left without context skipped."""
    return rows.map(_personachat_batch, batched=True, remove_columns=rows.column_names, features=example_features(),
                    num_proc=num_proc, desc="PersonaChat pairs")


def load_personachat_hub(
    name: str = "bavard/personachat_truecased",
    splits: Sequence[str] = ("train", "validation"),
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """PersonaChat from the Hub through :func:`personachat_pairs` (needs network access)."""
    datasets = _require_datasets("--dataset_name personachat")
    dataset = datasets.load_dataset(name, **load_kwargs)
    return datasets.DatasetDict({split: personachat_pairs(dataset[split], num_proc) for split in splits})


# ---------------------------------------------------------------------------
# JSON Lines (user data)
# ---------------------------------------------------------------------------


TURN_DELIMITER = _EOU


def split_turns(text: str) -> list[str]:
    """A context given as one string: turns separated by ``__eou__`` (DailyDialog / PLATO), else a single turn."""
    return [t.strip() for t in text.split(TURN_DELIMITER)] if TURN_DELIMITER in text else [text]


def parse_record(
    obj: Any, context_column: str = "context", response_column: str = "response", persona_column: str = "persona"
) -> Example:
    """Validate one record (a JSON object or a dataset row) into an example; raise ``ValueError(reason)``.

    ``context_column``: a list of non-empty turns, oldest first, or a string (see :func:`split_turns`);
    ``response_column``: a non-empty string; ``persona_column`` (optional, may be missing or null): a string or a
    list of strings. Strings are stripped; other fields are ignored.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for column in (context_column, response_column):
        if column not in obj:
            raise ValueError(f'missing field "{column}"')

    raw_context = obj[context_column]
    if isinstance(raw_context, str):
        raw_context = split_turns(raw_context)
    elif not isinstance(raw_context, list):
        raise ValueError(f'"{context_column}" must be a string or a list of strings, got {type(raw_context).__name__}')
    context: list[str] = []
    for i, turn in enumerate(raw_context):
        if not isinstance(turn, str):
            raise ValueError(f'"{context_column}" turn {i} must be a string, got {type(turn).__name__}')
        if not turn.strip():
            raise ValueError(f'"{context_column}" turn {i} is empty')
        context.append(turn.strip())
    if not context:
        raise ValueError(f'"{context_column}" is empty')

    response = obj[response_column]
    if not isinstance(response, str):
        raise ValueError(f'"{response_column}" must be a string, got {type(response).__name__}')
    if not response.strip():
        raise ValueError(f'"{response_column}" is empty')

    raw_persona = obj.get(persona_column) if persona_column else None
    if raw_persona is None:
        raw_persona = []
    elif isinstance(raw_persona, str):
        raw_persona = [raw_persona]
    elif not isinstance(raw_persona, list):
        raise ValueError(f'"{persona_column}" must be a string or a list of strings, got {type(raw_persona).__name__}')
    persona: list[str] = []
    for i, sentence in enumerate(raw_persona):
        if not isinstance(sentence, str):
            raise ValueError(f'"{persona_column}" entry {i} must be a string, got {type(sentence).__name__}')
        if sentence.strip():
            persona.append(sentence.strip())

    return {"context": context, "response": response.strip(), "persona": persona}


def load_jsonl(path: PathLike, skip_bad_lines: bool = False, parse=None) -> tuple[list[Example], int]:
    """Load user examples from a JSON Lines file (``.jsonl`` or ``.jsonl.gz``).

    Each non-blank line is an object with ``"context"`` (a list of non-empty turn
    strings, oldest first, or a string: turns separated by ``__eou__``, else one
    turn), ``"response"`` (a non-empty string) and optionally ``"persona"`` (a
    string or a list of strings); see :func:`parse_record`. Other fields are
    ignored; strings are stripped; blank lines are ignored.

    Args:
        path: the file.
        skip_bad_lines: if False (default), the first bad line raises
            :class:`DataFormatError`. If True, bad lines are skipped, each one
            logged as a warning with ``path:lineno``, and counted.
        parse: turns one decoded JSON value into an example, raising ``ValueError`` for a bad one
            (default: the training format above; ``examples/generate.py`` passes one with an optional response).

    Returns:
        ``(examples, n_skipped)``.

    Raises:
        DataFormatError: a bad line (invalid JSON, missing field, wrong type,
            empty context or response, not UTF-8); the message starts with ``path:lineno:``.
            A truncated ``.gz`` file raises it too, even with ``skip_bad_lines``.
    """
    path = Path(path)
    examples: list[Example] = []
    skipped = 0
    for lineno, raw in _read_lines(path):
        if not raw.strip():
            continue
        try:
            line = _decode(raw, lineno)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            example = (parse or parse_record)(obj)
        except ValueError as exc:
            error = DataFormatError(path, lineno, str(exc))
            if not skip_bad_lines:
                raise error from None
            logger.warning("skipping bad line %s", error)
            skipped += 1
            continue
        examples.append(example)
    if skipped:
        logger.warning("%s: skipped %d bad line(s), kept %d example(s)", path, skipped, len(examples))
    return examples, skipped


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def format_context(example: Mapping[str, Any], turn_separator: str) -> str:
    """The source text: persona sentences first, then the context turns, all joined
    with ``turn_separator`` (inserted verbatim, e.g. ``"</s>"``)."""
    persona = list(example.get("persona") or [])
    return turn_separator.join(persona + list(example["context"]))


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("the tokenizer needs a bos_token and an eos_token (e.g. <s> and </s>)")
    return bos, eos


def _check_context(example: Mapping[str, Any]) -> None:
    context = example.get("context")
    if not context or not any(isinstance(t, str) and t.strip() for t in context):
        raise ValueError("the example has an empty context (at least one non-empty turn is needed)")


def _check_lengths(max_source_length: int, max_target_length: int) -> None:
    if max_source_length < 3 or max_target_length < 3:
        raise ValueError(
            "max_source_length and max_target_length must be >= 3 "
            f"(got {max_source_length}, {max_target_length})"
        )


def _wrap_left_truncated(ids: Sequence[int], bos: int, eos: int, max_length: int) -> list[int]:
    """``<s> ids </s>``; if too long, drop tokens from the left of ``ids``."""
    body = list(ids)[-(max_length - 2):] if len(ids) > max_length - 2 else list(ids)
    return [bos, *body, eos]


def _wrap_right_truncated(ids: Sequence[int], bos: int, eos: int, max_length: int) -> list[int]:
    """``<s> ids </s>``; if too long, drop tokens from the right of ``ids``."""
    return [bos, *list(ids)[: max_length - 2], eos]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Mapping[str, Any],
    max_source_length: int = 512,
    max_target_length: int = 128,
    turn_separator: str | None = None,
) -> dict[str, list[int]]:
    """Tokenise one example.

    ``input_ids`` = ``<s> format_context(example) </s>``, truncated from the
    LEFT to ``max_source_length`` (the most recent turns are kept; ``<s>`` stays
    first and ``</s>`` last). ``labels`` = ``<s> response </s>``, truncated from
    the right to ``max_target_length`` (``</s>`` stays last). Special tokens are
    the tokenizer's bos/eos and the turn separator: a special token typed in the
    text ("</s>", "<pad>", ...) is tokenized as its characters
    (``pipeline_dior.tokenize_contexts``). ``labels`` is left out if the example has no
    ``"response"`` (or it is None), e.g. at inference time.

    ``turn_separator`` defaults to the tokenizer's eos token (``</s>``).

    Raises:
        ValueError: empty context, lengths < 3, or no bos/eos in the tokenizer.
    """
    return encode_examples(
        tokenizer,
        [example],
        max_source_length=max_source_length,
        max_target_length=max_target_length,
        turn_separator=turn_separator,
        show_progress=False,
    )[0]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, Any]],
    max_source_length: int = 512,
    max_target_length: int = 128,
    turn_separator: str | None = None,
    desc: str = "Tokenizing",
    batch_size: int = 1000,
    show_progress: bool = True,
) -> list[dict[str, list[int]]]:
    """Tokenise many examples (see :func:`encode_example` for the layout).

    Texts are tokenised in batches with ``add_special_tokens=False`` and the
    specials/truncation are added in Python, so 76k DailyDialog pairs take a
    few seconds with a fast tokenizer. Shows a tqdm bar labelled ``desc``
    unless ``show_progress`` is False.
    """
    _check_lengths(max_source_length, max_target_length)
    bos, eos = _special_ids(tokenizer)
    separator = tokenizer.eos_token if turn_separator is None else turn_separator
    for i, example in enumerate(examples):
        try:
            _check_context(example)
        except ValueError as exc:
            raise ValueError(f"example {i}: {exc}") from None

    from tqdm.auto import tqdm

    encoded: list[dict[str, list[int]]] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress or len(examples) == 0):
        batch = examples[start : start + batch_size]
        # user text is text: special tokens typed in the data are tokenized as characters (tokenize_contexts)
        source_ids = tokenize_contexts(
            tokenizer, [list(ex.get("persona") or []) + list(ex["context"]) for ex in batch], separator
        )
        has_target = [ex.get("response") is not None for ex in batch]
        targets = [ex["response"] for ex, has in zip(batch, has_target) if has]
        target_ids = iter(
            tokenizer(targets, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            if targets else []
        )
        for src, has in zip(source_ids, has_target):
            item = {"input_ids": _wrap_left_truncated(src, bos, eos, max_source_length)}
            if has:
                item["labels"] = _wrap_right_truncated(next(target_ids), bos, eos, max_target_length)
            encoded.append(item)
    return encoded


# ---------------------------------------------------------------------------
# 🤗 datasets: any Hub dataset or local JSON / JSON Lines / CSV file
# ---------------------------------------------------------------------------


def _require_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{what} needs the `datasets` package: pip install 'datasets>=5.2' (or use --dataset_dir / "
                          "a JSON Lines --train_file, which work without it)") from None
    return datasets


def example_features() -> datasets.Features:
    """The columns of an example split: ``context`` (list of turns), ``response``, ``persona`` (list of sentences)."""
    from datasets import Features, Sequence, Value

    return Features({"context": Sequence(Value("string")), "response": Value("string"),
                     "persona": Sequence(Value("string"))})


def _records_batch(batch: dict[str, list], indices: list[int], columns: tuple, where: str) -> dict[str, list]:
    out: dict[str, list] = {"context": [], "response": [], "persona": []}
    for index, values in zip(indices, zip(*batch.values())):
        try:
            example = parse_record(dict(zip(batch, values)), *columns)
        except ValueError as exc:
            raise ValueError(f"{where} row {index}: {exc}") from None
        for key in out:
            out[key].append(example[key])
    return out


def load_dialog_dataset(
    source: str | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    context_column: str = "context",
    response_column: str = "response",
    persona_column: str | None = "persona",
    num_proc: int | None = None,
    **load_kwargs: Any,
) -> datasets.DatasetDict:
    """Examples from any dataset ``datasets.load_dataset`` reads: a Hub id (``source``) or local files
    (``data_files`` = ``{split: path}``, all ``.json``/``.jsonl`` (JSON Lines or a JSON list) or all ``.csv``,
    optionally ``.gz``).

    Every row goes through :func:`parse_record` with the given column names, so the context column may hold a list
    of turns or a string (turns separated by ``__eou__``, else a single turn: the only way to give several turns in
    a CSV cell). The default ``persona_column`` may be absent; a column named otherwise must exist. The result has
    the columns of :func:`example_features`. Raises ``ValueError`` naming the dataset, split and row (and the
    column) for a missing column or a bad row.
    """
    datasets = _require_datasets("loading a Hub dataset or a JSON / CSV file")
    if data_files:
        kinds = {Path(str(f)).name.removesuffix(".gz").rsplit(".", 1)[-1] for f in data_files.values()}
        builders = {"csv": "csv", "json": "json", "jsonl": "json"}
        if len({builders.get(k) for k in kinds}) != 1 or None in {builders.get(k) for k in kinds}:
            raise ValueError(f"data files must all be .json/.jsonl or all .csv (optionally .gz), got {dict(data_files)}")
        raw = datasets.load_dataset(builders[kinds.pop()], data_files={k: str(v) for k, v in data_files.items()},
                                    **load_kwargs)
        names = {split: str(path) for split, path in data_files.items()}
    else:
        raw = datasets.load_dataset(source, **load_kwargs)
        names = {split: f"{source} [{split}]" for split in raw}
    columns = (context_column, response_column, persona_column)
    result = {}
    for split, dataset in raw.items():
        for flag, column in (("--context_column", context_column), ("--response_column", response_column)):
            if column not in dataset.column_names:
                raise ValueError(f"{names[split]}: no column {column!r} (columns: {', '.join(dataset.column_names)}); "
                                 f"name it with {flag}")
        if persona_column and persona_column != "persona" and persona_column not in dataset.column_names:
            raise ValueError(f"{names[split]}: no column {persona_column!r} (--persona_column)")
        result[split] = dataset.map(
            functools.partial(_records_batch, columns=columns, where=names[split]), batched=True, with_indices=True,
            remove_columns=dataset.column_names, features=example_features(), num_proc=num_proc,
            desc=f"Reading {split}")
    return datasets.DatasetDict(result)


def _encode_batch(batch: dict[str, list], **encode_kwargs: Any) -> dict[str, list]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    encoded = encode_examples(examples=rows, show_progress=False, **encode_kwargs)
    return {"input_ids": [e["input_ids"] for e in encoded], "labels": [e["labels"] for e in encoded]}


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int = 512,
    max_target_length: int = 128,
    turn_separator: str | None = None,
    num_proc: int | None = None,
    desc: str = "Tokenizing",
) -> datasets.Dataset:
    """:func:`encode_examples` as a batched ``Dataset.map`` (``input_ids`` + ``labels`` columns; cached by
    ``datasets`` for file-backed datasets, parallel with ``num_proc``). Batch with
    ``transformers.DataCollatorForSeq2Seq(tokenizer)``: it pads ``input_ids``, adds ``attention_mask`` and pads
    ``labels`` with -100; the model builds its decoder inputs from the labels (``<s> r </s>``) itself."""
    _check_lengths(max_source_length, max_target_length)
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, max_source_length=max_source_length,
                               max_target_length=max_target_length, turn_separator=turn_separator)
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc=desc)


class LengthGroupedSampler:
    """Shuffled example indices arranged so that every run of ``batch_size`` consecutive indices holds examples of
    similar length (pass it as ``sampler=`` with the same ``batch_size`` to a ``DataLoader``): less padding.

    As transformers' ``group_by_length``: the shuffled indices are cut into megabatches of ``megabatch_mult *
    batch_size``, each sorted by ``lengths`` (longest first; a length may be a tuple, e.g. (source, target)) and cut
    into batches; the full batches are shuffled, the one with the longest example is put first (an out-of-memory
    shows at once), and a last partial batch stays last. The order depends only on ``seed`` and the epoch given to
    ``set_epoch`` (accelerate's prepared dataloader calls it, also after ``skip_first_batches``), not on any global
    RNG: every DDP rank computes the same order and accelerate's batch sharding gives each rank different batches.
    """

    def __init__(self, lengths: Sequence[Any], batch_size: int, seed: int = 0, megabatch_mult: int = 50) -> None:
        if batch_size < 1 or megabatch_mult < 1:
            raise ValueError("batch_size and megabatch_mult must be positive integers")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.megabatch_mult = batch_size, seed, megabatch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        import random

        rng = random.Random(f"{self.seed}/{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.megabatch_mult * self.batch_size
        batches = []
        for start in range(0, len(order), size):
            mega = sorted(order[start : start + size], key=lambda i: self.lengths[i], reverse=True)
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        partial = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        rng.shuffle(batches)
        if batches:
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches + partial

    def __iter__(self):
        for batch in self.batches():
            yield from batch


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8000, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with BART's special tokens (fully offline).

    Ids ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4 (BartConfig's
    bos/pad/eos defaults); the full 256-byte alphabet is included, so no text is
    ever unknown; a ``RobertaProcessing`` post-processor gives ``<s> x </s>``
    (pairs ``<s> a </s></s> b </s>``). For models trained from scratch.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts_list = texts if isinstance(texts, (list, tuple)) else list(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(BART_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts_list, trainer=trainer, length=len(texts_list))
    for token_id, token in enumerate(BART_SPECIAL_TOKENS):
        if tok.token_to_id(token) != token_id:  # pragma: no cover - guards a tokenizers change
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {token_id}")
    # RobertaProcessing takes positional (sep, cls); the keywords raise TypeError.
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True),
        model_max_length=model_max_length,
    )


def load_bart_tokenizer_files(
    directory: PathLike, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """BART's (= RoBERTa's) fast tokenizer from a folder with ``vocab.json`` and ``merges.txt``.

    Note: with transformers v5, ``BartTokenizerFast(vocab_file=..., merges_file=...)``
    silently ignores both files and builds a 5-token vocabulary, so the files
    are read here and passed as ``vocab=`` / ``merges=``. The result is checked:
    ``"Hello world"`` must encode to ``[0, 31414, 232, 2]``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the files do not give BART's ids.
    """
    from tokenizers import AddedToken
    from transformers import BartTokenizerFast

    directory = Path(directory)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [
            tuple(line.split(" "))
            for line in f.read().split("\n")
            if line and not line.startswith("#version")
        ]
    tokenizer = BartTokenizerFast(
        vocab=vocab,
        merges=merges,
        mask_token=AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True),
        model_max_length=model_max_length,
    )
    ids = tokenizer("Hello world")["input_ids"]
    if list(ids) != [0, 31414, 232, 2]:
        raise ValueError(f"{directory}: 'Hello world' encodes to {ids}, expected BART's [0, 31414, 232, 2]")
    return tokenizer
