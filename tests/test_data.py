"""Tests for dior_cvae.training.data (loaders, encoding, collator, tokenizers).

Tests that need the real data (DailyDialog ijcnlp release, PLATO pair files,
BART tokenizer files) look for it in ``$DIOR_SHARED_DATA`` or in
``<repo>/../shared/data`` and are skipped with a reason if it is absent.
"""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dior_cvae.training.data import (
    dailydialog_pairs,
    load_dialog_dataset,
    personachat_pairs,
    tokenize_dataset,
    DataFormatError,
    encode_example,
    encode_examples,
    format_context,
    load_bart_tokenizer_files,
    load_dailydialog_dir,
    load_jsonl,
    load_personachat_parlai,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SAMPLE_DIR = REPO / "data" / "dailydialog_sample"
SHARED_DATA = Path(os.environ.get("DIOR_SHARED_DATA") or (REPO.parent / "shared" / "data"))
IJCNLP_DIR = SHARED_DATA / "dailydialog" / "ijcnlp"
PLATO_DIR = SHARED_DATA / "dailydialog" / "plato"
BART_DIR = SHARED_DATA / "tokenizer" / "bart-base"

needs_dailydialog = pytest.mark.skipif(
    not (IJCNLP_DIR / "dialogues_train.txt.gz").is_file(),
    reason=f"real DailyDialog data not found at {IJCNLP_DIR} (set DIOR_SHARED_DATA to the shared/data folder)",
)
needs_bart = pytest.mark.skipif(
    not (BART_DIR / "vocab.json").is_file(),
    reason=f"BART tokenizer files not found at {BART_DIR} (set DIOR_SHARED_DATA to the shared/data folder)",
)


def plato_line(example: dict) -> str:
    return " __eou__ ".join(example["context"]) + "\t" + example["response"]


# ---------------------------------------------------------------------------
# DailyDialog
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_dailydialog() -> dict:
    return load_dailydialog_dir(IJCNLP_DIR)


@needs_dailydialog
def test_real_dailydialog_pair_counts(real_dailydialog):
    assert {k: len(v) for k, v in real_dailydialog.items()} == {"train": 76053, "validation": 7069, "test": 6740}
    first = real_dailydialog["train"][0]
    assert first["persona"] == [] and len(first["context"]) == 1


@needs_dailydialog
@pytest.mark.parametrize("split,plato_file", [("validation", "dial.valid.gz"), ("test", "dial.test.gz")])
def test_real_dailydialog_matches_plato_byte_for_byte(real_dailydialog, split, plato_file):
    with gzip.open(PLATO_DIR / plato_file, "rt", encoding="utf-8", newline="\n") as f:
        expected = f.read()
    produced = "".join(plato_line(ex) + "\n" for ex in real_dailydialog[split])
    assert produced == expected


def test_dailydialog_rule_and_naming(tmp_path):
    # "{split}.txt" naming (plain text) with the PLATO normalisation.
    (tmp_path / "train.txt").write_text(
        "Hi , it\u2019s me . __eou__ Oh , hello ! __eou__ Bye . __eou__\n"
        "Single utterance . __eou__\n",
        encoding="utf-8",
    )
    out = load_dailydialog_dir(tmp_path, splits=("train",))
    assert out["train"] == [
        {"context": ["Hi , it's me ."], "response": "Oh , hello !", "persona": []},
        {"context": ["Hi , it's me .", "Oh , hello !"], "response": "Bye .", "persona": []},
    ]


def test_dailydialog_missing_split_names_path(tmp_path):
    with gzip.open(tmp_path / "train.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a __eou__ b __eou__\n")
    with pytest.raises(FileNotFoundError) as info:
        load_dailydialog_dir(tmp_path)
    assert str(tmp_path / "validation.txt.gz") in str(info.value)


def test_shipped_sample_counts():
    out = load_dailydialog_dir(SAMPLE_DIR)
    assert {k: len(v) for k, v in out.items()} == {"train": 6379, "validation": 772, "test": 706}
    assert not list(SAMPLE_DIR.glob("dialogues_*"))


@needs_dailydialog
def test_shipped_sample_is_prefix_of_real_data_and_reproducible(tmp_path):
    out = load_dailydialog_dir(SAMPLE_DIR, splits=("validation",))
    with gzip.open(PLATO_DIR / "dial.valid.gz", "rt", encoding="utf-8", newline="\n") as f:
        plato = f.read().split("\n")
    assert [plato_line(ex) for ex in out["validation"]] == plato[: len(out["validation"])]
    subprocess.run(
        [sys.executable, str(SAMPLE_DIR / "make_sample.py"), "--source", str(IJCNLP_DIR), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in ("train", "validation", "test"):
        name = f"{split}.txt.gz"
        assert (tmp_path / name).read_bytes() == (SAMPLE_DIR / name).read_bytes(), name


# ---------------------------------------------------------------------------
# PersonaChat
# ---------------------------------------------------------------------------

PERSONA_1 = ["i like cats.", "i work as a baker.", "my favorite color is green."]
PERSONA_2 = ["i play the guitar.", "i have never left my hometown."]


def test_personachat_fixture_parsing():
    examples = load_personachat_parlai(FIXTURES / "personachat_sample.txt")
    assert examples == [
        {
            "context": ["hi , how are you today ?"],
            "response": "i am great , just finished baking bread .",
            "persona": PERSONA_1,
        },
        {
            "context": [
                "hi , how are you today ?",
                "i am great , just finished baking bread .",
                "that smells nice . what kind of bread ?",
            ],
            "response": "sourdough . do you have pets ?",
            "persona": PERSONA_1,
        },
        {
            "context": [
                "hi , how are you today ?",
                "i am great , just finished baking bread .",
                "that smells nice . what kind of bread ?",
                "sourdough . do you have pets ?",
                "yes , a dog named max .",
            ],
            "response": "i have two cats myself .",
            "persona": PERSONA_1,
        },
        {"context": ["hello there !"], "response": "hey ! i was just practicing guitar .", "persona": PERSONA_2},
        {
            "context": ["hello there !", "hey ! i was just practicing guitar .", "cool , what songs do you play ?"],
            "response": "mostly old folk songs from my hometown .",
            "persona": PERSONA_2,
        },
    ]


def test_personachat_gzip_and_malformed(tmp_path):
    text = (FIXTURES / "personachat_sample.txt").read_text(encoding="utf-8")
    with gzip.open(tmp_path / "pc.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    assert len(load_personachat_parlai(tmp_path / "pc.txt.gz")) == 5

    bad = tmp_path / "bad.txt"
    bad.write_text("1 your persona: i like cats.\n2 hello there with no tab\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad.name}:2:"):
        load_personachat_parlai(bad)
    bad.write_text("1 your persona: i like cats.\n3 hi\tho\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad.name}:2:"):
        load_personachat_parlai(bad)
    bad.write_text("your persona: i like cats.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{bad.name}:1:"):
        load_personachat_parlai(bad)


# ---------------------------------------------------------------------------
# JSON Lines
# ---------------------------------------------------------------------------

BAD_JSONL = FIXTURES / "bad_lines.jsonl"


def test_jsonl_raises_with_path_and_line():
    with pytest.raises(DataFormatError) as info:
        load_jsonl(BAD_JSONL)
    message = str(info.value)
    assert message.startswith(f"{BAD_JSONL}:4:")
    assert "invalid JSON" in message
    assert isinstance(info.value, ValueError) and info.value.lineno == 4


@pytest.mark.parametrize(
    "line,reason",
    [
        ('{"context": ["no response here"]}', 'missing field "response"'),
        ('{"response": "x"}', 'missing field "context"'),
        ('{"context": ["ok"], "response": "  "}', '"response" is empty'),
        ('{"context": [], "response": "hello"}', '"context" is empty'),
        ('{"context": ["ok", 3], "response": "hello"}', "must be a string"),
        ('{"context": "a", "response": 5}', "must be a string"),
        ('{"context": "a", "response": "b", "persona": 7}', '"persona" must be'),
    ],
)
def test_jsonl_error_reasons(tmp_path, line, reason):
    path = tmp_path / "data.jsonl"
    path.write_text('{"context": "a", "response": "b"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)


def test_jsonl_skip_bad_lines_counts_and_logs(caplog):
    with caplog.at_level(logging.WARNING, logger="dior_cvae.training.data"):
        examples, skipped = load_jsonl(BAD_JSONL, skip_bad_lines=True)
    assert skipped == 6
    assert examples == [
        {"context": ["hi there", "hello , how are you ?"], "response": "fine , thanks .", "persona": ["i like tea."]},
        {"context": ["what time is it ?"], "response": "it is noon .", "persona": []},
        {"context": ["where do you live ?"], "response": "in paris .", "persona": ["i live in paris."]},
    ]
    logged = caplog.text
    for lineno in (4, 5, 6, 7, 8, 10):
        assert f"{BAD_JSONL}:{lineno}:" in logged
    assert f"{BAD_JSONL}:3:" not in logged  # blank line: ignored, not an error


# ---------------------------------------------------------------------------
# Tokenizers and encoding
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer():
    texts = [" ".join(ex["context"] + [ex["response"]]) for ex in load_dailydialog_dir(SAMPLE_DIR)["validation"]]
    return train_tokenizer(texts, vocab_size=600)


def test_train_tokenizer_specials_and_round_trip(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, 4]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(tok) <= 600 and tok.model_max_length == 1024
    text = "Hello , how are you doing today ? Über-naïve 123 \u2019quotes\u2019 !"
    ids = tok(text)["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids  # byte-level: never <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("a", "b")["input_ids"] == [0, *tok("a", add_special_tokens=False)["input_ids"], 2, 2,
                                          *tok("b", add_special_tokens=False)["input_ids"], 2]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids and reloaded.pad_token_id == 1


@needs_bart
def test_bart_tokenizer_files():
    tok = load_bart_tokenizer_files(BART_DIR)
    assert tok("Hello world")["input_ids"] == [0, 31414, 232, 2]
    assert len(tok) == 50265 and tok.model_max_length == 1024
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 50264)
    assert tok("Hello <mask> world")["input_ids"] == [0, 31414, 50264, 232, 2]  # <mask> has lstrip=True


def test_load_bart_tokenizer_files_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_bart_tokenizer_files(tmp_path)


def test_format_context():
    ex = {"context": ["hi .", "hello !"], "response": "x", "persona": ["i like cats."]}
    assert format_context(ex, "</s>") == "i like cats.</s>hi .</s>hello !"
    assert format_context({"context": ["a", "b"], "response": "c"}, " | ") == "a | b"


def test_encode_example_layout(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = {"context": ["good morning .", "hi !"], "response": "how are you ?", "persona": []}
    enc = encode_example(tok, ex, max_source_length=64, max_target_length=64)
    body = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc["input_ids"] == [0, *body("good morning ."), 2, *body("hi !"), 2]  # default separator </s>
    assert enc["labels"] == [0, *body("how are you ?"), 2]
    custom = encode_example(tok, ex, 64, 64, turn_separator=" | ")
    assert custom["input_ids"] == [0, *body("good morning . | hi !"), 2]
    no_target = encode_example(tok, {"context": ["hi"]}, 64, 64)
    assert set(no_target) == {"input_ids"}


def test_encode_example_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    turns = [f"turn number {i} says something rather long ." for i in range(30)]
    ex = {"context": turns, "response": " ".join(turns), "persona": ["i like cats."]}
    full = encode_example(tok, ex, 10_000, 10_000)
    enc = encode_example(tok, ex, max_source_length=32, max_target_length=16)
    assert len(enc["input_ids"]) == 32 and len(enc["labels"]) == 16
    # source: <s> + the LAST 30 tokens of the context + </s>
    assert enc["input_ids"][0] == 0 and enc["input_ids"][-1] == 2
    assert enc["input_ids"][1:-1] == full["input_ids"][-31:-1]
    assert tok.decode(enc["input_ids"][1:-1]).endswith("turn number 29 says something rather long .")
    # target: <s> + the FIRST 14 tokens of the response + </s>
    assert enc["labels"] == full["labels"][:15] + [2]
    # short sequences are untouched
    short = encode_example(tok, {"context": ["hi"], "response": "yo"}, 32, 16)
    assert short["input_ids"] == [0, *tok("hi", add_special_tokens=False)["input_ids"], 2]


def test_encode_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty context"):
        encode_example(tiny_tokenizer, {"context": [], "response": "x"}, 32, 16)
    with pytest.raises(ValueError, match="empty context"):
        encode_example(tiny_tokenizer, {"context": ["  "], "response": "x"}, 32, 16)
    with pytest.raises(ValueError, match=">= 3"):
        encode_example(tiny_tokenizer, {"context": ["a"], "response": "x"}, 2, 16)


def test_encode_examples_batch_matches_single(tiny_tokenizer):
    examples = load_dailydialog_dir(SAMPLE_DIR, splits=("test",))["test"]
    batched = encode_examples(tiny_tokenizer, examples, 64, 32, desc="test", batch_size=97, show_progress=False)
    assert len(batched) == len(examples) == 706
    for i in (0, 1, 350, 705):
        assert batched[i] == encode_example(tiny_tokenizer, examples[i], 64, 32)
    assert max(len(e["input_ids"]) for e in batched) == 64


# ---------------------------------------------------------------------------
# Batching (transformers' DataCollatorForSeq2Seq) and 🤗 datasets
# ---------------------------------------------------------------------------


def test_seq2seq_collator_gives_what_the_model_needs(tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    features = [{"input_ids": [0, 5, 6, 2], "labels": [0, 7, 2]}, {"input_ids": [0, 9, 2], "labels": [0, 8, 8, 8, 2]}]
    batch = DataCollatorForSeq2Seq(tiny_tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # no decoder_input_ids: the model shifts labels
    assert all(t.dtype == torch.long for t in batch.values())
    pad = tiny_tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[0, 5, 6, 2], [0, 9, 2, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[0, 7, 2, -100, -100], [0, 8, 8, 8, 2]]
    no_labels = DataCollatorForSeq2Seq(tiny_tokenizer)([{"input_ids": [0, 2]}, {"input_ids": [0, 4, 2]}])
    assert no_labels["labels"] is None and no_labels["input_ids"].shape == (2, 3)  # what generation batches look like


def test_load_dialog_dataset_csv_and_json_with_custom_columns(tmp_path, tiny_tokenizer):
    (tmp_path / "t.csv").write_text('history,reply,who\n"Hi . __eou__ Hello !",How are you ?,\nFine,Good .,I like tea\n')
    splits = load_dialog_dataset(data_files={"train": tmp_path / "t.csv"}, context_column="history",
                                 response_column="reply", persona_column="who")
    assert splits["train"][:] == {"context": [["Hi .", "Hello !"], ["Fine"]], "response": ["How are you ?", "Good ."],
                                  "persona": [[], ["I like tea"]]}
    (tmp_path / "v.json").write_text('[{"c": ["a", "b"], "r": "c"}, {"c": "d", "r": "e"}]')
    (tmp_path / "w.jsonl").write_text('{"c": ["a"], "r": "x"}\n')
    json_splits = load_dialog_dataset(data_files={"validation": tmp_path / "v.json", "test": tmp_path / "w.jsonl"},
                                      context_column="c", response_column="r")
    assert json_splits["validation"]["context"] == [["a", "b"], ["d"]] and json_splits["test"]["response"] == ["x"]

    encoded = tokenize_dataset(splits["train"], tiny_tokenizer, 64, 16)
    assert encoded.column_names == ["input_ids", "labels"]
    assert encoded[1] == encode_example(tiny_tokenizer, splits["train"][1], 64, 16)

    with pytest.raises(ValueError, match=r"t\.csv: no column 'context' .*--context_column"):
        load_dialog_dataset(data_files={"train": tmp_path / "t.csv"}, response_column="reply")
    with pytest.raises(ValueError, match=r't\.csv row 0: "who" must be a string'):
        load_dialog_dataset(data_files={"train": tmp_path / "t.csv"}, context_column="history",
                            response_column="who", persona_column=None)
    with pytest.raises(ValueError, match="all be .json/.jsonl or all .csv"):
        load_dialog_dataset(data_files={"train": tmp_path / "t.csv", "validation": tmp_path / "v.json"})


def test_hub_style_dailydialog_and_personachat_rows():
    from datasets import Dataset

    dialogs = Dataset.from_dict({"dialog": [["Hi \u2019 there ", "Hello .", ""], ["Alone ."]], "act": [[1, 2, 0], [1]]})
    assert dailydialog_pairs(dialogs)[:] == {"context": [["Hi ' there"]], "response": ["Hello ."], "persona": [[]]}
    rows = Dataset.from_dict({"personality": [["i like tea ."], []], "history": [["__ SILENCE __", "hi !"], ["__ SILENCE __"]],
                              "candidates": [["no", "hello !"], ["x", "y"]]})
    assert personachat_pairs(rows)[:] == {"context": [["hi !"]], "response": ["hello !"], "persona": [["i like tea ."]]}
