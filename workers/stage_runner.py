"""One stage worker's loop: the plain class that a Ray actor wraps.

A :class:`StageRunner` owns one replica of one stage (a
:class:`~dni.stage.DecoupledStage`: module, output synthesizer, optimisers, RNG)
and a bounded buffer of the activations it has sent downstream whose gradient
targets have not come back. It is an executor: for each global step it runs the
actions that :mod:`workers.actions` lists (receive, compute, send, await targets;
then the boundary's), and the step itself is :func:`dni.engine.train_step`, the
single-process pipeline's own. A synthesizer is trained on each target as it
arrives, blocking only when ``max_in_flight`` activations are outstanding
(backpressure).

On true-round steps (level 2: ``sync.true_every``, and ``log.grad_every`` rounds
that only measure) the true gradient travels down the stack through
:mod:`dni.true_round`: each stage passes it through a snapshot of itself taken at
that batch's forward, measures its synthesizer against it and, on training rounds,
trains it. Replicas of a stage average parameters every ``sync.replica_every``
steps (level 3).

At a checkpoint boundary each stage first receives every outstanding target and
true gradient, so the states all stages keep there form a consistent cut: no
message crosses it, and a pipeline restarted from it (:meth:`StageRunner.restore`)
replays exactly what the uninterrupted run would have done. A stop request
(:meth:`StageRunner.request_stop`: the coordinator's answer to an interrupt, the same step for
every worker) makes one more boundary such a cut and ends the loop there.

A NaN or inf found in a stage (``train.nonfinite``): ``stop`` raises
:class:`~dni.stage.NonFiniteError`; ``skip`` and ``reset`` drop the batch with a
SKIP message down and up the pipeline, so every stage skips it and cancels its
level-2 round, and the run goes on. No Ray here: tests run runners in plain
processes.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, NoReturn

import torch

from dni import engine
from dni.build import decoupled_stage
from dni.config import SYNTHESIZER_METHODS, Config
from dni.data import ArrayDataset, padded_batches
from dni.data.spec import DataSpec
from dni.engine import StageStep
from dni.evaluation import EvalSums
from dni.models import build_stages
from dni.schedule import EpochBatches, Schedule
from dni.stage import DecoupledStage, NonFiniteError
from dni.true_round import TrueRound, finish_round
from workers.actions import Action, Op, Role, boundary_actions, train_actions
from workers.replicas import average_replicas
from workers.topology import Topology
from workers.transport import Kind, Message, Tag, Transport

SPLITS = ("val", "test")


@dataclass
class Pending:
    """An activation sent downstream, waiting for its target."""

    step: int
    h: torch.Tensor
    labels: torch.Tensor
    kept: engine.Kept | None = None  # a stage that defers its target: what it settles when the target arrives


class Skipped(Exception):
    """This step's batch is dropped by every stage (a non-finite value somewhere, under skip or reset)."""


FAULTS = ("input", "synthesizer")
# Boundary states a worker keeps: the coordinator checkpoints the newest step that every
# worker still holds, so a fast stage may run a couple of boundaries ahead of a slow one.
KEEP_STATES = 3


@dataclass
class Window:
    """Counters of one logging window."""

    start: float = field(default_factory=time.perf_counter)
    idle: float = 0.0
    steps: int = 0
    staleness: list[int] = field(default_factory=list)
    dropped: int = 0
    synth_losses: list[float] = field(default_factory=list)
    input_losses: list[float] = field(default_factory=list)
    local_losses: list[float] = field(default_factory=list)
    in_flight_max: int = 0
    queued_max: int = 0


@dataclass
class StepState:
    """What the actions of one training step hand each other."""

    step: int
    x: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    result: StageStep | None = None
    batch: torch.Tensor | None = None  # the raw batch, read by stage 0 and by input-unlocked stages


class StageRunner:
    """Runs one replica of one stage.

    Args:
        cfg: the run's config.
        stage_index, replica: which stage and which of its replicas.
        topology, schedule: shared by all workers (see :mod:`workers.topology`, :mod:`dni.schedule`).
        transport: the data plane, already connected.
        data: the data's per-example shapes and types (:class:`~dni.data.spec.DataSpec`).
        shapes: every stage's per-example output shape.
        device: where this stage computes.
        datasets: train, val and test sets (needed by stage 0 only).
        keep_true_gradients: diagnostics: keep the first this many level-2 true gradients
            received (in ``true_gradients``), e.g. to check them against backprop.
    """

    def __init__(
        self,
        cfg: Config,
        stage_index: int,
        replica: int,
        *,
        topology: Topology,
        schedule: Schedule,
        transport: Transport,
        data: DataSpec,
        shapes: list[tuple[int, ...]],
        device: torch.device,
        datasets: dict[str, ArrayDataset] | None = None,
        keep_true_gradients: int = 0,
    ) -> None:
        self.cfg, self.i, self.replica = cfg, stage_index, replica
        self.topology, self.schedule, self.transport = topology, schedule, transport
        self.device = device
        self.k = topology.num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == self.k - 1
        self.batch = cfg.train.batch_size
        self.in_shape = data.in_shape if self.is_first else shapes[stage_index - 1]
        self.out_shape = shapes[stage_index]
        # Every worker builds the whole model from the same seed and keeps only its stage.
        module = build_stages(cfg.model, data.in_shape, data.num_classes, seed=cfg.seed)[stage_index]
        self.stage: DecoupledStage = decoupled_stage(
            cfg, module, stage_index, data=data, input_shape=self.in_shape, output_shape=self.out_shape, num_stages=self.k,
            total_steps=schedule.total_steps, device=device,
        )
        self.bp_lambda = cfg.synthesizer.bp_lambda
        self.role = Role(stage_index, replica, locked=engine.is_locked(self.stage, self.bp_lambda),
                         rounds=self.k > 1 and cfg.method in SYNTHESIZER_METHODS, deferred=self.stage.defers_target,
                         local=not self.stage.sends_target, unlock=self.stage.unlock is not None)
        # Labels travel with every downstream message: how many values, of what type and shape.
        self.labels_spec: dict[str, Any] = dict(labels=self.batch * data.labels_per_example,
                                                label_dtype=data.label_dtype, label_shape=(self.batch, *data.label_shape))
        self.datasets = datasets or {}
        reads_batches = self.is_first or self.role.unlock
        if reads_batches and "train" not in self.datasets:
            raise ValueError(f"stage {stage_index} needs the training data (stage 0, and every stage under synthesizer.unlock)")
        self.pending: deque[Pending] = deque()
        self.true_rounds: dict[int, TrueRound] = {}
        self.replica_group = None
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self._lock = threading.Lock()
        self._steps_done = 0  # global steps this worker's loop has passed (read by another thread)
        self.stop_at: int | None = None  # a stop request: end run() at the boundary before this step
        self._decided = -1  # the newest step whose boundary actions are fixed (stop or not)
        self.window = Window()
        self.idle_total = 0.0
        self.eval_seconds = 0.0
        self.run_started = time.perf_counter()
        self.kept: dict[int, dict[str, Any]] = {}  # states at the newest checkpoint boundaries, by step
        self.clock_offset = 0.0  # training seconds of earlier processes (a restored run)
        self.faults: dict[int, str] = {}
        self._sent_down = -1  # the newest step whose activation went downstream from a locked stage
        self.true_gradients: list[tuple[int, torch.Tensor]] = []
        self.keep_true = keep_true_gradients
        self.batches = EpochBatches(self.datasets["train"], self.batch, cfg.seed) if reads_batches else None

    # -- setup ------------------------------------------------------------------------
    def make_groups(self) -> None:
        """Create the replica groups (every rank creates every group, in stage order)."""
        for stage in range(self.k):
            ranks = self.topology.group(stage)
            group = self.transport.new_group(ranks) if len(ranks) > 1 else None
            if stage == self.i:
                self.replica_group = group

    def measure_hops(self) -> dict[str, float]:
        """Ping-pong the activation to the next stage (replica 0s): one-way ms per interface."""
        out: dict[str, float] = {}
        if self.replica != 0:
            return out
        if not self.is_first:
            prev = self.topology.rank(self.i - 1, 0)
            self.transport.ping_pong(prev, (self.batch, *self.in_shape), initiator=False)
        if not self.is_last:
            nxt = self.topology.rank(self.i + 1, 0)
            out[f"stage_{self.i}"] = self.transport.ping_pong(nxt, (self.batch, *self.out_shape), initiator=True)
        return out

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a state this runner's stage kept at a checkpoint boundary (see :meth:`run`).

        Nothing is in flight at such a boundary, so the buffers start empty.
        """
        self.stage.load_state_dict(state)
        self.clock_offset = float(state.get("runner", {}).get("train_seconds", 0.0))

    def inject_fault(self, step: int, where: str) -> None:
        """Fault injection, for tests and drills: at global ``step``, make this stage's ``input``
        non-finite, or spoil its ``synthesizer`` (NaN weights), before the step runs."""
        if where not in FAULTS:
            raise ValueError(f"inject_fault: where must be one of {', '.join(FAULTS)} (got {where!r})")
        self.faults[step] = where

    # -- the loop: an executor of workers.actions ------------------------------------------
    def request_stop(self, step: int) -> bool:
        """Make the boundary after global step ``step - 1`` a checkpoint (DRAIN, KEEP_STATE) and end
        :meth:`run` there (safe to call from another thread). Every worker must be given the same step.

        Returns:
            False when this worker has already passed that boundary (it will not stop there).
        """
        with self._lock:
            if self._decided >= step - 1:
                return False
            self.stop_at = step
            return True

    def run(self, start_step: int = 0) -> dict[str, float]:
        """Run every global step from ``start_step`` (a checkpoint boundary, or 0) to the end, or to
        the boundary a :meth:`request_stop` asked for; returns totals."""
        started = self.run_started = time.perf_counter()
        with self._lock:
            self._decided = start_step - 1
        with self._lock:
            self._steps_done = start_step
        for g in range(start_step, self.schedule.total_steps):
            actions = train_actions(self.topology, self.schedule, self.role, g)
            if actions:
                try:
                    self._train_step(g, actions)
                except Skipped:
                    pass
            with self._lock:  # fixed here: request_stop (another thread) can only move a later boundary
                stop, self._decided = self.stop_at is not None and g + 1 >= self.stop_at, g
            for action in boundary_actions(self.topology, self.schedule, self.role, g, stop=stop):
                self._at_boundary(action, g)
            with self._lock:
                self._steps_done = g + 1
            if stop:  # the state of step g + 1 is kept: a consistent cut to resume from
                break
        self._drain()
        self.transport.flush()
        wall = time.perf_counter() - started
        return {"wall_seconds": wall, "busy_seconds": wall - self.idle_total, "idle_seconds": self.idle_total}

    def _train_step(self, g: int, actions: list[Action]) -> None:
        state = StepState(g)
        if self.batches is not None:
            state.batch, state.labels = self.batches(g)
            if self.is_first:
                state.x = state.batch
        for action in actions:
            self._do(action, state)
        self.window.steps += 1

    def _do(self, action: Action, state: StepState) -> None:
        """Execute one training action of step ``state.step``."""
        g, op, peer = state.step, action.op, action.peer
        if op is Op.RECEIVE_INPUT:
            assert peer is not None
            state.x, state.labels = self._input(g, peer)
        elif op is Op.COMPUTE:
            state.result = self._compute(state, peer)
        elif op is Op.REAL_FORWARD:
            state.result = self._real_forward(state)
        elif op is Op.SEND_ACK:
            assert peer is not None
            self.transport.send(peer, Tag.UP, Kind.ACK, g)
        elif op in (Op.SEND_TARGET, Op.SEND_TRUE):
            assert peer is not None and state.result is not None and state.result.target is not None
            self.transport.send(peer, Tag.UP, Kind.TARGET if op is Op.SEND_TARGET else Kind.TRUE, g, state.result.target)
        elif op is Op.SEND_ACTIVATION:
            assert peer is not None and state.result is not None and state.labels is not None
            self.transport.send(peer, Tag.DOWN, Kind.TRAIN, g, state.result.h, labels=state.labels)
            kept = None
            if self.role.deferred:
                assert state.x is not None
                kept = engine.keep(self.stage, state.x, state.labels, state.result)
            self.pending.append(Pending(g, state.result.h, state.labels, kept))
            self.window.in_flight_max = max(self.window.in_flight_max, len(self.pending))
            self.window.queued_max = max(self.window.queued_max, self.transport.queued)
        elif op is Op.AWAIT_TARGETS:
            while len(self.pending) >= self.cfg.runtime.max_in_flight:
                self._receive_upstream()
        else:
            raise RuntimeError(f"stage {self.i}: {op.value} is not a training action")

    def _compute(self, state: StepState, above: int | None) -> StageStep:
        """The engine's step on this stage (a locked stage exchanges with rank ``above`` inside it)."""
        if self.role.unlock:
            return self._unlocked_compute(state)
        g, x, y = state.step, state.x, state.labels
        assert x is not None and y is not None
        kind = self.schedule.true_round(g) if self.role.rounds else None
        try:
            self._inject(g, x)
            tr = TrueRound.before_forward(self.stage, x, kind=kind, bp_lambda=self.cfg.sync.bp_lambda) if kind else None
            from_above = None
            if above is not None:
                def from_above(h: torch.Tensor) -> torch.Tensor:
                    return self._exchange(g, above, h, y)
            if self.stage.delayed:
                step = engine.delayed_forward(self.stage, x)
            else:
                step = engine.train_step(self.stage, x, y, from_above=from_above, bp_lambda=self.bp_lambda)
        except NonFiniteError as e:
            self._on_fault(g, e)
        if tr is not None and not self.is_last:
            self.true_rounds[g] = tr.after_step(step, y)
        if step.synth_loss is not None:
            self.window.synth_losses.append(step.synth_loss)
        if step.local_loss is not None:
            self.window.local_losses.append(step.local_loss)
        if self.is_last and self.schedule.reports_after(g) and not self.role.unlock:
            self._record(g + 1, {"train/loss": step.loss})
        return step

    def _unlocked_compute(self, state: StepState) -> StageStep:
        """Complete unlock: the step on the synthetic input of this stage's own batch."""
        g, batch, y = state.step, state.batch, state.labels
        assert batch is not None and y is not None
        try:
            self._inject(g, batch)
            return engine.unlocked_step(self.stage, batch, y)
        except NonFiniteError as e:
            # The stage below sends this step's activation whatever happened here: take it, so that
            # the next step reads the next one (a SKIP from below ends the step there instead).
            self._input(g, self.topology.rank_for(self.i - 1, g))
            self._on_fault(g, e)

    def _real_forward(self, state: StepState) -> StageStep:
        """Complete unlock: the real input has arrived: fit the input model, pass the real output on."""
        g, batch, x, y, step = state.step, state.batch, state.x, state.labels, state.result
        assert batch is not None and x is not None and y is not None and step is not None
        try:
            h, input_loss, loss = engine.real_forward(self.stage, batch, x, y)
        except NonFiniteError as e:
            self._on_fault(g, e)
        self.window.input_losses.append(input_loss)
        if self.is_last and self.schedule.reports_after(g):
            self._record(g + 1, {"train/loss": loss, "unlock/synthetic_input_loss": step.loss})
        return dataclasses.replace(step, h=h, loss=loss)

    def _inject(self, g: int, x: torch.Tensor) -> None:
        where = self.faults.pop(g, None)
        if where == "input":
            x.fill_(float("nan"))
        elif where == "synthesizer" and self.stage.synthesizer is not None:
            with torch.no_grad():
                for p in self.stage.synthesizer.parameters():
                    p.fill_(float("nan"))

    def _on_fault(self, g: int, error: NonFiniteError) -> NoReturn:
        """Apply ``train.nonfinite`` to a fault this stage found at step ``g`` (it has not updated)."""
        self._record(g + 1, engine.apply_nonfinite(self.cfg.train.nonfinite, error, self.stage, step=g))
        self._skip(g, tell_below=True)

    def _skip(self, g: int, *, tell_below: bool) -> NoReturn:
        """Drop step ``g`` here and tell the stage above; the one below too when it waits for our target."""
        if not self.is_last and self._sent_down != g:  # (a locked stage may have sent h before its fault)
            self.transport.send(self.topology.rank_for(self.i + 1, g), Tag.DOWN, Kind.SKIP, g, None,
                                labels=self._no_labels())
        if tell_below and not self.is_first:
            self.transport.send(self.topology.rank_for(self.i - 1, g), Tag.UP, Kind.SKIP, g, None, extra=1)
        raise Skipped()

    def _no_labels(self) -> torch.Tensor:
        """Placeholder labels for downstream messages without a batch (SKIP, EVAL_END)."""
        return torch.zeros(self.labels_spec["labels"], dtype=torch.int64)

    def _input(self, g: int, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        msg = self._recv(src, Tag.DOWN, payload_shape=(self.batch, *self.in_shape), **self.labels_spec)
        if msg.kind == Kind.SKIP and msg.step == g:  # the stage below dropped this batch: no target is due
            self._skip(g, tell_below=False)
        if msg.kind != Kind.TRAIN or msg.step != g:
            raise RuntimeError(f"stage {self.i}: expected step {g} from rank {src}, got {msg.kind.name} {msg.step}")
        assert msg.payload is not None and msg.labels is not None
        return msg.payload, msg.labels

    def _exchange(self, g: int, dst: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A locked stage: send h to rank ``dst`` and wait for dL/dh (handling the true gradients of
        earlier rounds that come on the same stream first)."""
        self.transport.send(dst, Tag.DOWN, Kind.TRAIN, g, h, labels=y)
        self._sent_down = g
        while True:
            msg = self._recv(dst, Tag.UP, payload_shape=(self.batch, *self.out_shape))
            if msg.kind == Kind.SKIP and msg.step == g:  # dropped above: undo the forward, pass the word down
                self.stage.abandon()
                self._skip(g, tell_below=True)
            if msg.kind == Kind.TARGET and msg.step == g:
                assert msg.payload is not None
                return msg.payload
            if msg.kind in (Kind.TRUE, Kind.SKIP):
                self._on_upstream(msg)
                continue
            raise RuntimeError(f"stage {self.i}: expected the gradient of step {g}, got {msg.kind.name} {msg.step}")

    # -- upstream messages ---------------------------------------------------------------------
    def _receive_upstream(self) -> None:
        """Take the next message from the stage above: a target or a true gradient."""
        if self.pending:
            src = self.topology.rank_for(self.i + 1, self.pending[0].step)
        else:
            src = self.topology.rank_for(self.i + 1, min(self.true_rounds))
        self._on_upstream(self._recv(src, Tag.UP, payload_shape=(self.batch, *self.out_shape)))

    def _on_upstream(self, msg: Message) -> None:
        if msg.kind == Kind.TARGET:
            self._on_target(msg)
        elif msg.kind == Kind.ACK:
            self._on_ack(msg)
        elif msg.kind == Kind.TRUE:
            assert msg.payload is not None
            self._on_true(msg.step, msg.payload)
        elif msg.kind == Kind.SKIP:
            self._on_skip(msg)
        else:
            raise RuntimeError(f"stage {self.i}: unexpected {msg.kind.name} from above")

    def _pop_pending(self, msg: Message, what: str) -> Pending:
        """The oldest activation in flight, which ``msg`` (a ``what`` from above) must be about."""
        item = self.pending.popleft()
        if item.step != msg.step:
            raise RuntimeError(f"stage {self.i}: {what} for step {msg.step} arrived, expected {item.step}")
        return item

    def _on_target(self, msg: Message) -> None:
        item = self._pop_pending(msg, "target")
        if self.role.deferred:  # batches run forward since this one: the delay of its settling
            staleness = len(self.pending)
        else:
            staleness = self.stage.steps_done - 1 - self._local_index(item.step)
        self.window.staleness.append(staleness)
        if self.role.deferred:  # the rule's part (see engine.settle), and the target for the stage below
            assert msg.payload is not None and item.kept is not None
            settled = engine.settle(self.stage, item.kept, msg.payload)
            if settled.synth_loss is not None:
                self.window.synth_losses.append(settled.synth_loss)
            if settled.target is not None:
                self.transport.send(self.topology.rank_for(self.i - 1, item.step), Tag.UP, Kind.TARGET, item.step,
                                    settled.target)
            return
        if staleness > self.cfg.runtime.max_staleness:
            self.window.dropped += 1
            return
        assert msg.payload is not None
        self.window.synth_losses.append(self.stage.train_synthesizer(item.h, item.labels, msg.payload))

    def _on_ack(self, msg: Message) -> None:
        """Local losses: the stage above has taken step ``msg.step``; nothing to learn from, one batch
        fewer in flight."""
        self._pop_pending(msg, "acknowledgement")

    def _on_skip(self, msg: Message) -> None:
        """The stage above dropped step ``msg.step``: no target (extra=1) and no true gradient will come."""
        if msg.extra and not self.role.locked:
            self._pop_pending(msg, "skip")
        if self.true_rounds.pop(msg.step, None) is not None and not self.is_first:
            self.transport.send(self.topology.rank_for(self.i - 1, msg.step), Tag.UP, Kind.SKIP, msg.step, None)

    def _local_index(self, g: int) -> int:
        """How many of this replica's steps came before global step ``g``."""
        return g // self.topology.replicas[self.i]

    def _on_true(self, g: int, true_grad: torch.Tensor) -> None:
        """Level 2: the true gradient of round ``g`` arrived: measure, train, pass it down."""
        tr = self.true_rounds.pop(g, None)
        if tr is None:  # this stage dropped that batch (a fault) and told the stages below
            return
        if self.keep_true and len(self.true_gradients) < self.keep_true:
            self.true_gradients.append((g, true_grad.detach().cpu().clone()))
        scalars, grad_in = finish_round(self.stage, tr, true_grad, bp_lambda=self.cfg.sync.bp_lambda)
        if grad_in is not None:
            self.transport.send(self.topology.rank_for(self.i - 1, g), Tag.UP, Kind.TRUE, g, grad_in)
        self._record(g + 1, scalars)

    def _drain(self) -> None:
        """Receive every outstanding target and true gradient; a corrected stage then applies its
        residuals (as :meth:`dni.pipeline.Pipeline.flush` does)."""
        while self.pending or self.true_rounds:
            self._receive_upstream()
        if self.stage.corrected:
            self.stage.apply_residuals()

    # -- boundaries --------------------------------------------------------------------------------
    def _at_boundary(self, action: Action, g: int) -> None:
        """Execute one boundary action after global step ``g``."""
        op = action.op
        if op is Op.AVERAGE_REPLICAS:
            self._average_replicas()
        elif op is Op.EVALUATE:
            self._evaluate(g)
        elif op is Op.REPORT:
            self._report_window(g)
        elif op is Op.DRAIN:
            self._drain()  # a consistent cut: no message crosses a checkpoint
        elif op is Op.KEEP_STATE:
            state = copy.deepcopy(self.stage.state_dict())
            state["runner"] = {"train_seconds": self._train_seconds()}
            self.kept[g + 1] = state
            for old in sorted(self.kept)[:-KEEP_STATES]:
                del self.kept[old]
        else:
            raise RuntimeError(f"stage {self.i}: {op.value} is not a boundary action")

    @property
    def saved(self) -> tuple[int, dict[str, Any]] | None:
        """The newest kept state, as (step, state)."""
        return (max(self.kept), self.kept[max(self.kept)]) if self.kept else None

    def _train_seconds(self) -> float:
        """Training time from the run's first step, without evaluations (earlier processes included)."""
        return self.clock_offset + time.perf_counter() - self.run_started - self.eval_seconds

    def _average_replicas(self) -> None:
        """Level 3: average parameters, buffers and synthesizer with the other replicas."""
        start = time.perf_counter()
        average_replicas(self.stage, self.replica_group, self.topology.replicas[self.i])
        self._idle(time.perf_counter() - start)

    def _evaluate(self, g: int) -> None:
        """Evaluation through the chain (replica 0 of each stage), in eval mode."""
        start = time.perf_counter()
        if self.is_last:
            self._record(g + 1, {"time/train_seconds": self._train_seconds()})
        self.stage.train(False)
        try:
            for split_id, split in enumerate(SPLITS):
                self._evaluate_split(g, split_id, split)
        finally:
            self.stage.train(True)
            self.eval_seconds += time.perf_counter() - start

    def _evaluate_split(self, g: int, split_id: int, split: str) -> None:
        src = self.topology.rank(self.i - 1, 0) if not self.is_first else None
        dst = self.topology.rank(self.i + 1, 0) if not self.is_last else None
        sums = EvalSums(self.stage.loss_fn)
        for x, y in self._eval_batches(src, split_id, split):
            with torch.no_grad():
                h = self.stage.module(x)
            if dst is not None:
                self.transport.send(dst, Tag.DOWN, Kind.EVAL, g, h, labels=y, extra=split_id)
            else:
                sums.add(h, y)  # padding rows (labels -1 or NaN) are left out
        if dst is not None:
            self.transport.send(dst, Tag.DOWN, Kind.EVAL_END, g, None, labels=self._no_labels(), extra=split_id)
        else:
            self._record(g + 1, {f"{split}/{metric}": v for metric, v in sums.result().items()})

    def _eval_batches(self, src: int | None, split_id: int, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if src is None:  # stage 0: the data, padded to full batches (messages have one shape)
            ds = self.datasets.get(split)
            if ds is not None:
                yield from padded_batches(ds, self.batch)
            return
        while True:
            msg = self._recv(src, Tag.DOWN, payload_shape=(self.batch, *self.in_shape), **self.labels_spec)
            if msg.kind == Kind.EVAL_END:
                return
            if msg.kind != Kind.EVAL or msg.extra != split_id:
                raise RuntimeError(f"stage {self.i}: expected evaluation of {split}, got {msg.kind.name}")
            assert msg.payload is not None and msg.labels is not None
            yield msg.payload, msg.labels

    # -- messages and metrics -----------------------------------------------------------------------
    def _recv(self, src: int, tag: Tag, **kwargs: Any) -> Message:
        start = time.perf_counter()
        msg = self.transport.recv(src, tag, **kwargs)
        self._idle(time.perf_counter() - start)
        return msg

    def _idle(self, seconds: float) -> None:
        self.window.idle += seconds
        self.idle_total += seconds

    def _report_window(self, g: int) -> None:
        w, now = self.window, time.perf_counter()
        elapsed = now - w.start
        tag = f"stage_{self.i}" + (f"_r{self.replica}" if self.topology.replicas[self.i] > 1 else "")
        scalars = {
            f"stage/busy_fraction/{tag}": 1.0 - w.idle / elapsed if elapsed > 0 else 0.0,
            f"stage/idle_seconds/{tag}": w.idle,
            f"stage/steps_per_second/{tag}": w.steps / elapsed if elapsed > 0 else 0.0,
        }
        if not self.is_last:
            scalars[f"stage/in_flight_max/{tag}"] = float(w.in_flight_max)
            scalars[f"stage/queued_sends_max/{tag}"] = float(w.queued_max)
        if w.staleness:
            scalars[f"stage/staleness/{tag}"] = sum(w.staleness) / len(w.staleness)
            scalars[f"stage/staleness_max/{tag}"] = float(max(w.staleness))
            scalars[f"stage/dropped_targets/{tag}"] = float(w.dropped)
        if w.synth_losses:
            scalars[f"sg/loss/{tag}"] = sum(w.synth_losses) / len(w.synth_losses)
            scalars[f"sg/fit/{tag}"] = self.stage.fit.explained
        if w.input_losses:
            scalars[f"unlock/input_loss/stage_{self.i}"] = sum(w.input_losses) / len(w.input_losses)
        if w.local_losses:
            scalars[f"local/loss/stage_{self.i}"] = sum(w.local_losses) / len(w.local_losses)
        if self.is_last:
            scalars["train/samples_per_second"] = w.steps * self.batch * self.topology.replicas[self.i] / elapsed
        self._record(g + 1, scalars)
        self.window = Window(start=now)

    def _record(self, step: int, scalars: dict[str, float]) -> None:
        if scalars:
            with self._lock:
                self.metrics.append((step, scalars))

    def steps_done(self) -> int:
        """Global steps this worker's loop has passed, boundaries included (safe to call from another thread)."""
        with self._lock:
            return self._steps_done

    def drain_metrics(self) -> list[tuple[int, dict[str, float]]]:
        """Metrics recorded since the last call (safe to call from another thread)."""
        with self._lock:
            out, self.metrics = self.metrics, []
        return out
