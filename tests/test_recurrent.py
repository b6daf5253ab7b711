"""Truncated BPTT with a synthesizer at the segment boundary (``model.kind: lstm``, paper section 3.2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import crash_and_resume, losses, tiny_config
from dni.build import recurrent_pipeline
from dni.config import ConfigError
from dni.data import ArrayDataset, Splits
from dni.data.spec import DataSpec
from dni.recurrent import RecurrentPipeline, flatten_state, unflatten_state
from dni.run import create_run_dir
from dni.schedule import StreamBatches, stream_order
from dni.trainer import Trainer
from test_pipeline import OracleSynthesizer

VOCAB, T, B = 6, 4, 3
TOKENS = DataSpec((T,), VOCAB, torch.int64, (T,), torch.int64)


def lstm(method: str = "dni", **sections: dict) -> dict:
    """Sections of a 2-layer LSTM with a linear synthesizer; ``sections`` replace whole sections."""
    return {**dict(method=method, model={"kind": "lstm", "depth": 2, "width": 8, "bptt": T},
                   data={"name": "text", "path": "unused.txt", "val_size": 0},
                   train={"epochs": 1, "batch_size": B, "lr": 1e-2, "schedule": "constant"},
                   synthesizer={"hidden_layers": 0}, log={"every": 1, "grad_every": 0, "progress": False}), **sections}


def pipeline(method: str = "dni", *, steps_per_epoch: int = 100, dtype: torch.dtype = torch.float32) -> RecurrentPipeline:
    p = recurrent_pipeline(tiny_config(**lstm(method)), TOKENS, total_steps=100, device=torch.device("cpu"),
                           steps_per_epoch=steps_per_epoch)
    p.stages[0].module.to(dtype)
    return p


def stream(segments: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """B streams of ``segments * T`` tokens and their next tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, segments * T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def grads_of(p: RecurrentPipeline) -> dict[str, torch.Tensor]:
    return {n: q.grad.clone() for n, q in p.model.named_parameters()}


def captured(p: RecurrentPipeline) -> list[dict[str, torch.Tensor]]:
    """Each step's parameter gradients, captured before the optimiser step."""
    out: list[dict[str, torch.Tensor]] = []
    p.stages[0].optimizer.register_step_pre_hook(lambda *_: out.append(grads_of(p)))
    return out


def test_the_state_flattens_per_example_and_back() -> None:
    h, c = torch.randn(2, B, 8), torch.randn(2, B, 8)
    flat = flatten_state((h, c))
    assert flat.shape == (B, 32)
    torch.testing.assert_close(flat[1, :8], h[0, 1])  # example 1's layer-0 h comes first
    back = unflatten_state(flat, 2)
    torch.testing.assert_close(back[0], h, rtol=0, atol=0)
    torch.testing.assert_close(back[1], c, rtol=0, atol=0)


def test_an_oracle_at_the_boundary_makes_truncated_bptt_equal_full_bptt_over_both_segments() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        p = pipeline(dtype=torch.float64)
        x, y = stream(2)
        # Full BPTT over both segments: L1 + L2, each a segment's mean loss, as the pipeline sums them.
        model = p.model
        logits, _ = model(x)
        loss_fn = p.stages[0].loss_fn
        total = loss_fn(logits[:, :T], y[:, :T]) + loss_fn(logits[:, T:], y[:, T:])
        want = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(total, list(model.parameters()))))
        # The true gradient of segment 2's loss with respect to the state at the boundary.
        _, boundary = model(x[:, :T])
        s = flatten_state(boundary).detach().requires_grad_(True)
        tail, _ = model(x[:, T:], unflatten_state(s, 2))
        (true_grad,) = torch.autograd.grad(loss_fn(tail, y[:, T:]), [s])
        oracle = OracleSynthesizer().double()
        p.stages[0].synthesizer = oracle
        p.stages[0].options = type(p.stages[0].options)(lr=0.0)  # gradients only: the weights must not move
        steps = captured(p)
        oracle.true_grad = true_grad
        p.train_step(x[:, :T], y[:, :T])
        oracle.true_grad = torch.zeros_like(true_grad)  # nothing after segment 2
        p.train_step(x[:, T:], y[:, T:])
    finally:
        torch.set_default_dtype(torch.float32)
    for name, g in want.items():
        torch.testing.assert_close(steps[0][name] + steps[1][name], g, rtol=1e-10, atol=1e-12)


def test_plain_truncation_detaches_the_state_and_learns_only_from_its_segment() -> None:
    p = pipeline("backprop")
    x, y = stream(2)
    p.stages[0].options = type(p.stages[0].options)(lr=0.0)
    steps = captured(p)
    p.train_step(x[:, :T], y[:, :T])
    p.train_step(x[:, T:], y[:, T:])
    model, loss_fn = p.model, p.stages[0].loss_fn
    _, boundary = model(x[:, :T])
    tail, _ = model(x[:, T:], (boundary[0].detach(), boundary[1].detach()))  # the carried, detached state
    want = torch.autograd.grad(loss_fn(tail, y[:, T:]), list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), want):
        torch.testing.assert_close(steps[1][name], g, rtol=1e-5, atol=1e-7)


def test_the_synthesizer_learns_the_bootstrapped_target_from_the_next_segment() -> None:
    p = pipeline()
    trained: list[tuple[torch.Tensor, torch.Tensor]] = []
    stage = p.stages[0]
    stage.train_synthesizer = lambda h, labels, target: trained.append((h, target)) or 0.0  # type: ignore[method-assign]
    x, y = stream(3)
    p.stages[0].options = type(p.stages[0].options)(lr=0.0)
    for k in range(3):
        p.train_step(x[:, k * T:(k + 1) * T], y[:, k * T:(k + 1) * T])
    assert len(trained) == 2  # boundaries 1 and 2; segment 1 starts from zeros, predicted by nobody
    model, loss_fn = p.model, stage.loss_fn
    _, first = model(x[:, :T])
    torch.testing.assert_close(trained[0][0], flatten_state(first).detach())
    s = flatten_state(first).detach().requires_grad_(True)
    _, second = model(x[:, T:2 * T], unflatten_state(s, 2))
    logits, second = model(x[:, T:2 * T], unflatten_state(s, 2))
    synthetic = stage.synthesizer(flatten_state(second).detach()).detach() / B  # type: ignore[misc]
    objective = loss_fn(logits, y[:, T:2 * T]) + (flatten_state(second) * synthetic).sum()
    (target,) = torch.autograd.grad(objective, [s])
    torch.testing.assert_close(trained[0][1], target, rtol=1e-5, atol=1e-8)


def test_streams_are_read_in_order_and_start_over_each_epoch() -> None:
    assert stream_order(7, 3).tolist() == [0, 2, 4, 1, 3, 5]  # streams [0, 1], [2, 3], [4, 5]; 6 left out
    windows = torch.arange(12)[:, None].expand(12, T).contiguous()
    batches = StreamBatches(ArrayDataset(windows, windows, 12), B)
    assert batches.steps_per_epoch == 4
    assert [batches(j)[0][:, 0].tolist() for j in range(5)] == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11], [0, 4, 8]]
    p = pipeline(steps_per_epoch=2)
    p.stages[0].options = type(p.stages[0].options)(lr=0.0)
    x, y = stream(3)
    for k in range(3):
        p.train_step(x[:, k * T:(k + 1) * T], y[:, k * T:(k + 1) * T])
        if k == 1:
            assert p.carried_state()
    assert "boundary" in p.carried_state()
    # Step 2 began epoch 2 from a zero state: its boundary is what segment 3 makes from zeros.
    _, fresh = p.model(x[:, 2 * T:])
    torch.testing.assert_close(p.carried_state()["h"], fresh[0].detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("change, message", [
    ({"method": "cdni"}, r"method: an LSTM trains with backprop .* or dni"),
    ({"backend": "ray"}, r"backend: an LSTM is one stage.*set backend=local"),
    ({"sync": {"true_every": 5}}, r"sync\.true_every: true-gradient rounds need the gradient from the future"),
    ({"data": {"name": "text", "path": "x.txt", "val_size": 0, "context": 9}}, r"data\.context=9 must equal model\.bptt=4"),
    ({"model": {"kind": "lstm", "depth": 1, "width": 8}}, r"model\.bptt: an LSTM needs its truncation window"),
    ({"model": {"kind": "fcn", "bptt": 4}}, r"model\.bptt: only for model\.kind=lstm"),
])
def test_what_truncated_bptt_cannot_honour_is_a_config_error(change: dict, message: str) -> None:
    sections = lstm()
    sections.update(change)
    with pytest.raises(ConfigError, match=message):
        tiny_config(**sections)


def text_splits(n: int = 96) -> Splits:
    """Windows of a repeating 5-token pattern, consecutive, as the text loader lays them out."""
    ids = torch.arange(n * T + 1) % 5
    index = torch.arange(n)[:, None] * T + torch.arange(T + 1)
    chunk = ids[index]
    data = ArrayDataset(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous(), VOCAB)
    return Splits(train=data, val=data.subset(torch.arange(24)), test=data.subset(torch.arange(24, 48)))


def test_a_dni_lstm_learns_a_pattern_measures_its_synthesizer_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = tiny_config(**lstm(log={"dir": str(tmp_path), "every": 1, "grad_every": 4, "progress": False},
                             train={"epochs": 4, "batch_size": B, "lr": 3e-2, "schedule": "constant"},
                             checkpoint={"every": 40}))
    full = Trainer(cfg, create_run_dir(cfg), splits=text_splits())
    summary = full.fit()
    assert summary["test_accuracy"] > 0.95, summary  # the pattern, once the state knows the phase
    assert "sg/cosine/stage_0" in full.logger.latest  # type: ignore[union-attr]
    # after the checkpoint of step 40, mid-epoch (32 steps per epoch)
    interrupted, resumed = crash_and_resume(cfg, text_splits, at=50)
    assert resumed.step == 40 and resumed.fit()["test_accuracy"] == summary["test_accuracy"]
    assert losses(interrupted.run_dir) == losses(full.run_dir)
