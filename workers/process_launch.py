"""Run the stage workers as plain local processes, without Ray.

The same :class:`~workers.stage_runner.StageRunner` loop and data plane as under
Ray, started with ``torch.multiprocessing``: for tests, and for machines where
Ray is not installed (the GPU check runs NCCL this way).
"""

from __future__ import annotations

import io
import queue
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

from dni.config import Config, config_from_dict
from workers.plan import Plan, build_runner, make_plan
from workers.transport import free_port


def _device_for(rank: int, use_cuda: bool) -> torch.device:
    if use_cuda:
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _worker(rank: int, cfg_dict: dict[str, Any], plan: Plan, init_method: str, use_cuda: bool, keep_true: int,
            results: Any, start: dict[str, Any]) -> None:
    try:
        torch.set_num_threads(1)
        cfg = config_from_dict(cfg_dict)
        device = _device_for(rank, use_cuda)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        own_gpu = device.type == "cuda" and torch.cuda.device_count() >= plan.topology.world_size
        runner = build_runner(cfg, plan, rank, init_method=init_method, device=device, own_gpu=own_gpu,
                              keep_true_gradients=keep_true)
        if start["state"] is not None:
            runner.restore(torch.load(io.BytesIO(start["state"]), weights_only=True))
        for step, where in start["faults"]:
            runner.inject_fault(step, where)
        hops = runner.measure_hops()
        totals = runner.run(start["step"])
        # Tensors go as bytes: a tensor shared through the queue would die with this process.
        results.put((rank, {"pickled": _to_bytes({
            "totals": totals, "hops": hops, "metrics": runner.drain_metrics(),
            "saved": runner.saved, "kept": runner.kept, "true_gradients": runner.true_gradients,
        })}))
        runner.transport.close()
    except BaseException:
        results.put((rank, {"error": traceback.format_exc()}))


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _check_alive(procs: list[Any], done: dict[int, Any]) -> None:
    """Raise if a worker process died without reporting (killed, or crashed at start)."""
    for rank, p in enumerate(procs):
        if rank not in done and not p.is_alive() and p.exitcode not in (None, 0):
            raise RuntimeError(f"stage process {rank} died with exit code {p.exitcode} before reporting")


def launch_processes(cfg: Config, *, use_cuda: bool = False, keep_true_gradients: int = 0,
                     timeout_s: float = 300.0, start_step: int = 0, states: list[dict[str, Any]] | None = None,
                     faults: dict[int, list[tuple[int, str]]] | None = None) -> list[dict[str, Any]]:
    """Run the whole pipeline of ``cfg`` in local processes; return each rank's results, by rank.

    Call it under ``if __name__ == "__main__":`` in a script: workers are spawned. ``states``
    (one per rank, kept at the checkpoint boundary ``start_step``) restores a pipeline there;
    ``faults`` maps a rank to ``(step, where)`` injections (see ``StageRunner.inject_fault``).

    Raises:
        RuntimeError: a worker failed (its traceback is in the message) or the run
            exceeded ``timeout_s``.
    """
    plan = make_plan(cfg)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    starts = [{"step": start_step, "state": _to_bytes(states[r]) if states is not None else None,
               "faults": (faults or {}).get(r, [])} for r in range(plan.topology.world_size)]
    procs = [ctx.Process(target=_worker, args=(r, cfg.to_dict(), plan, init, use_cuda, keep_true_gradients, results,
                                               starts[r]))
             for r in range(plan.topology.world_size)]
    for p in procs:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < len(procs):
            try:
                rank, res = results.get(timeout=1.0)
            except queue.Empty:
                _check_alive(procs, out)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stage processes did not finish within {timeout_s:g} s") from None
                continue
            if "error" in res:
                raise RuntimeError(f"stage process {rank} failed:\n{res['error']}")
            out[rank] = torch.load(io.BytesIO(res["pickled"]), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(len(procs))]
