"""The schedule and the routing: pure functions, checked against literal tables."""

from __future__ import annotations

import pytest
import torch

from dni.data import ArrayDataset
from dni.schedule import EpochBatches, Schedule
from workers.topology import Topology


def test_topology_ranks_and_routing_table() -> None:
    t = Topology((2, 1, 3))
    assert t.world_size == 6 and t.num_stages == 3
    assert [t.rank(0, 0), t.rank(0, 1), t.rank(1, 0), t.rank(2, 0), t.rank(2, 1), t.rank(2, 2)] == [0, 1, 2, 3, 4, 5]
    assert [t.place(r) for r in range(6)] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    # step -> rank on each stage
    table = {g: tuple(t.rank_for(s, g) for s in range(3)) for g in range(6)}
    assert table == {0: (0, 2, 3), 1: (1, 2, 4), 2: (0, 2, 5), 3: (1, 2, 3), 4: (0, 2, 4), 5: (1, 2, 5)}
    assert t.group(2) == [3, 4, 5]
    with pytest.raises(ValueError, match="stage 1 has 1 replicas"):
        t.rank(1, 1)


def test_schedule_boundaries_table() -> None:
    s = Schedule(total_steps=10, steps_per_epoch=4, true_every=3, replica_every=5, checkpoint_every=4,
                 eval_every_epochs=1, eval_every_steps=0)
    rows = [(g, s.is_true_round(g), s.syncs_replicas_after(g), s.evaluates_after(g), s.checkpoints_after(g))
            for g in range(10)]
    assert rows == [
        (0, False, False, False, False),
        (1, False, False, False, False),
        (2, True, False, False, False),
        (3, False, False, True, True),
        (4, False, True, False, False),
        (5, True, False, False, False),
        (6, False, False, False, False),
        (7, False, False, True, True),
        (8, True, False, False, False),
        (9, False, True, True, True),  # the last step always evaluates and checkpoints
    ]
    fine = Schedule(total_steps=10, steps_per_epoch=4, eval_every_steps=3)
    assert [g for g in range(10) if fine.evaluates_after(g)] == [2, 3, 5, 7, 8, 9]


def test_epoch_batches_are_a_fixed_permutation_per_epoch_without_the_partial_batch() -> None:
    data = ArrayDataset(torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10) % 3, 3)
    batches = EpochBatches(data, 3, seed=0)
    assert batches.steps_per_epoch == 3
    epoch0 = [batches(g)[0].flatten().tolist() for g in range(3)]
    seen = sorted(v for b in epoch0 for v in b)
    assert len(seen) == 9 and len(set(seen)) == 9  # 9 distinct samples; one dropped
    again = EpochBatches(data, 3, seed=0)
    assert [again(g)[0].flatten().tolist() for g in (2, 0, 1)] == [epoch0[2], epoch0[0], epoch0[1]]  # random access
    assert batches(3)[0].flatten().tolist() != epoch0[0] or batches(4)[0].flatten().tolist() != epoch0[1]
