"""Which process runs which step: ranks of stage replicas, as small pure functions.

Every worker derives the routing from the config, so no message is needed to
agree on it. With R_i replicas of stage i, global step g runs on replica g % R_i
of every stage i; activations go from (i, g % R_i) to (i+1, g % R_{i+1}) and the
gradient target comes back the same way.

Boundary actions (replica averaging, evaluation, checkpoints; see
:class:`dni.schedule.Schedule`) happen after global steps, each replica taking
part after its own last step up to that point. Doing them at global rather than
per-replica step counts keeps replicas, evaluation and in-flight batches free of
deadlock: each needs only steps <= g.
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
