import random

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from tuneforge.data.sampler import LengthBuckets


def padded_tokens(indices, lengths, size):
    return sum(max(lengths[i] for i in indices[k:k + size]) * len(indices[k:k + size])
               for k in range(0, len(indices), size))


def test_every_row_once_and_batches_cut_from_sorted_rows():
    rng = random.Random(0)
    lengths = [rng.randint(20, 256) for _ in range(240)]
    indices = list(LengthBuckets(lengths, 8, generator=torch.Generator().manual_seed(1)))
    assert sorted(indices) == list(range(240))
    best = padded_tokens(sorted(range(240), key=lengths.__getitem__), lengths, 8)  # the least padding possible
    assert padded_tokens(indices, lengths, 8) == best
    # transformers' sampler on the same rows: groups of a quarter of the data, more padding
    theirs = get_length_grouped_indices(lengths, 8, generator=torch.Generator().manual_seed(1))
    assert padded_tokens(theirs, lengths, 8) > best


def test_longest_batch_first_short_batch_last_and_random_order():
    lengths = list(range(1, 101))  # 100 rows, batch 8: 12 full batches and one of 4
    orders = []
    for seed in range(3):
        sampler = LengthBuckets(lengths, 8, generator=torch.Generator().manual_seed(seed))
        batches = sampler.batches()
        assert [len(b) for b in batches] == [8] * 12 + [4]
        assert 99 in batches[0]  # the longest row (length 100)
        assert max(lengths[i] for i in batches[-1]) == 4  # the four shortest rows
        orders.append([b[0] for b in batches])
    assert len({tuple(o) for o in orders}) == 3  # batches come in a different order for each seed
    again = LengthBuckets(lengths, 8, generator=torch.Generator().manual_seed(2)).batches()
    assert [b[0] for b in again] == orders[2]


def test_groups_bound_how_far_rows_travel():
    lengths = list(range(400))
    sampler = LengthBuckets(lengths, 4, group=10, generator=torch.Generator().manual_seed(0))
    for batch in sampler.batches():
        assert len(batch) == 4
    # a group is 40 random rows: a batch's rows are neighbours in their group's sorted order, not in the data's
    spans = [max(b) - min(b) for b in sampler.batches()]
    assert max(spans) > 4
    assert sorted(sum(sampler.batches(), [])) == list(range(400))


def test_tiny_and_empty_data():
    assert list(LengthBuckets([], 8)) == []
    assert sorted(LengthBuckets([5, 3, 9], 8, generator=torch.Generator().manual_seed(0))) == [0, 1, 2]
