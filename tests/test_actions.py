"""The order of a worker's messages for a step is a pure function of the schedule: literal tables."""

from __future__ import annotations

from dni.schedule import Schedule
from workers.actions import Role, boundary_actions, train_actions
from workers.topology import Topology

# Three stages, the middle one with two replicas: ranks 0 | 1, 2 | 3.
TOPOLOGY = Topology((1, 2, 1))
SCHEDULE = Schedule(total_steps=6, steps_per_epoch=3, true_every=2, replica_every=4, checkpoint_every=3, log_every=2)


def table(role: Role, actions=train_actions) -> list[list[str]]:
    return [[repr(a) for a in actions(TOPOLOGY, SCHEDULE, role, g)] for g in range(SCHEDULE.total_steps)]


def test_unlocked_middle_replica_trains_every_other_step() -> None:
    assert table(Role(1, 1, locked=False, rounds=True)) == [
        [],
        ["receive_input:0", "compute", "send_target:0", "send_activation:3", "await_targets"],
        [],
        ["receive_input:0", "compute", "send_target:0", "send_activation:3", "await_targets"],
        [],
        ["receive_input:0", "compute", "send_target:0", "send_activation:3", "await_targets"],
    ]


def test_first_stage_reads_its_batch_and_sends_to_the_replica_of_the_step() -> None:
    assert table(Role(0, 0, locked=False, rounds=True)) == [
        ["compute", "send_activation:1", "await_targets"],
        ["compute", "send_activation:2", "await_targets"],
        ["compute", "send_activation:1", "await_targets"],
        ["compute", "send_activation:2", "await_targets"],
        ["compute", "send_activation:1", "await_targets"],
        ["compute", "send_activation:2", "await_targets"],
    ]


def test_last_stage_sends_the_true_gradient_on_round_steps_only_when_there_are_rounds() -> None:
    assert table(Role(2, 0, locked=False, rounds=True)) == [
        ["receive_input:1", "compute", "send_target:1"],
        ["receive_input:2", "compute", "send_target:2", "send_true:2"],
        ["receive_input:1", "compute", "send_target:1"],
        ["receive_input:2", "compute", "send_target:2", "send_true:2"],
        ["receive_input:1", "compute", "send_target:1"],
        ["receive_input:2", "compute", "send_target:2", "send_true:2"],
    ]
    backprop = table(Role(2, 0, locked=False, rounds=False))
    assert all("send_true" not in " ".join(row) for row in backprop)


def test_a_locked_stage_exchanges_with_the_stage_above_inside_compute() -> None:
    assert table(Role(0, 0, locked=True, rounds=False)) == [
        ["compute:1"], ["compute:2"], ["compute:1"], ["compute:2"], ["compute:1"], ["compute:2"],
    ]
    assert table(Role(1, 0, locked=True, rounds=True))[0] == ["receive_input:0", "compute:3", "send_target:0"]


def test_boundaries_average_evaluate_report_and_cut() -> None:
    assert table(Role(1, 1, locked=False, rounds=True), boundary_actions) == [
        [],
        ["report"],
        ["drain", "keep_state"],  # a checkpoint every 3 steps; replica 1 does not evaluate
        ["average_replicas", "report"],  # level 3 every 4 steps
        [],
        ["report", "drain", "keep_state"],
    ]
    assert table(Role(1, 0, locked=False, rounds=True), boundary_actions)[2] == ["evaluate", "drain", "keep_state"]
    assert table(Role(1, 0, locked=False, rounds=True), boundary_actions)[5] == \
        ["evaluate", "report", "drain", "keep_state"]
    # A stage without replicas has nothing to average.
    assert table(Role(0, 0, locked=False, rounds=True), boundary_actions)[3] == ["report"]


def test_a_stop_request_makes_its_boundary_a_cut() -> None:
    role = Role(1, 1, locked=False, rounds=True)
    stopped = [[repr(a) for a in boundary_actions(TOPOLOGY, SCHEDULE, role, g, stop=True)] for g in (0, 1, 2)]
    assert stopped == [["drain", "keep_state"], ["report", "drain", "keep_state"], ["drain", "keep_state"]]


def test_rounds_of_both_kinds_in_the_schedule() -> None:
    s = Schedule(total_steps=12, steps_per_epoch=12, true_every=4, measure_every=3)
    assert [s.true_round(g) for g in range(12)] == [
        None, None, "measure", "train", None, "measure", None, "train", "measure", None, None, "train",
    ]
