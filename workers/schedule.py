"""Who runs which step, and what happens at each step boundary: small pure functions.

Every worker derives the whole schedule from the config, so no message is
needed to agree on it and the driver stays off the per-step path.

Routing: with R_i replicas of stage i, global step g runs on replica g % R_i of
every stage i; activations go from (i, g % R_i) to (i+1, g % R_{i+1}) and the
gradient target comes back the same way.

Boundaries: after global step g (and after every replica has finished its own
steps up to g), in this order: replica averaging, evaluation, checkpoint. Doing
them at global rather than per-replica step counts is what keeps replicas,
evaluation and in-flight batches free of deadlock: each needs only steps <= g.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Ranks of the stage processes: stage i, replica r has rank offset(i) + r."""

    replicas: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.replicas)

    @property
    def world_size(self) -> int:
        return sum(self.replicas)

    def rank(self, stage: int, replica: int) -> int:
        if not 0 <= replica < self.replicas[stage]:
            raise ValueError(f"stage {stage} has {self.replicas[stage]} replicas, not {replica + 1}")
        return sum(self.replicas[:stage]) + replica

    def place(self, rank: int) -> tuple[int, int]:
        """(stage, replica) of ``rank``."""
        for stage, r in enumerate(self.replicas):
            if rank < r:
                return stage, rank
            rank -= r
        raise ValueError("rank out of range")

    def replica_for(self, stage: int, step: int) -> int:
        """The replica of ``stage`` that runs global step ``step``."""
        return step % self.replicas[stage]

    def rank_for(self, stage: int, step: int) -> int:
        """The rank that runs ``step`` on ``stage``."""
        return self.rank(stage, self.replica_for(stage, step))

    def group(self, stage: int) -> list[int]:
        """The ranks of all replicas of ``stage``."""
        return [self.rank(stage, r) for r in range(self.replicas[stage])]


@dataclass(frozen=True)
class Schedule:
    """When the periodic actions happen, in global steps (0-based)."""

    total_steps: int
    steps_per_epoch: int
    true_every: int = 0
    replica_every: int = 0
    checkpoint_every: int = 0
    eval_every_epochs: int = 1

    def is_true_round(self, step: int) -> bool:
        """Level 2: the last step of every ``true_every`` gets a true gradient round."""
        return self.true_every > 0 and (step + 1) % self.true_every == 0

    def syncs_replicas_after(self, step: int) -> bool:
        return self.replica_every > 0 and (step + 1) % self.replica_every == 0

    def evaluates_after(self, step: int) -> bool:
        last = step + 1 == self.total_steps
        epoch_end = (step + 1) % self.steps_per_epoch == 0
        return last or (epoch_end and ((step + 1) // self.steps_per_epoch) % self.eval_every_epochs == 0)

    def checkpoints_after(self, step: int) -> bool:
        last = step + 1 == self.total_steps
        return last or (self.checkpoint_every > 0 and (step + 1) % self.checkpoint_every == 0)
