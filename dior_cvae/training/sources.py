"""The data and tokenizer a training run's arguments name: the raw splits of one data source (DailyDialog files,
PersonaChat, a Hub dataset, JSON Lines / JSON / CSV files), the tokenizer (given, of the model, or trained on the
training split), the encoded splits and the training batches."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorForSeq2Seq

from .checkpointing import TrainingError
from .compiled import StaticShapeCollator
from .data import (
    DataFormatError,
    LengthGroupedSampler,
    encode_examples,
    load_bart_tokenizer_files,
    load_dailydialog_dir,
    load_dailydialog_hub,
    load_dialog_dataset,
    load_jsonl,
    load_personachat_hub,
    load_personachat_parlai,
    parse_record,
    tokenize_dataset,
    train_tokenizer,
)

logger = get_logger(__name__)

#: The DailyDialog sample shipped in the repository (data/dailydialog_sample).
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "dailydialog_sample"


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data flags of train.py, read by `load_raw_splits`."""
    data = parser.add_argument_group("data", "One source: --dataset_name, --dataset_dir or --train_file.")
    data.add_argument("--dataset_name", default=None,
                      help="`daily_dialog` (Hub), `personachat` (--personachat_dir or the Hub), or any Hub dataset id "
                           "(read with --context_column/--response_column/--persona_column; needs `datasets`).")
    data.add_argument("--dataset_hub_id", default=None,
                      help="Hub id to load for --dataset_name (default: daily_dialog / bavard/personachat_truecased).")
    data.add_argument("--dataset_revision", default=None,
                      help="Hub revision for --dataset_name (e.g. refs/convert/parquet for script-based datasets, "
                           "which datasets>=4 no longer runs).")
    data.add_argument("--dataset_dir", default=None, help="Folder with DailyDialog {train,validation,test} files.")
    data.add_argument("--clean_split", default=None, metavar="DAILYDIALOG_PP_DIR",
                      help="With --dataset_dir: train without every training dialogue that contains or "
                           "near-duplicates a DailyDialog validation/test dialogue or the source dialogue of a "
                           "DailyDialog++ dev/test context (this folder's {dev,test}.json[.gz]); see "
                           "dior_cvae/training/clean_split.py. Cached in $DIOR_CVAE_CACHE (default ~/.cache/dior_cvae).")
    data.add_argument("--personachat_dir", default=None,
                      help="Folder with ParlAI PersonaChat files {train,valid,test}_<variant>.txt[.gz].")
    data.add_argument("--personachat_variant", default="self_original", help="ParlAI file variant (self_original, ...).")
    data.add_argument("--train_file", default=None,
                      help="Training file: .jsonl[.gz] (read line by line, errors name file:line) or .json/.csv[.gz] "
                           "(read with `datasets`).")
    data.add_argument("--validation_file", default=None,
                      help="Validation file (same formats as --train_file); with --dataset_dir, JSON Lines that "
                           "replace the folder's validation split (e.g. DailyDialog++ dev for checkpoint selection).")
    data.add_argument("--test_file", default=None, help="Test file (same formats as --train_file).")
    data.add_argument("--context_column", default="context",
                      help="Column with the context: a list of turns (oldest first) or a string, whose turns are "
                           "separated by `__eou__` (no `__eou__`: one turn).")
    data.add_argument("--response_column", default="response", help="Column with the response (a string).")
    data.add_argument("--persona_column", default="persona",
                      help="Optional column with persona sentences (a string or a list), put before the context.")
    data.add_argument("--num_proc", type=int, default=None, help="Processes for `datasets` map (reading, tokenizing).")
    data.add_argument("--skip_bad_lines", action="store_true", help="Skip (and count) malformed JSON Lines lines.")
    data.add_argument("--max_source_length", type=int, default=256, help="Context tokens (truncated from the left).")
    data.add_argument("--max_target_length", type=int, default=64, help="Response tokens (truncated from the right).")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None, help="Cap on validation and test examples.")
    data.add_argument("--turn_separator", default=None, help="String between context turns (default: tokenizer eos).")


def data_argument_rules(install_hint: str) -> list:
    """Checks of the data flags across each other, for train.py's table: each returns what is wrong, or None."""
    files = ("train_file", "validation_file", "test_file")
    return [
        lambda a: [a.dataset_name, a.dataset_dir, a.train_file].count(None) != 2 and
        "give exactly one data source: --dataset_name, --dataset_dir or --train_file",
        lambda a: a.clean_split and not a.dataset_dir and
        "--clean_split needs --dataset_dir (the ijcnlp DailyDialog folder)",
        lambda a: a.personachat_dir and a.dataset_name != "personachat" and
        "--personachat_dir needs --dataset_name personachat",
        *(lambda a, flag=flag: (value := getattr(a, flag)) and not Path(value).expanduser().exists() and
          f"--{flag}: no such folder: {value}" for flag in ("dataset_dir", "personachat_dir", "clean_split")),
        *(lambda a, flag=flag: (value := getattr(a, flag)) and not Path(value).is_file() and
          f"--{flag}: no such file: {value}" for flag in files),
        lambda a: importlib.util.find_spec("datasets") is None and (a.dataset_name or any(
            (f := getattr(a, flag)) and not str(f).removesuffix(".gz").endswith(".jsonl") for flag in files)) and
        f"--dataset_name and JSON / CSV files are read with the `datasets` library: {install_hint}",
    ]


def load_raw_splits(args) -> tuple[dict[str, list[dict]], str, dict]:
    """{split: examples} of the source `args` (`add_data_arguments`) name, a description of the data, and metadata
    for the model card."""
    splits: dict = {}  # split -> list of examples, or a datasets.Dataset
    meta = {"hub_dataset": None, "skipped_lines": 0}
    columns = dict(context_column=args.context_column, response_column=args.response_column,
                   persona_column=args.persona_column)
    files = {split: path for split, path in (("train", args.train_file), ("validation", args.validation_file),
                                             ("test", args.test_file)) if path}
    hub_kwargs = {"revision": args.dataset_revision} if args.dataset_revision else {}
    if args.dataset_dir:
        exclude = None
        if args.clean_split:
            from .clean_split import build_clean_split

            clean = build_clean_split(args.dataset_dir, args.clean_split)
            exclude = {"train": clean.removed_train_dialogue_ids}
            report = clean.report
            logger.info(f"--clean_split: removed {report['removed_dialogues']} of {report['train_dialogues']} training "
                        f"dialogues ({report['removed_pairs']} of {report['train_pairs']} pairs): "
                        f"{report['removed_by_primary_reason']}", main_process_only=True)
            meta["clean_split"] = {k: report[k] for k in ("threshold", "removed_dialogues", "removed_pairs",
                                                          "kept_dialogues", "kept_pairs")}
        for split in ("train", "validation", "test"):
            try:
                splits.update(load_dailydialog_dir(args.dataset_dir, [split], exclude_dialogues=exclude))
            except FileNotFoundError:
                if split == "train":
                    raise
        sample = Path(args.dataset_dir).resolve() == SAMPLE_DIR.resolve()
        description = ("The shipped DailyDialog sample (the first 1,000 / 100 / 100 dialogues of each split)" if sample
                       else f"DailyDialog (ijcnlp files, {args.dataset_dir})")
        if args.clean_split:
            description += (f", training split without the {meta['clean_split']['removed_dialogues']} dialogues "
                            "that overlap DailyDialog validation/test or DailyDialog++ dev/test (--clean_split)")
        meta.update(hub_dataset="li2017dailydialog/daily_dialog", dataset_name="DailyDialog" + (" (sample)" if sample else ""))
        parse = functools.partial(parse_record, **columns)
        for split, path in files.items():  # --validation_file / --test_file (JSON Lines) replace the folder's split
            splits[split], skipped = load_jsonl(path, skip_bad_lines=args.skip_bad_lines, parse=parse)
            if not splits[split]:
                raise ValueError(f"--{split}_file {path}: no examples in the file")
            meta["skipped_lines"] += skipped
            description += f"; {split}: {path}"
    elif args.dataset_name == "daily_dialog":
        splits = load_dailydialog_hub(args.dataset_hub_id or "daily_dialog", num_proc=args.num_proc, **hub_kwargs)
        description = f"DailyDialog from the Hub ({args.dataset_hub_id or 'daily_dialog'})"
        meta.update(hub_dataset="li2017dailydialog/daily_dialog", dataset_name="DailyDialog")
    elif args.dataset_name == "personachat" and args.personachat_dir:
        folder = Path(args.personachat_dir)
        for split, stem in (("train", "train"), ("validation", "valid"), ("test", "test")):
            candidates = [folder / f"{stem}_{args.personachat_variant}.txt{gz}" for gz in ("", ".gz")]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None and split == "train":
                raise FileNotFoundError(f"PersonaChat training file not found: {candidates[0]}[.gz]")
            if found is not None:
                splits[split] = load_personachat_parlai(found)
        description = f"PersonaChat (ParlAI {args.personachat_variant} files, {args.personachat_dir})"
        meta.update(hub_dataset="bavard/personachat_truecased", dataset_name="PersonaChat")
    elif args.dataset_name == "personachat":
        hub_id = args.dataset_hub_id or "bavard/personachat_truecased"
        splits = load_personachat_hub(hub_id, num_proc=args.num_proc, **hub_kwargs)
        description = f"PersonaChat from the Hub ({hub_id})"
        meta.update(hub_dataset=hub_id, dataset_name="PersonaChat")
    elif args.dataset_name:
        splits = load_dialog_dataset(args.dataset_name, num_proc=args.num_proc, **columns, **hub_kwargs)
        description = f"{args.dataset_name} from the Hub"
        meta.update(hub_dataset=args.dataset_name, dataset_name=args.dataset_name)
    elif not all(str(p).removesuffix(".gz").endswith(".jsonl") for p in files.values()):
        try:
            splits = load_dialog_dataset(data_files=files, num_proc=args.num_proc, **columns)
        except ValueError as exc:  # `datasets` on an empty file: 'Instruction "validation" corresponds to no data!'
            empty = re.search(r'Instruction "(\w+)" corresponds to no data', str(exc))
            if empty is None:
                raise
            raise ValueError(f"--{empty[1]}_file {files[empty[1]]}: no examples in the file") from None
        description = "Data files: " + ", ".join(map(str, files.values()))
        meta.update(dataset_name=Path(args.train_file).name.split(".")[0])
    else:
        parse = functools.partial(parse_record, **columns)
        for split, path in files.items():
            if path:
                splits[split], skipped = load_jsonl(path, skip_bad_lines=args.skip_bad_lines, parse=parse)
                if not splits[split]:
                    raise ValueError(f"--{split}_file {path}: no examples in the file")
                if skipped:
                    logger.warning(f"{path}: skipped {skipped} bad line(s) (--skip_bad_lines)", main_process_only=True)
                meta["skipped_lines"] += skipped
        description = "JSON Lines files: " + ", ".join(p for p in (args.train_file, args.validation_file, args.test_file) if p)
        meta.update(dataset_name=Path(args.train_file).stem)
    if args.max_train_samples is not None:
        splits["train"] = head(splits["train"], args.max_train_samples)
    if args.max_eval_samples is not None:
        for split in ("validation", "test"):
            if split in splits:
                splits[split] = head(splits[split], args.max_eval_samples)
    if not splits.get("train"):
        raise ValueError("the training split is empty")
    for split in ("validation", "test"):  # a split that was given (or found) but is empty is an error, not dropped
        if split in splits and not splits[split]:
            raise ValueError(f"the {split} split of {description} has no examples (an empty file?)")
    return {k: v for k, v in splits.items() if v and k in ("train", "validation", "test")}, description, meta


def read_data(args) -> tuple[dict[str, list[dict]], str, dict]:
    """`load_raw_splits`, its errors (a bad line, a missing column or file) as a `TrainingError` naming them."""
    try:
        return load_raw_splits(args)
    except DataFormatError as exc:
        hint = "" if "gzip" in exc.reason else " (use --skip_bad_lines to skip such lines)"
        raise TrainingError(f"bad data line: {exc}{hint}") from None
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise TrainingError(str(exc)) from None


def head(examples, n: int):
    """The first n examples of a list or a datasets.Dataset."""
    return examples.select(range(min(n, len(examples)))) if hasattr(examples, "select") else examples[:n]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer folder / hub id, or a folder holding only BART's vocab.json + merges.txt. Code that ships with
    the tokenizer runs only with `trust_remote_code` (--trust_remote_code)."""
    folder = Path(name_or_path)
    has_hf_files = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    if folder.is_dir() and not has_hf_files and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return load_bart_tokenizer_files(folder)
    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def get_tokenizer(args, accelerator, train_examples, resume_dir: Path | None):
    if resume_dir is not None and (resume_dir / "pretrained" / "tokenizer_config.json").is_file():
        # the exact tokenizer the checkpoint was trained with
        return load_tokenizer(str(resume_dir / "pretrained"), args.trust_remote_code)
    if args.tokenizer_name or (args.model_name_or_path and not args.train_tokenizer_vocab_size):
        return load_tokenizer(args.tokenizer_name or args.model_name_or_path, args.trust_remote_code)
    # Train one on the training split: the main process trains and saves it, the others load that copy.
    tokenizer_dir = Path(args.output_dir) / ".dior-tokenizer.tmp"  # claimed by prepare_output_dir
    if accelerator.is_main_process:
        texts = list(dict.fromkeys(t for ex in train_examples for t in (*ex.get("persona", []), *ex["context"], ex["response"])))
        tokenizer = train_tokenizer(texts, args.train_tokenizer_vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
        logger.info(f"Trained a {len(tokenizer)}-token byte-level BPE on {len(texts)} training turns")
    accelerator.wait_for_everyone()
    tokenizer = load_tokenizer(str(tokenizer_dir))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # saved with the model; this copy only served the other processes
        shutil.rmtree(tokenizer_dir)
    return tokenizer



def encode_splits(raw: dict, tokenizer, accelerator, max_source_length: int, max_target_length: int,
                  turn_separator: str, num_proc: int | None = None) -> dict:
    """{split: encoded examples}: a `datasets.Dataset` through its batched, cached map (the main process first),
    a list of examples in this process."""
    encoded = {}
    for split, examples in raw.items():
        logger.info(f"  {split}: Num examples = {len(examples)}")
        if hasattr(examples, "map"):
            with accelerator.main_process_first():
                encoded[split] = tokenize_dataset(examples, tokenizer, max_source_length, max_target_length,
                                                  turn_separator, num_proc=num_proc, desc=f"Tokenizing {split}")
        else:
            encoded[split] = encode_examples(tokenizer, examples, max_source_length, max_target_length,
                                             turn_separator, desc=f"Tokenizing {split}",
                                             show_progress=accelerator.is_local_main_process)
    return encoded


def train_dataloader(encoded_train, collator, batch_size: int, *, group_by_length: bool, pad_multiple: int | None,
                     seed: int, num_workers: int, pin_memory: bool, static_shapes: dict | None = None) -> DataLoader:
    """The training batches: length-grouped (by source bucket and target length: less padding) or shuffled, seeded.
    The generator keeps the loader's worker seed off the global RNG (exact resume); batches are deterministic
    functions of the sampler's indices, which the main process draws, so exact resume does not depend on workers.
    `static_shapes` (`StaticShapeCollator`'s arguments, for a compiled step): a few padded shapes, and the last
    partial batch of each epoch dropped."""
    sampler = None
    if group_by_length:
        lengths = [(-(-len(e["input_ids"]) // (pad_multiple or 1)), len(e["labels"])) for e in encoded_train]
        sampler = LengthGroupedSampler(lengths, batch_size, seed=seed)
    if static_shapes is not None:
        collator = StaticShapeCollator(collator, **static_shapes)
    return DataLoader(encoded_train, shuffle=sampler is None, sampler=sampler, collate_fn=collator,
                      batch_size=batch_size, drop_last=static_shapes is not None,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=pin_memory)


def fit_tokenizer_and_collator(tokenizer, model, max_source_length: int, max_target_length: int,
                               pad_to_multiple_of: int | None) -> tuple[DataCollatorForSeq2Seq, int | None]:
    """Set the tokenizer's truncation (from the left: the latest turns) and maximum length to the model's (saved with
    it, so that `tokenizer(context, truncation=True)` fits the model); return the batches' collator (labels padded
    with -100) and the multiple it pads to (None where a rounded length would not fit the position embeddings)."""
    tokenizer.truncation_side = tokenizer.init_kwargs["truncation_side"] = "left"
    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = min(
        tokenizer.model_max_length, model.config.max_position_embeddings)
    multiple = pad_to_multiple_of or None
    if multiple and -(-max(max_source_length, max_target_length) // multiple) * multiple > \
            model.config.max_position_embeddings:
        multiple = None
    return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=multiple), multiple
