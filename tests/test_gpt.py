"""The GPT-style character LM (``model.kind: gpt``) cut into stages, on text data, on both backends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import losses, metric_rows, tiny_config, train_locally
from dni.build import build_pipeline
from dni.cli import main
from dni.config import ConfigError
from dni.data.spec import DataSpec
from dni.models import activation_shapes, build_stages
from dni.synthesizer import TokenSynthesizer
from test_pipeline import assert_oracles_give_backprop

ROOT = Path(__file__).resolve().parents[1]
VOCAB, CONTEXT = 7, 8
TOKENS = DataSpec((CONTEXT,), VOCAB, torch.int64, (CONTEXT,), torch.int64)


def gpt(**model: object) -> dict:
    """Sections of a 3-block GPT cut after block 0 and after block 1."""
    return {"model": {"kind": "gpt", "depth": 3, "width": 16, "heads": 2, "boundaries": [1, 2], **model}}


def token_batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, CONTEXT), generator=g)
    return x, torch.roll(x, -1, dims=1)


def run_stages(stages: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    for s in stages:
        x = s(x)
    return x


def test_stages_pass_the_residual_stream_and_end_in_logits_over_the_vocabulary() -> None:
    stages = build_stages(tiny_config(**gpt()).model, (CONTEXT,), VOCAB, seed=0)
    assert len(stages) == 3
    assert activation_shapes(stages, (CONTEXT,), dtype=torch.int64) == [(CONTEXT, 16), (CONTEXT, 16), (CONTEXT, VOCAB)]


def test_attention_is_causal_across_stages() -> None:
    stages = [s.eval() for s in build_stages(tiny_config(**gpt()).model, (CONTEXT,), VOCAB, seed=0)]
    x, _ = token_batch()
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = run_stages(stages, x), run_stages(stages, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)  # positions before 5 cannot see it
    assert (a[:, 5:] - b[:, 5:]).abs().amax() > 1e-4


def test_a_gpt_needs_token_sequences_and_heads_that_divide_the_width() -> None:
    with pytest.raises(ConfigError, match=r"a GPT reads token ids, one sequence \(T,\) per example.*data\.name=text"):
        build_stages(tiny_config(**gpt()).model, (1, 4, 4), 3, seed=0)
    with pytest.raises(ConfigError, match=r"model\.width=16 must be a multiple of model\.heads=3"):
        tiny_config(**gpt(heads=3))


def test_oracle_synthesizers_make_the_cut_gpt_equal_backprop() -> None:
    x, y = token_batch()
    cpu = torch.device("cpu")
    assert_oracles_give_backprop(build_pipeline(tiny_config(method="dni", **gpt()), TOKENS, total_steps=10, device=cpu),
                                 build_pipeline(tiny_config(method="backprop", **gpt()), TOKENS, total_steps=10, device=cpu),
                                 x, y)


def test_cdni_conditions_each_positions_synthesizer_on_its_next_character() -> None:
    pipeline = build_pipeline(tiny_config(method="cdni", **gpt()), TOKENS, total_steps=10, device=torch.device("cpu"))
    synth = pipeline.stages[0].synthesizer
    assert isinstance(synth, TokenSynthesizer) and synth.conditioned
    for layer in synth.zero_initialised():  # a trained synthesizer: its output layer is no longer zero
        torch.nn.init.normal_(layer.weight)
    h = torch.randn(2, CONTEXT, 16)
    labels = torch.randint(0, VOCAB, (2, CONTEXT))
    out = synth(h, labels)
    other = labels.clone()
    other[:, 3] = (other[:, 3] + 1) % VOCAB
    moved = (synth(h, other) - out).abs().sum(-1) > 0  # only position 3 sees its label
    assert out.shape == h.shape and moved[:, 3].all() and not moved[:, :3].any() and not moved[:, 4:].any()


def periodic_text(path: Path) -> Path:
    """A text a language model can learn in a few dozen steps: a fixed 23-character line, repeated."""
    path.write_text("the cat sat on the mat\n" * 400)
    return path


def text_sections(path: Path, log_dir: Path, **train: object) -> dict:
    return dict(**gpt(), data={"name": "text", "path": str(path), "context": CONTEXT, "val_size": 8},
                train={"epochs": 1, "max_steps": 60, "batch_size": 16, "lr": 3e-3, "schedule": "constant", **train},
                log={"dir": str(log_dir), "every": 10, "grad_every": 0})


def test_a_gpt_learns_text_and_reports_bits_per_character(tmp_path: Path) -> None:
    sections = text_sections(periodic_text(tmp_path / "t.txt"), tmp_path, lr=1e-2)
    run_dir, summary = train_locally(tiny_config(method="backprop", **sections))
    # Uniform over the 11 characters would be log2(11) = 3.46 bits; a window's next characters are
    # determined once its first few placed it in the line (measured: 0.38 after 60 steps).
    assert summary["test_bits_per_char"] < 0.6, summary
    assert summary["test_bits_per_char"] == pytest.approx(summary["test_loss"] / math.log(2))
    rows = [r for r in metric_rows(run_dir) if "val/loss" in r]
    assert rows and rows[-1]["val/bits_per_char"] == pytest.approx(rows[-1]["val/loss"] / math.log(2))
    assert all("train/bits_per_char" in r for r in metric_rows(run_dir) if "train/loss" in r)


def test_the_cli_saves_the_vocabulary_with_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = periodic_text(tmp_path / "t.txt")
    code = main(["train", str(ROOT / "configs" / "char_gpt.yaml"), f"data.path={text}", "data.val_size=8",
                 "model.depth=1", "model.width=16", "model.boundaries=null", "train.max_steps=4",
                 "train.eval_steps=0", f"log.dir={tmp_path / 'runs'}", "--no-progress"])
    assert code == 0
    assert "bits/char" in capsys.readouterr().out
    (run_dir,) = (tmp_path / "runs").iterdir()
    vocab = json.loads((run_dir / "vocab.json").read_text())
    assert vocab == {"chars": "\n acehmnost", "unknown": False, "size": 11}


def test_stage_processes_reproduce_the_reference_trainer_for_a_gpt(tmp_path: Path) -> None:
    from workers.process_launch import launch_processes

    text = periodic_text(tmp_path / "t.txt")
    sections = text_sections(text, tmp_path / "local", max_steps=12)
    sections["log"] = {**sections["log"], "every": 1}
    _, local = train_locally(tiny_config(method="backprop", threads=1, **sections))
    want = losses(next((tmp_path / "local").iterdir()))
    sections["log"]["dir"] = str(tmp_path / "ray")
    results = launch_processes(tiny_config(method="backprop", backend="ray", runtime={"max_in_flight": 1, "timeout_s": 60},
                                           **sections), timeout_s=120)
    got = [(s, m["train/loss"]) for s, m in results[-1]["metrics"] if "train/loss" in m]
    assert len(got) == len(want) == 12
    for (sg, vg), (sw, vw) in zip(got, want):
        assert sg == sw and vg == pytest.approx(vw, rel=1e-5, abs=1e-6)
    bits = [m["test/loss"] / math.log(2) for _, m in results[-1]["metrics"] if "test/loss" in m]
    assert bits[-1] == pytest.approx(local["test_bits_per_char"], rel=1e-5)


def test_compare_reports_bits_per_char_against_backprop_for_a_language_model(tmp_path: Path) -> None:
    text = periodic_text(tmp_path / "t.txt")
    code = main(["compare", str(ROOT / "configs" / "char_gpt.yaml"), "--methods", "backprop,cdni",
                 "--out", str(tmp_path / "cmp"), f"data.path={text}", "data.val_size=8", "model.depth=2",
                 "model.width=16", "train.max_steps=6", "train.eval_steps=3", f"log.dir={tmp_path / 'runs'}",
                 "--no-progress"])
    assert code == 0
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    summaries = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    cdni = summaries["cdni"]["test_bits_per_char"] - summaries["backprop"]["test_bits_per_char"]
    assert "| method | test bits/char | vs baseline |" in table and f"| {cdni:+.3f} |" in table
    assert (tmp_path / "cmp" / "learning_curves.png").stat().st_size > 10_000


def test_a_comparison_takes_ray_summaries_which_time_whole_runs() -> None:
    from dni.compare import markdown_table

    local = {"test_error": 0.1, "test_accuracy": 0.9, "steps": 10, "seconds_per_step": 0.1, "wall_seconds": 3.0}
    ray = {"test_error": 0.2, "test_accuracy": 0.8, "steps": 10, "wall_seconds": 2.0}  # the coordinator's summary
    table = markdown_table({"backprop": local, "cdni": ray})
    assert "| cdni | 20.00 | 0.8000 | 10 | 200.0 ms | 2.00x |" in table
