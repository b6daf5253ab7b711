"""Level 3 of the synchronisation: replicas of a stage averaged within the stage's group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dni.stage import DecoupledStage


def average_replicas(stage: DecoupledStage, group: object, replicas: int) -> None:
    """Average ``stage``'s floating-point parameters and buffers (BatchNorm statistics) and its
    synthesizer's with the other ``replicas`` in ``group``, in one all-reduce; every replica
    of the group must call this at the same boundary. Optimiser states stay per replica."""
    tensors = [t for t in stage.module.state_dict().values() if t.is_floating_point()]
    if stage.synthesizer is not None:
        tensors += [t for t in stage.synthesizer.state_dict().values() if t.is_floating_point()]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= replicas
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
