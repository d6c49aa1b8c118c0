"""The training order (resumable, length-bucketed, shared by processes, never a batch of
one) and the longest-first evaluation shares."""

import pytest
import torch

from medqa.tokens import PromptFormat
from medqa.tasks.pubmedqa import synthetic_records
from medqa.samplers import LongestFirst, ResumableSampler


def test_training_order_depends_on_seed_and_epoch_alone():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    epoch0 = list(a)
    assert sorted(epoch0) == list(range(50)) and list(b) == epoch0
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(50))
    b.epoch, b.skip = 1, 20  # as a resumed run sets it
    assert list(b) == epoch1[20:]
    assert list(b) == epoch1  # the skip applies once


def test_evaluation_batches_come_longest_first(tokenizer):
    fmt = PromptFormat(tokenizer, "decision", 512)
    examples = [fmt.encode(r) for r in synthetic_records(40, seed=5)]
    order = list(LongestFirst([len(e.input_ids) for e in examples]))
    assert sorted(order) == list(range(40))  # every example once
    lengths = [len(examples[i].input_ids) for i in order]
    assert lengths == sorted(lengths, reverse=True)


def test_bucketed_order_is_a_shuffle_of_length_grouped_batches():
    lengths = [int(x) for x in torch.randint(100, 700, (203,), generator=torch.Generator().manual_seed(0))]
    a = ResumableSampler(203, seed=5, lengths=lengths, batch_size=8, bucket_batches=4)
    b = ResumableSampler(203, seed=5, lengths=lengths, batch_size=8, bucket_batches=4)
    order = list(a)
    assert sorted(order) == list(range(203)) and list(b) == order  # every example once, reproducible
    plain = list(ResumableSampler(203, seed=5))

    def spread(o):  # mean (longest - shortest) within the DataLoader's batches of 8
        batches = [o[i : i + 8] for i in range(0, len(o), 8)]
        return sum(max(lengths[j] for j in bt) - min(lengths[j] for j in bt) for bt in batches) / len(batches)

    assert spread(order) < spread(plain) / 3
    batch_lengths = [max(lengths[j] for j in order[i : i + 8]) for i in range(0, 200, 8)]
    assert batch_lengths != sorted(batch_lengths, reverse=True)  # batches are not served longest first
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != order
    b.epoch, b.skip = 1, 16  # a resumed run continues the same bucketed order
    assert list(b) == epoch1[16:]


@pytest.mark.parametrize("bucket", [0, 4])
def test_training_order_shared_by_processes(bucket):
    """Each step gives each process its batch of one order: together they see every example
    (a few twice, to even out the last step), each the same number of steps."""
    lengths = list(range(100, 201))  # 101 examples
    ranks = [list(ResumableSampler(101, 3, lengths, batch_size=4, bucket_batches=bucket, num_replicas=3, rank=r))
             for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(ResumableSampler(101, 3, num_replicas=3))
    seen = [i for r in ranks for i in r]
    assert set(seen) == set(range(101)) and len(seen) == 102  # one example repeated
    alone = list(ResumableSampler(101, 3, lengths, batch_size=12, bucket_batches=bucket))
    step0 = sorted(ranks[0][:4] + ranks[1][:4] + ranks[2][:4])
    assert step0 == sorted(alone[:12])  # a step of 3 processes takes the next 12 of the one order
    resumed = ResumableSampler(101, 3, lengths, batch_size=4, bucket_batches=bucket, num_replicas=3, rank=1)
    resumed.skip = 2 * 4 * 3  # two steps done, as load_state_dict sets it
    assert list(resumed) == ranks[1][8:]


@pytest.mark.parametrize("size, processes", [(449, 1), (450, 2), (450, 4), (457, 3)])
def test_no_training_batch_holds_one_example(size, processes):
    """PQA-L's 450 training questions in batches of 8 on 2 or 4 GPUs used to end each epoch
    with one question a process; that batch made torch.compile rebuild Unsloth's kernels (one
    19.6 s step on 2 x H200 against 0.38 s). The last step now takes one more example each,
    repeated from the epoch's start; every example is still seen, a resume still continues it."""
    lengths = list(range(size))
    samplers = [ResumableSampler(size, 7, lengths, batch_size=8, bucket_batches=4, num_replicas=processes, rank=r)
                for r in range(processes)]
    for epoch in (0, 1):
        orders = [list(s) for s in samplers]
        batches = [o[i : i + 8] for o in orders for i in range(0, len(o), 8)]
        assert min(len(b) for b in batches) >= 2
        assert all(len(o) == len(s) for o, s in zip(orders, samplers))  # what Lightning counts as the epoch
        seen = [i for o in orders for i in o]
        assert set(seen) == set(range(size)) and len(seen) - size < 2 * processes
        resumed = ResumableSampler(size, 7, lengths, batch_size=8, bucket_batches=4, num_replicas=processes, rank=0)
        resumed.epoch, resumed.skip = epoch, 3 * 8 * processes  # three steps done
        assert list(resumed) == orders[0][24:]
        for s in samplers:
            s.set_epoch(epoch + 1)


def test_evaluation_shares_never_repeat_a_question(tokenizer):
    examples = [PromptFormat(tokenizer, "decision", 512).encode(r) for r in synthetic_records(23, seed=6)]
    lengths = [len(e.input_ids) for e in examples]
    for batch_size in (4, 16):  # enough batches for every process, and fewer batches than processes
        shares = [list(LongestFirst(lengths, batch_size, num_replicas=3, rank=r)) for r in range(3)]
        assert sorted(i for s in shares for i in s) == list(range(23)) and all(shares)


def test_the_sampler_keeps_its_own_position_and_resumes_from_it():
    """The position is the sampler's own state: saved mid-epoch it continues that epoch,
    saved at an epoch's end the next epoch (Lightning calls set_epoch) starts from the top."""
    lengths = list(range(100, 150))
    fresh = ResumableSampler(50, 4, lengths, batch_size=4, bucket_batches=2)
    epoch0 = list(fresh)
    for _ in range(3):
        fresh.took_batch()
    saved = fresh.state_dict()
    assert (saved["epoch"], saved["batches"]) == (0, 3)
    resumed = ResumableSampler(50, 4, lengths, batch_size=4, bucket_batches=2)
    resumed.load_state_dict(saved)
    resumed.set_epoch(0)  # as Lightning does when it resumes into the same epoch
    assert list(resumed) == epoch0[12:]
    fresh.set_epoch(1)
    epoch1 = list(fresh)
    ended = {**saved, "batches": 13}  # every batch of epoch 0 taken
    resumed = ResumableSampler(50, 4, lengths, batch_size=4, bucket_batches=2)
    resumed.load_state_dict(ended)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1 and resumed.taken == 0
    with pytest.raises(ValueError, match="batch_size: checkpoint 4, this run 8"):
        ResumableSampler(50, 4, lengths, batch_size=8, bucket_batches=2).load_state_dict(saved)
