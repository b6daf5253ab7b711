"""The dni data plane between two real processes (gloo on 127.0.0.1, no Ray).

A pair of spawned processes (rank 0 and rank 1) runs a scenario function each and
reports plain Python data back on a queue; the assertions run here. Children are
always joined, and killed if they outlive their test.
"""

from __future__ import annotations

import math
import os
import queue as queue_lib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from workers.transport import Kind, Tag, Transport, free_port

MANY = 64  # messages in the many-messages scenario
from workers.transport_bench import summarize

PAIR_TIMEOUT_S = 30.0  # a hung scenario fails its test instead of hanging the suite
SHORT_TIMEOUT_S = 3.0  # the Transport timeout of the dead-peer tests
BATCH, FEATURES = 4, 3

Scenario = Callable[[int, int], Any]  # (rank, port) -> what the rank reports


# -- running a pair ------------------------------------------------------------------
def _child(scenario: Scenario, rank: int, port: int, out: Any) -> None:
    """Run ``scenario(rank, port)`` and put ``(rank, "ok" | "error", value)`` on ``out``."""
    torch.set_num_threads(1)
    try:
        out.put((rank, "ok", scenario(rank, port)))
    except BaseException as e:  # report, so the test fails with the child's reason
        out.put((rank, "error", f"{type(e).__name__}: {e}"))


def run_pair(scenario: Scenario, *, wait_for: tuple[int, ...] = (0, 1)) -> dict[int, Any]:
    """Run ``scenario`` as ranks 0 and 1 of a fresh gloo group; return the ranks' results.

    Only the ranks in ``wait_for`` are waited for; the others are killed once those
    have reported. Raises AssertionError if a rank fails or does not report in time.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(scenario, rank, port, out), daemon=True) for rank in (0, 1)]
    deadline = time.monotonic() + PAIR_TIMEOUT_S
    results: dict[int, Any] = {}
    grace_s = 0.0  # on any failure, kill at once
    try:
        for p in procs:
            p.start()
        while not set(wait_for) <= results.keys():
            try:
                rank, status, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_lib.Empty:
                missing = sorted(set(wait_for) - results.keys())
                raise AssertionError(f"ranks {missing} did not report in {PAIR_TIMEOUT_S} s") from None
            assert status == "ok", f"rank {rank} failed: {value}"
            results[rank] = value
        grace_s = 10.0  # they have reported: let them finish exiting
    finally:
        _stop([procs[r] for r in wait_for], grace_s)
        _stop(procs, 0.0)
    return results


def _stop(procs: list[Any], grace_s: float) -> None:
    """Join ``procs`` for up to ``grace_s`` in all, then kill those still alive; leave none behind."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        if p.pid is not None:  # started
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        if p.pid is not None:
            p.join()


def _transport(rank: int, port: int, timeout_s: float = PAIR_TIMEOUT_S) -> Transport:
    return Transport(rank, 2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=timeout_s)


# -- the messages of the ordering tests -----------------------------------------------------------
def expected_messages() -> list[dict[str, Any]]:
    """A fixed stream as a stage sends it: two TRAIN steps, an EVAL batch, an EVAL_END."""
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[list[int], list[list[float]]]:
        labels = torch.randint(0, 10, (BATCH,), generator=g)
        return labels.tolist(), torch.randn(BATCH, FEATURES, generator=g).tolist()

    msgs = []
    for kind, step, extra in [(Kind.TRAIN, 0, 0), (Kind.TRAIN, 1, 0), (Kind.EVAL, 2, 1)]:
        labels, payload = batch()
        msgs.append({"kind": int(kind), "step": step, "extra": extra, "labels": labels, "payload": payload})
    msgs[2]["labels"][-1] = -1  # an EVAL batch pads with label -1
    # EVAL_END carries placeholder labels (the receiver always expects BATCH of them) and no payload.
    msgs.append({"kind": int(Kind.EVAL_END), "step": 3, "extra": 1, "labels": [0] * BATCH, "payload": None})
    return msgs


def _send(transport: Transport, tag: Tag, m: dict[str, Any]) -> None:
    payload = None if m["payload"] is None else torch.tensor(m["payload"], dtype=torch.float32)
    transport.send(1, tag, Kind(m["kind"]), m["step"], payload, labels=torch.tensor(m["labels"]), extra=m["extra"])


def _recv(transport: Transport, tag: Tag) -> dict[str, Any]:
    msg = transport.recv(0, tag, payload_shape=(BATCH, FEATURES), labels=BATCH)
    return {
        "kind": int(msg.kind),
        "step": msg.step,
        "extra": msg.extra,
        "labels": None if msg.labels is None else msg.labels.tolist(),
        "payload": None if msg.payload is None else msg.payload.tolist(),
    }


# -- scenarios (top level, so that spawn can pickle them) ------------------------------------------
# The scenarios with a healthy peer share one process pair and one Transport, in
# sequence: starting a pair (two interpreters importing torch) costs more than all
# of them together. Each consumes all it sends before the next begins.
def stream_on_one_tag(transport: Transport, rank: int) -> list[dict[str, Any]] | None:
    if rank == 0:
        for m in expected_messages():
            _send(transport, Tag.DOWN, m)
        transport.flush()
        return None
    return [_recv(transport, Tag.DOWN) for _ in expected_messages()]


def streams_on_two_tags(transport: Transport, rank: int) -> dict[str, list[dict[str, Any]]] | None:
    """Rank 0 sends all of DOWN, then all of UP; rank 1 reads UP first, then DOWN."""
    msgs = expected_messages()
    if rank == 0:
        for m in msgs:
            _send(transport, Tag.DOWN, m)
        for m in reversed(msgs):
            _send(transport, Tag.UP, m)
        transport.flush()
        return None
    up = [_recv(transport, Tag.UP) for _ in msgs]
    down = [_recv(transport, Tag.DOWN) for _ in msgs]
    return {"up": up, "down": down}


def many_messages(transport: Transport, rank: int) -> dict[str, Any]:
    """Rank 0 queues many messages without waiting for them; rank 1 takes them all."""
    n = MANY
    if rank == 0:
        most = 0
        for step in range(n):
            transport.send(1, Tag.DOWN, Kind.TRAIN, step, torch.full((BATCH, FEATURES), float(step)))
            most = max(most, transport.queued)
        transport.flush()
        return {"most_queued": most, "queued_after_flush": transport.queued}
    got = [transport.recv(0, Tag.DOWN, payload_shape=(BATCH, FEATURES)) for _ in range(n)]
    return {"steps": [m.step for m in got], "firsts": [m.payload[0, 0].item() for m in got]}


def ping_pong_both_ends(transport: Transport, rank: int) -> float:
    return transport.ping_pong(1 - rank, (64, 64), initiator=rank == 0, rounds=5)


HEALTHY_SCENARIOS = (stream_on_one_tag, streams_on_two_tags, many_messages, ping_pong_both_ends)


def healthy_scenarios(rank: int, port: int) -> dict[str, Any]:
    """Every scenario of :data:`HEALTHY_SCENARIOS` in turn, by name."""
    transport = _transport(rank, port)
    try:
        return {scenario.__name__: scenario(transport, rank) for scenario in HEALTHY_SCENARIOS}
    finally:
        transport.close()


def _handshake(transport: Transport, rank: int) -> None:
    """Make sure both ranks are past set-up before one of them goes quiet or dies."""
    if rank == 0:
        transport.send(1, Tag.DOWN, Kind.TRAIN, 0)
        transport.flush()
    else:
        transport.recv(0, Tag.DOWN, payload_shape=None)


def _receive_until_error(transport: Transport) -> dict[str, Any]:
    start = time.monotonic()
    try:
        transport.recv(1, Tag.UP, payload_shape=(BATCH, FEATURES))
    except Exception as e:  # what the test is about: the error, and how long it took
        return {"raised": type(e).__name__, "message": str(e)[:300], "seconds": time.monotonic() - start}
    return {"raised": None, "seconds": time.monotonic() - start}


def peer_dies(rank: int, port: int) -> dict[str, Any] | None:
    transport = _transport(rank, port, timeout_s=SHORT_TIMEOUT_S)
    _handshake(transport, rank)
    if rank == 1:
        os._exit(0)  # die without closing: sockets drop, nothing more is sent
    try:
        return _receive_until_error(transport)
    finally:
        transport.close()


def peer_goes_silent(rank: int, port: int) -> dict[str, Any] | None:
    transport = _transport(rank, port, timeout_s=SHORT_TIMEOUT_S)
    _handshake(transport, rank)
    if rank == 1:
        time.sleep(PAIR_TIMEOUT_S)  # alive but never sends; the test kills it
        return None
    try:
        return _receive_until_error(transport)
    finally:
        transport.close()


# -- tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def healthy() -> dict[int, dict[str, Any]]:
    """Each rank's results of :func:`healthy_scenarios`."""
    return run_pair(healthy_scenarios)


def test_messages_arrive_intact_and_in_order(healthy: dict[int, dict[str, Any]]) -> None:
    # Exact: float32 -> Python float -> float32 is lossless.
    assert healthy[1]["stream_on_one_tag"] == expected_messages()


def test_two_tags_keep_independent_order(healthy: dict[int, dict[str, Any]]) -> None:
    received = healthy[1]["streams_on_two_tags"]
    msgs = expected_messages()
    assert received["down"] == msgs
    assert received["up"] == list(reversed(msgs))


def test_queued_sends_are_released_and_every_message_arrives(healthy: dict[int, dict[str, Any]]) -> None:
    sender, receiver = healthy[0]["many_messages"], healthy[1]["many_messages"]
    assert sender["most_queued"] <= 2 * MANY  # a header and a payload each, until taken
    assert sender["queued_after_flush"] == 0  # the reaper released every taken send
    assert receiver["steps"] == list(range(MANY))
    assert receiver["firsts"] == [float(s) for s in range(MANY)]


def test_ping_pong_returns_positive_finite_latency_at_both_ends(healthy: dict[int, dict[str, Any]]) -> None:
    for rank in (0, 1):
        ms = healthy[rank]["ping_pong_both_ends"]
        assert 0 < ms < math.inf, f"rank {rank}: {ms}"


def test_receiver_fails_fast_when_peer_dies() -> None:
    result = run_pair(peer_dies, wait_for=(0,))[0]
    assert result["raised"] is not None, "recv returned although the peer died"
    assert result["seconds"] < SHORT_TIMEOUT_S + 5, result


def test_receiver_times_out_when_peer_never_sends() -> None:
    result = run_pair(peer_goes_silent, wait_for=(0,))[0]
    assert result["raised"] is not None, "recv returned although the peer sent nothing"
    # The configured timeout bounds the wait: not much sooner, not much later.
    assert SHORT_TIMEOUT_S - 0.5 < result["seconds"] < SHORT_TIMEOUT_S + 5, result


# -- the benchmark's pure parts ------------------------------------------------------------------------
def test_summarize_takes_median_and_nearest_rank_p90() -> None:
    assert summarize([float(v) for v in range(10, 0, -1)]) == {"median_ms": 5.5, "p90_ms": 9.0, "rounds": 10}
    assert summarize([2.0]) == {"median_ms": 2.0, "p90_ms": 2.0, "rounds": 1}


def test_importing_the_benchmark_does_not_import_ray() -> None:
    code = "import sys, workers.transport_bench; print('ray' in sys.modules)"
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "False"
