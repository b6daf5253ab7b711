"""Dead ReLU units in the synthesizers of finished runs (a measurement tool, not the runtime).

A hidden unit is dead when its ReLU outputs zero for every one of the first ``--examples``
training images, fed through the run's network and synthesizers at its last checkpoint (eval
mode). A synthesizer whose last hidden layer is all dead predicts a constant: the mean of its
targets, whatever the input. Usage::

    .venv/bin/python scripts/dead_units.py RUN_DIR [RUN_DIR ...] [--examples 512]

Prints one markdown row per run: its name, then per interface the dead fraction of each hidden
layer (``first/second``; units, or channels of a convolutional synthesizer). Unconditioned (DNI)
synthesizers only: a cDNI synthesizer's cell is ``-``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dni.build import build_pipeline  # noqa: E402
from dni.checkpoint import load_latest  # noqa: E402
from dni.config import load_config  # noqa: E402
from dni.data import load_splits  # noqa: E402
from dni.data.spec import DataSpec  # noqa: E402
from dni.synthesizer import ConvSynthesizer  # noqa: E402


def dead_fractions(run_dir: Path, examples: int) -> list[list[float]]:
    """Per interface, the fraction of dead units of each hidden ReLU layer of its synthesizer."""
    cfg = load_config(str(run_dir / "config.yaml"), [])
    state = load_latest(run_dir / "checkpoints")
    splits = load_splits(cfg.data, seed=cfg.seed)
    pipe = build_pipeline(cfg, DataSpec.of(splits.train), total_steps=1, device=torch.device("cpu"))
    for stage, saved in zip(pipe.stages, state["stages"]):
        stage.load_state_dict(saved)
    pipe.train(False)
    h = splits.train.images[:examples].float()
    out = []
    with torch.no_grad():
        for stage in pipe.stages[:-1]:
            h = stage.module(h)
            if stage.synthesizer is None:
                continue
            if stage.synthesizer.conditioned:  # its hidden layers see [h, context]: not measured here
                out.append([])
                continue
            z, dead = (h if isinstance(stage.synthesizer, ConvSynthesizer) else h.flatten(1)), []
            for layer in getattr(stage.synthesizer, "hidden", []):
                z = layer(z)
                if isinstance(layer, torch.nn.ReLU):
                    dead.append((z.flatten(2).amax(dim=(0, 2)) if z.dim() > 2 else z.amax(0)).le(0).float().mean().item())
            out.append(dead)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--examples", type=int, default=512)
    args = parser.parse_args(argv)
    for run in args.runs:
        cells = ["/".join(f"{d:.2f}" for d in layer) or "-" for layer in dead_fractions(run, args.examples)]
        print(f"| {run.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
