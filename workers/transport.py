"""The data plane: point-to-point tensor messages between stage processes.

Built on a torch.distributed process group that the stage processes set up among
themselves (gloo for CPU tensors, NCCL for GPU tensors), so activations and
gradient targets go worker to worker, never through the driver or Ray's object
store (one hop of a 1 MiB activation: about 1 ms with gloo here, against about
12 ms through the object store; see results/transport/).

A message is a fixed-size int64 header ``[kind, step, extra...]`` followed by an
optional payload tensor, both sent on one tag; messages between one pair of
processes on one tag arrive in the order they were sent. This module imports no
Ray: tests and the GPU check drive it from plain processes.
"""

from __future__ import annotations

import datetime
import queue
import socket
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch
import torch.distributed as dist

HEADER = 4  # int64 words: kind, step, a kind-specific word, and the number of labels that follow

def label_words(labels: torch.Tensor) -> torch.Tensor:
    """Labels as int64 header words: integers as they are, float targets by their float32 bits."""
    if labels.is_floating_point():
        return labels.detach().to("cpu", torch.float32).contiguous().view(torch.int32).to(torch.int64).flatten()
    return labels.detach().to("cpu", torch.int64).flatten()


def labels_from(words: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None) -> torch.Tensor:
    """The inverse of :func:`label_words`."""
    out = words.to(torch.int32).view(torch.float32) if dtype.is_floating_point else words
    return out.reshape(shape) if shape is not None else out


def free_port() -> int:
    """A TCP port that is free on this host now (for the process group to meet at)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def round_trip(buf: torch.Tensor, peer: int, *, initiator: bool) -> None:
    """``buf`` to ``peer`` and back (or back and to, for the other end) on the PING tag."""
    if initiator:
        dist.send(buf, dst=peer, tag=int(Tag.PING))
        dist.recv(buf, src=peer, tag=int(Tag.PING))
    else:
        dist.recv(buf, src=peer, tag=int(Tag.PING))
        dist.send(buf, dst=peer, tag=int(Tag.PING))


class Kind(IntEnum):
    """What a message carries."""

    TRAIN = 0  # downstream: labels and the activation of a training step
    EVAL = 1  # downstream: labels (-1 = padding) and the activation of an evaluation batch; extra = split
    EVAL_END = 2  # downstream: the evaluation pass of a split is over
    TARGET = 3  # upstream: dL/dh for a training step (bootstrapped or true)
    TRUE = 4  # upstream: the true dL/dh of a level-2 round
    SKIP = 5  # no payload; downstream: this step's batch is dropped; upstream: no true gradient will come,
    #           and with extra=1 no target either (a non-finite value, under train.nonfinite skip or reset)
    ACK = 6  # upstream, no payload: the stage above has taken this step (local losses send no target;
    #          the acknowledgement is the backpressure of runtime.max_in_flight)


class Tag(IntEnum):
    """Message streams; each keeps its own order."""

    DOWN = 1
    UP = 2
    PING = 3


@dataclass
class Message:
    kind: Kind
    step: int
    extra: int
    payload: torch.Tensor | None
    labels: torch.Tensor | None = None


class Transport:
    """Sends and receives messages with the other ranks of a process group.

    Args:
        rank, world_size: this process's place in the group.
        init_method: where the group meets, e.g. ``tcp://127.0.0.1:29500``.
        backend: ``gloo`` or ``nccl``.
        device: where received payloads live (CPU for gloo).
        timeout_s: longest wait for any message; a dead peer surfaces as an error, not a hang.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        init_method: str,
        backend: str = "gloo",
        device: torch.device = torch.device("cpu"),
        timeout_s: float = 120.0,
    ) -> None:
        self.rank, self.world_size, self.device, self.backend = rank, world_size, device, backend
        # gloo moves CPU tensors only: GPU stages sharing a GPU (or without NCCL) stage through host memory.
        self.wire = torch.device("cpu") if backend == "gloo" else device
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise RuntimeError(
                    f"this process already belongs to a process group as rank {dist.get_rank()} of "
                    f"{dist.get_world_size()}, not {rank} of {world_size}"
                )
        else:
            dist.init_process_group(
                backend,
                init_method=init_method,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        # gloo marks a send complete only once waited for. A reaper thread waits for sends
        # in order and then drops their tensors; the stage loop never blocks on a send (a
        # blocking wait there can deadlock two stages that are each waiting to be read).
        self._sends: queue.Queue[tuple[dist.Work, torch.Tensor] | None] = queue.Queue()
        self._send_error: BaseException | None = None
        self._reaper = threading.Thread(target=self._reap, name=f"dni-send-reaper-{rank}", daemon=True)
        self._reaper.start()
        self.bytes_sent = 0
        self.bytes_received = 0

    # -- sending ------------------------------------------------------------------
    def send(
        self,
        dst: int,
        tag: Tag,
        kind: Kind,
        step: int,
        payload: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        extra: int = 0,
    ) -> None:
        """Queue a message to ``dst``; returns without waiting for the receiver.

        ``labels`` (class labels or float targets of any shape) travel inside the header, so a
        message is two sends.
        """
        n_labels = 0 if labels is None else labels.numel()
        words = torch.tensor([int(kind), step, extra, n_labels], dtype=torch.int64)
        if labels is not None:
            words = torch.cat([words, label_words(labels)])
        if self._send_error is not None:
            raise RuntimeError(f"rank {self.rank}: an earlier send failed: {self._send_error}")
        self._isend(words.to(self.wire), dst, tag)
        if payload is not None:
            self._isend(payload.detach().to(self.wire).contiguous(), dst, tag)

    def _isend(self, tensor: torch.Tensor, dst: int, tag: Tag) -> None:
        work = dist.isend(tensor, dst=dst, tag=int(tag))
        assert work is not None  # None only for a rank outside the group; this is the default group
        self._sends.put((work, tensor))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def _reap(self) -> None:
        while True:
            item = self._sends.get()
            try:
                if item is None:
                    return
                if self._send_error is None:
                    item[0].wait()
            except BaseException as e:  # a peer died: reported by the next send or flush
                self._send_error = e
            finally:
                self._sends.task_done()

    def flush(self) -> None:
        """Wait until every queued message has been taken by its receiver.

        Raises:
            RuntimeError: a send failed (its receiver died).
        """
        self._sends.join()
        if self._send_error is not None:
            raise RuntimeError(f"rank {self.rank}: a send failed: {self._send_error}")

    @property
    def queued(self) -> int:
        """Sends not yet taken by their receivers (bounded by the stages' in-flight limits)."""
        return self._sends.qsize()

    # -- receiving ------------------------------------------------------------------
    def recv(
        self,
        src: int,
        tag: Tag,
        *,
        payload_shape: tuple[int, ...] | None,
        labels: int = 0,
        dtype: torch.dtype = torch.float32,
        label_dtype: torch.dtype = torch.int64,
        label_shape: tuple[int, ...] | None = None,
    ) -> Message:
        """Receive the next message from ``src`` on ``tag``.

        Args:
            payload_shape: shape of the payload that follows a header of a kind that
                has one (None: expect no payload).
            labels: how many label values follow the header.
            label_dtype, label_shape: what they are (default: int64, flat).
        """
        words = torch.empty(HEADER + labels, dtype=torch.int64, device=self.wire)
        self._recv_into(words, src, tag)
        kind, step, extra = Kind(int(words[0])), int(words[1]), int(words[2])
        if int(words[3]) != labels:
            raise RuntimeError(
                f"rank {self.rank}: a {kind.name} message from rank {src} carried {int(words[3])} labels, "
                f"expected {labels}: the two stages disagree on the batch size"
            )
        payload = None
        if payload_shape is not None and kind not in (Kind.EVAL_END, Kind.SKIP, Kind.ACK):
            payload = torch.empty(payload_shape, dtype=dtype, device=self.wire)
            self._recv_into(payload, src, tag)
            payload = payload.to(self.device)
        lab = labels_from(words[HEADER:], label_dtype, label_shape).to(self.device) if labels else None
        return Message(kind, step, extra, payload, lab)

    def _recv_into(self, tensor: torch.Tensor, src: int, tag: Tag) -> None:
        dist.recv(tensor, src=src, tag=int(tag))
        self.bytes_received += tensor.numel() * tensor.element_size()

    # -- measurement --------------------------------------------------------------------
    def ping_pong(self, peer: int, shape: tuple[int, ...], *, initiator: bool, rounds: int = 20) -> float:
        """Median one-way latency in ms of a float32 tensor of ``shape`` to ``peer`` and back.

        Both ends call it, one with ``initiator=True``.
        """
        buf = torch.zeros(shape, device=self.wire)
        times = []
        for _ in range(rounds + 3):
            start = time.perf_counter()
            round_trip(buf, peer, initiator=initiator)
            times.append((time.perf_counter() - start) * 1000 / 2)
        times = sorted(times[3:])  # the first round trips set up connections
        return times[len(times) // 2]

    def new_group(self, ranks: list[int]) -> Any:  # torch's new_group is untyped
        """A subgroup for collectives (every rank of the world must call this, in the same order)."""
        return dist.new_group(ranks)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._sends.put(None)
            self._reaper.join(timeout=5)
            if dist.is_initialized():
                dist.destroy_process_group()
