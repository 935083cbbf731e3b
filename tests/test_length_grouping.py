"""`dior_cvae.training.data.LengthGroupedSampler`: deterministic, length-homogeneous batches that accelerate can shard
(DDP) and skip (exact resume)."""

import random

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from torch.utils.data import DataLoader

from transformers import DataCollatorForSeq2Seq

from dior_cvae.training.data import LengthGroupedSampler, train_tokenizer

BATCH = 4


def lengths(n=103, seed=0):
    rng = random.Random(seed)
    return [rng.randint(3, 60) for _ in range(n)]


def padding_waste(batches, lens):
    padded = sum(len(b) * max(lens[i] for i in b) for b in batches)
    return 1 - sum(lens[i] for b in batches for i in b) / padded


def test_order_is_a_seeded_permutation_with_homogeneous_batches():
    lens = lengths()
    sampler = LengthGroupedSampler(lens, BATCH, seed=7, megabatch_mult=5)
    first = list(sampler)
    assert sorted(first) == list(range(len(lens))) and len(sampler) == len(lens)
    assert list(LengthGroupedSampler(lens, BATCH, seed=7, megabatch_mult=5)) == first  # same seed, same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(len(lens)))
    sampler.set_epoch(0)
    assert list(sampler) == first

    batches = sampler.batches()
    assert [len(b) for b in batches] == [BATCH] * (len(lens) // BATCH) + [len(lens) % BATCH]  # partial one last
    assert lens[batches[0][0]] == max(lens)  # the longest batch first
    rng = random.Random(0)
    shuffled = list(range(len(lens)))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i : i + BATCH] for i in range(0, len(shuffled), BATCH)]
    assert padding_waste(batches, lens) < 0.5 * padding_waste(random_batches, lens)


def dataset(lens):
    return [{"input_ids": [0] + [5] * (n - 2) + [2], "labels": [0, 7, 2]} for n in lens]


TOKENIZER = train_tokenizer(["a b c d e f g"] * 20, vocab_size=300)  # pad id 1, as BART's


def loader(lens, seed=3):
    sampler = LengthGroupedSampler(lens, BATCH, seed=seed, megabatch_mult=5)
    collator = DataCollatorForSeq2Seq(TOKENIZER, pad_to_multiple_of=8)
    return DataLoader(dataset(lens), sampler=sampler, batch_size=BATCH, collate_fn=collator)


def rows(batch):
    return batch["attention_mask"].sum(-1).tolist()


@pytest.mark.parametrize("epoch", [0, 2])
def test_accelerate_sharding_and_skipping(epoch):
    lens = list(range(3, 43))  # distinct lengths: a batch is identified by its rows' lengths
    plain = loader(lens)
    plain.sampler.set_epoch(epoch)
    expected = [rows(b) for b in plain]
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in plain)

    # DDP: each rank gets every other batch of the same order
    shards = []
    for rank in (0, 1):
        prepared = prepare_data_loader(loader(lens), num_processes=2, process_index=rank, put_on_device=False,
                                       use_seedable_sampler=True, data_seed=3)
        prepared.set_epoch(epoch)
        shards.append([rows(b) for b in prepared])
    assert shards[0] == expected[0::2] and shards[1] == expected[1::2]

    # exact resume: skip the first batches of the same epoch
    prepared = prepare_data_loader(loader(lens), num_processes=1, process_index=0, put_on_device=False,
                                   use_seedable_sampler=True, data_seed=3)
    prepared.set_epoch(epoch)
    assert [rows(b) for b in prepared] == expected
    prepared.set_epoch(epoch)
    assert [rows(b) for b in skip_first_batches(prepared, 3)] == expected[3:]
    assert torch.is_tensor(next(iter(prepared))["input_ids"])


def test_static_shape_collator_pads_every_batch_to_one_shape():
    """train.py --torch_compile: every batch (S, T) = (24, 16) whatever its lengths, padding masked (pad id, mask 0,
    labels -100), the tokens unchanged; a batch longer than the static length is refused, naming the field."""
    from dior_cvae.training.compiled import StaticShapeCollator

    collator = StaticShapeCollator(DataCollatorForSeq2Seq(TOKENIZER), 24, 16, TOKENIZER.pad_token_id)
    features = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(7, 7 + m))} for n, m in ((3, 2), (9, 11))]
    batch = collator([dict(f) for f in features])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 24) and batch["labels"].shape == (2, 16)
    for row, feature in enumerate(features):
        n, m = len(feature["input_ids"]), len(feature["labels"])
        assert batch["input_ids"][row, :n].tolist() == feature["input_ids"]
        assert (batch["input_ids"][row, n:] == TOKENIZER.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (24 - n)
        assert batch["labels"][row, :m].tolist() == feature["labels"] and (batch["labels"][row, m:] == -100).all()
    with pytest.raises(ValueError, match="labels has 17 tokens, more than the static length 16"):
        collator([{"input_ids": [5, 6], "labels": list(range(7, 24))}])


def test_static_shape_collator_pads_contexts_to_power_of_two_buckets():
    """With min_source_bucket (train.py --torch_compile): contexts go to the next power of two >= the batch's longest,
    at least the minimum and at most source_length; responses stay at target_length."""
    from dior_cvae.training.compiled import StaticShapeCollator

    collator = StaticShapeCollator(DataCollatorForSeq2Seq(TOKENIZER), 40, 16, TOKENIZER.pad_token_id,
                                   min_source_bucket=8)
    for longest, bucket in ((3, 8), (8, 8), (9, 16), (17, 32), (33, 40), (40, 40)):
        features = [{"input_ids": list(range(5, 5 + longest)), "labels": [7, 8]}, {"input_ids": [5], "labels": [7]}]
        batch = collator(features)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, bucket), longest
        assert batch["labels"].shape == (2, 16)
        assert batch["input_ids"][0, :longest].tolist() == features[0]["input_ids"]
        assert batch["attention_mask"].sum().item() == longest + 1
    with pytest.raises(ValueError, match="input_ids has 41 tokens, more than the static length 40"):
        collator([{"input_ids": list(range(5, 46)), "labels": [7]}])
