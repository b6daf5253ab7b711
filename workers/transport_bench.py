"""One hop of a stage-to-stage tensor: the dni data plane against Ray's object store.

Measures, in one run and on the same machine, the one-way latency (round trip / 2)
of float32 activations between two processes:

* ``dni tensor``: a bare tensor over the dni data plane (torch.distributed gloo
  send/recv on :data:`Tag.PING`, the pattern of :meth:`Transport.ping_pong`);
* ``dni message``: what a stage really sends, :meth:`Transport.send` of a TRAIN
  message (header + labels, then the payload) answered by a TARGET message of the
  same shape, each side using :meth:`Transport.recv`;
* ``dni message, flushed``: the same, with :meth:`Transport.flush` after each round
  trip (separates the cost of the sends the Transport keeps queued);
* ``ray object store``: actor A calls ``B.echo.remote(tensor)`` and ``ray.get``'s
  the result, so the tensor goes A -> object store -> B and back; once as Ray
  serializes tensors by default, once with its opt-in zero-copy tensor
  serialization (``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in the actors).

Run ``python -m workers.transport_bench --out results/transport``; it writes
``transport.json`` there and prints a markdown table. Importing this module does
not import Ray (only :func:`measure_ray` does).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import queue as queue_lib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from workers.transport import HEADER, Kind, Tag, Transport, free_port, round_trip

Shape = tuple[int, ...]

SHAPES: tuple[Shape, ...] = ((128, 256), (256, 1024), (512, 2048))
REFERENCE_SHAPE: Shape = (256, 1024)  # 1 MiB: the size the target is stated for
TARGET_MEDIAN_MS = 1.0  # target: one hop of the reference activation over the dni data plane
TRANSPORTS = (
    "dni tensor",
    "dni message",
    "dni message, flushed",
    "ray object store",
    "ray object store, zero-copy tensors",
)


# -- statistics ------------------------------------------------------------------------
def summarize(one_way_ms: Sequence[float]) -> dict[str, float]:
    """Median and p90 (nearest rank) of one-way latencies in ms.

    Raises:
        ValueError: if ``one_way_ms`` is empty.
    """
    if not one_way_ms:
        raise ValueError("no latencies to summarize: run at least one round")
    ordered = sorted(one_way_ms)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median_ms": statistics.median(ordered), "p90_ms": p90, "rounds": len(ordered)}


def time_rounds(round_trip: Callable[[], None], *, rounds: int, warmup: int) -> list[float]:
    """One-way ms (round trip / 2) of each of ``rounds`` calls, after ``warmup`` untimed ones.

    The warm-up rounds absorb connection setup and first-touch allocations.
    """
    for _ in range(warmup):
        round_trip()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        round_trip()
        times.append((time.perf_counter() - start) * 1000 / 2)
    return times


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _busy_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of all CPU ticks between two :func:`_cpu_ticks` samples that were busy."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def measure_rounds(round_trip: Callable[[], None], *, rounds: int, warmup: int) -> dict[str, Any]:
    """:func:`summarize` of :func:`time_rounds`, plus how busy the machine was meanwhile.

    ``machine_busy_percent`` counts every process on every core during the timed
    rounds, the two ends of the hop included (back-to-back round trips keep them
    busy too: 50-75% of this 2-core machine when nothing else runs). Near 100%,
    other work competed for the cores and the latencies include waits for a core.
    """
    before = _cpu_ticks()
    times = time_rounds(round_trip, rounds=rounds, warmup=warmup)
    return {**summarize(times), "machine_busy_percent": _busy_percent(before, _cpu_ticks())}


def payload_bytes(shape: Shape) -> int:
    """Bytes of a float32 tensor of ``shape``."""
    return math.prod(shape) * 4


def message_bytes(shape: Shape) -> int:
    """Bytes of a TRAIN message: int64 header with one label per row, then the payload."""
    return (HEADER + shape[0]) * 8 + payload_bytes(shape)


# -- (a) the dni data plane ------------------------------------------------------------------
def _tensor_round_trip(buf: torch.Tensor, peer: int, initiator: bool) -> Callable[[], None]:
    """A bare tensor there and back on Tag.PING, as :meth:`Transport.ping_pong` does it."""

    return lambda: round_trip(buf, peer, initiator=initiator)


def _message_round_trip(
    transport: Transport, shape: Shape, peer: int, initiator: bool, *, flush: bool
) -> Callable[[], None]:
    """A TRAIN message (labels + activation) down, a TARGET message (gradient) back up.

    With ``flush``, each end waits on its queued sends after every round trip (they
    have been received by then, so the wait itself is short); without it, sends stay
    queued in the Transport until their receiver takes them, as they do in a stage.
    """
    activation = torch.randn(shape)  # (B, features)
    labels = torch.randint(0, 10, (shape[0],))  # (B,)
    step = iter(range(1 << 62))

    def round_trip() -> None:
        if initiator:
            transport.send(peer, Tag.DOWN, Kind.TRAIN, next(step), activation, labels=labels)
            transport.recv(peer, Tag.UP, payload_shape=shape)
        else:
            msg = transport.recv(peer, Tag.DOWN, payload_shape=shape, labels=shape[0])
            transport.send(peer, Tag.UP, Kind.TARGET, msg.step, msg.payload)
        if flush:
            transport.flush()

    return round_trip


def _dni_worker(rank: int, port: int, shapes: list[Shape], rounds: int, warmup: int, out: Any) -> None:
    """One end of the dni measurement.

    Rank 0 puts ``("ok", {shape: {transport: stats}})`` on ``out``; a rank that fails
    puts ``("error", message)`` so that the parent stops waiting at once.
    """
    try:
        results = _dni_measure(rank, port, shapes, rounds, warmup)
    except BaseException as e:
        out.put(("error", f"rank {rank}: {type(e).__name__}: {e}"))
        raise
    if rank == 0:
        out.put(("ok", results))


def _dni_measure(rank: int, port: int, shapes: list[Shape], rounds: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Both ends run this in step; rank 0's timings are the result."""
    torch.set_num_threads(1)  # two processes on two cores: leave each its own core
    transport = Transport(rank, 2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=60)
    initiator, peer = rank == 0, 1 - rank
    counts = {"rounds": rounds, "warmup": warmup}
    results: dict[str, dict[str, Any]] = {}
    try:
        for shape in shapes:
            tensor = measure_rounds(_tensor_round_trip(torch.zeros(shape), peer, initiator), **counts)
            message = measure_rounds(_message_round_trip(transport, shape, peer, initiator, flush=False), **counts)
            queued = transport.queued  # sends the Transport still holds after those rounds
            transport.flush()
            flushed = measure_rounds(_message_round_trip(transport, shape, peer, initiator, flush=True), **counts)
            # Transport's own measurement, kept as a cross-check of the loop above.
            ping_pong = transport.ping_pong(peer, shape, initiator=initiator, rounds=rounds)
            results[_key(shape)] = {
                "dni tensor": {**tensor, "bytes": payload_bytes(shape), "ping_pong_median_ms": ping_pong},
                "dni message": {**message, "bytes": message_bytes(shape), "queued_sends_at_end": queued},
                "dni message, flushed": {**flushed, "bytes": message_bytes(shape)},
            }
    finally:
        transport.close()
    return results


def measure_dni(
    shapes: Sequence[Shape], *, rounds: int, warmup: int, timeout_s: float = 300.0
) -> dict[str, dict[str, Any]]:
    """Latencies over the dni data plane between two freshly spawned processes.

    Raises:
        RuntimeError: if a worker fails or no result arrives within ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dni_worker, args=(r, port, list(shapes), rounds, warmup, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        status, value = out.get(timeout=timeout_s)
    except queue_lib.Empty:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"dni workers gave no result in {timeout_s} s (exit codes {codes}): see their stderr") from None
    finally:
        _reap(procs)
    if status != "ok":
        raise RuntimeError(f"dni measurement failed: {value}")
    return value


def _reap(procs: Sequence[Any], grace_s: float = 10.0) -> None:
    """Join ``procs``, killing any still alive after ``grace_s`` (never leave a process behind)."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


# -- (b) Ray's object store ---------------------------------------------------------------------
# Ray pickles torch tensors through torch's own reducer (a copy into a byte stream)
# unless this opt-in variable is set in the worker, in which case a CPU tensor goes
# into the object store as a raw buffer and is read back as a zero-copy view.
ZERO_COPY_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
RAY_VARIANTS = {"ray object store": False, "ray object store, zero-copy tensors": True}


class Echo:
    """Ray actor body: returns what it is given (the far end of a hop)."""

    def setup(self) -> bool:
        """Prepare this worker; returns whether it serializes tensors zero-copy.

        Silences the warnings zero-copy serialization raises on every tensor: the
        benchmark only reads the (read-only) tensors it receives.
        """
        import warnings

        from ray._private import ray_constants

        warnings.filterwarnings("ignore", message=".*(non-writable|Zero-copy tensor serialization).*")
        return bool(ray_constants.RAY_ENABLE_ZERO_COPY_TORCH_TENSORS)

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Pinger(Echo):
    """Ray actor body: times tensors sent to an :class:`Echo` actor and back."""

    def ping_pong(self, echo: Any, shape: Shape, rounds: int, warmup: int) -> dict[str, Any]:
        """:func:`measure_rounds` of round trips through ``echo`` (an Echo actor handle)."""
        import ray

        x = torch.zeros(shape)

        def round_trip() -> None:
            ray.get(echo.echo.remote(x))

        return measure_rounds(round_trip, rounds=rounds, warmup=warmup)


def measure_ray(
    shapes: Sequence[Shape], *, rounds: int, warmup: int, timeout_s: float = 300.0
) -> dict[str, dict[str, Any]]:
    """Latencies through Ray's object store between two actors of a fresh local cluster.

    Measures each of :data:`RAY_VARIANTS` with its own pair of actors. Starts Ray
    (2 logical CPUs, no dashboard, bound to 127.0.0.1) and shuts it down before
    returning, whatever happens.

    Raises:
        RuntimeError: if an actor's serialization mode is not the one asked for.
    """
    import logging

    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        results: dict[str, dict[str, Any]] = {}
        for name, zero_copy in RAY_VARIANTS.items():
            # num_cpus=0 for the actors: a pair per variant, the old pair still alive, on 2 logical CPUs.
            options = {"num_cpus": 0, "runtime_env": {"env_vars": {ZERO_COPY_ENV: "1" if zero_copy else "0"}}}
            # Any: ray types a handle ActorHandle[T] | type[T], whose methods (no @ray.method) lack .remote.
            pinger: Any = ray.remote(Pinger).options(**options).remote()
            echo: Any = ray.remote(Echo).options(**options).remote()
            # An actor that cannot be placed waits silently: bound every get.
            modes = ray.get([pinger.setup.remote(), echo.setup.remote()], timeout=timeout_s)
            if modes != [zero_copy, zero_copy]:
                raise RuntimeError(f"{name}: actors report zero-copy {modes}, expected {zero_copy}")
            for shape in shapes:
                stats = ray.get(pinger.ping_pong.remote(echo, shape, rounds, warmup), timeout=timeout_s)
                results.setdefault(_key(shape), {})[name] = {**stats, "bytes": payload_bytes(shape)}
            for actor in (pinger, echo):
                ray.kill(actor)
        return results
    finally:
        ray.shutdown()


# -- report -----------------------------------------------------------------------------------
def _key(shape: Shape) -> str:
    return "x".join(map(str, shape))


def _version(package: str) -> str | None:
    """Installed version of ``package`` without importing it (None if absent)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """HEAD of the repository this file lives in, with ``-dirty`` if the tree has changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine_busy_percent(seconds: float = 2.0) -> float | None:
    """How busy all cores of the machine are over the next ``seconds`` (None off Linux)."""
    before = _cpu_ticks()
    time.sleep(seconds)
    return _busy_percent(before, _cpu_ticks())


def environment() -> dict[str, Any]:
    """What the numbers depend on: versions, CPUs, accelerator, commit, date, load."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": _version("ray"),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_1_5_15": list(os.getloadavg()),
        "machine_busy_percent_before_run": machine_busy_percent(),  # other work, before ours starts
    }


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per shape and transport: median, p90, bytes per hop, machine load meanwhile."""
    lines = [
        "| shape (float32) | transport | median ms | p90 ms | bytes per hop | machine busy % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for shape, by_transport in results.items():
        for name in TRANSPORTS:
            if name in by_transport:
                r = by_transport[name]
                busy = "" if r["machine_busy_percent"] is None else f"{r['machine_busy_percent']:.0f}"
                lines.append(f"| {shape} | {name} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['bytes']:,} | {busy} |")
    return "\n".join(lines)


def target_verdict(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether one hop of the reference activation over the dni data plane meets the target."""
    key = _key(REFERENCE_SHAPE)
    dni = ("dni tensor", "dni message", "dni message, flushed")
    measured = {name: results[key][name]["median_ms"] for name in dni if name in results.get(key, {})}
    return {
        "shape": key,
        "max_median_ms": TARGET_MEDIAN_MS,
        "median_ms": measured,
        "met": {name: ms <= TARGET_MEDIAN_MS for name, ms in measured.items()},
    }


def _merge(into: dict[str, dict[str, Any]], more: dict[str, dict[str, Any]]) -> None:
    for shape, by_transport in more.items():
        into.setdefault(shape, {}).update(by_transport)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m workers.transport_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/transport"), help="folder for transport.json")
    p.add_argument("--rounds", type=int, default=50, help="timed round trips per shape and transport")
    p.add_argument("--warmup", type=int, default=5, help="untimed round trips before them")
    p.add_argument("--no-ray", action="store_true", help="measure the dni data plane only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be at least 1 and --warmup at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, write ``<out>/transport.json``, print the table; returns the exit status."""
    args = parse_args(argv)
    env_before = environment()
    results: dict[str, dict[str, Any]] = {}
    _merge(results, measure_dni(SHAPES, rounds=args.rounds, warmup=args.warmup))
    if not args.no_ray:
        _merge(results, measure_ray(SHAPES, rounds=args.rounds, warmup=args.warmup))
    report = {
        "what": "one-way latency (round trip / 2) of a float32 tensor between two processes",
        "rounds": args.rounds,
        "warmup": args.warmup,
        "results": results,
        "target": target_verdict(results),
        "environment": env_before,
        "loadavg_after": list(os.getloadavg()),
        "command": "python -m workers.transport_bench " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transport.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(results))
    verdict = report["target"]
    print(f"\ntarget: one hop of {verdict['shape']} float32 over the dni data plane, median <= {TARGET_MEDIAN_MS} ms")
    for name, ms in verdict["median_ms"].items():
        print(f"  {name}: {ms:.3f} ms, {'met' if verdict['met'][name] else 'NOT met'}")
    print(f"machine busy before the run: {env_before['machine_busy_percent_before_run']}% of all cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
