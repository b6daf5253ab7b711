"""The order of a stage worker's actions for one global step: a pure function of the schedule.

Every worker runs, for each global step g, :func:`train_actions` (when its replica owns
g) and then :func:`boundary_actions`. Both are derived from the config alone
(:class:`~workers.topology.Topology`, :class:`~dni.schedule.Schedule`, whether the
stage is locked), so every worker knows what its neighbours will send and when, and
the worker loop (:mod:`workers.stage_runner`) only executes the list.

Training actions, in order:

  RECEIVE_INPUT  from the stage below (stage 0 reads the batch itself)
  COMPUTE        :func:`dni.engine.train_step`; a locked stage exchanges with ``peer``
                 (sends h up, waits for dL/dh) inside it
  REAL_FORWARD   complete unlock (Role.unlock): the stage computed on its synthetic input in
                 COMPUTE, before RECEIVE_INPUT; now its input model fits the real input and the
                 stage runs forward on it (:func:`dni.engine.real_forward`)
  SEND_TARGET    dL/dx to the stage below (a stage that defers its target, delayed or
                 corrected, sends it when its own target arrives: see Role.deferred)
  SEND_TRUE      the last stage, on a true-round step: the same target, marked true
  SEND_ACK       local losses (Role.local): no target goes down, only an acknowledgement that
                 the step was taken (the stage below's backpressure)
  SEND_ACTIVATION h to the stage above (unlocked stages; a locked one sent it in COMPUTE)
  AWAIT_TARGETS  take targets from above until fewer than ``runtime.max_in_flight`` are
                 outstanding (backpressure)

Boundary actions after step g: AVERAGE_REPLICAS (level 3), EVALUATE (replica 0s),
REPORT (a logging window), and at a checkpoint DRAIN (receive every outstanding target
and true gradient: a consistent cut) then KEEP_STATE; also at the boundary where an interrupted
run stops (``stop``), which every worker is told in advance.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from dni.schedule import Schedule
from workers.topology import Topology


class Op(Enum):
    RECEIVE_INPUT = "receive_input"
    COMPUTE = "compute"
    REAL_FORWARD = "real_forward"
    SEND_TARGET = "send_target"
    SEND_TRUE = "send_true"
    SEND_ACK = "send_ack"
    SEND_ACTIVATION = "send_activation"
    AWAIT_TARGETS = "await_targets"
    AVERAGE_REPLICAS = "average_replicas"
    EVALUATE = "evaluate"
    REPORT = "report"
    DRAIN = "drain"
    KEEP_STATE = "keep_state"


@dataclass(frozen=True)
class Action:
    """One thing a worker does; ``peer`` is the rank it talks to, if any."""

    op: Op
    peer: int | None = None

    def __repr__(self) -> str:  # compact, for the tables in the tests
        return self.op.value if self.peer is None else f"{self.op.value}:{self.peer}"


@dataclass(frozen=True)
class Role:
    """Where a worker sits, and how its stage learns."""

    stage: int
    replica: int
    locked: bool
    """The stage waits for dL/dh from above (backprop, or BP(lambda) > 0); see :func:`dni.engine.is_locked`."""
    rounds: bool
    """The pipeline has true-gradient rounds (it has synthesizers and more than one stage)."""
    deferred: bool = False
    """The delayed and corrected rules (:func:`dni.engine.settle`): the stage settles a batch (and
    sends its target down) when the batch's target arrives, during AWAIT_TARGETS or DRAIN, not in
    its own step."""
    local: bool = False
    """Local losses (``method: local``): the stage learns from its own auxiliary head (the last from
    the loss) and sends no target down, only SEND_ACK."""
    unlock: bool = False
    """Complete unlock (``synthesizer.unlock``): the stage reads the batch itself and computes on its
    synthetic input before it receives its real input (then REAL_FORWARD)."""


def train_actions(topology: Topology, schedule: Schedule, role: Role, step: int) -> list[Action]:
    """What the worker does to train global ``step``; empty when another replica owns it."""
    i, last = role.stage, role.stage == topology.num_stages - 1
    if topology.replica_for(i, step) != role.replica:
        return []
    below = topology.rank_for(i - 1, step) if i > 0 else None
    above = topology.rank_for(i + 1, step) if not last else None
    receive = [Action(Op.RECEIVE_INPUT, below)] if below is not None else []
    if role.unlock:  # nothing from below is needed to compute: the real input comes after
        actions = [Action(Op.COMPUTE), *receive, Action(Op.REAL_FORWARD)]
    else:
        actions = [*receive, Action(Op.COMPUTE, above if role.locked else None)]
    if below is not None and role.local:
        actions.append(Action(Op.SEND_ACK, below))
    elif below is not None and not role.deferred:
        actions.append(Action(Op.SEND_TARGET, below))
        if last and role.rounds and schedule.is_true_round(step):
            actions.append(Action(Op.SEND_TRUE, below))
    if above is not None and not role.locked:
        actions += [Action(Op.SEND_ACTIVATION, above), Action(Op.AWAIT_TARGETS)]
    return actions


def boundary_actions(topology: Topology, schedule: Schedule, role: Role, step: int, *,
                     stop: bool = False) -> list[Action]:
    """What the worker does after global ``step``, whichever replica trained it; ``stop``: the run
    stops here on request (an interrupt), so this boundary is a checkpoint too."""
    actions = []
    if schedule.syncs_replicas_after(step) and topology.replicas[role.stage] > 1:
        actions.append(Action(Op.AVERAGE_REPLICAS))
    if schedule.evaluates_after(step) and role.replica == 0:
        actions.append(Action(Op.EVALUATE))
    if schedule.reports_after(step):
        actions.append(Action(Op.REPORT))
    if schedule.checkpoints_after(step) or stop:
        actions += [Action(Op.DRAIN), Action(Op.KEEP_STATE)]
    return actions
