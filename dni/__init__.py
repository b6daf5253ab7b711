"""dni: decoupled neural interfaces. Train a network cut into stages, each updating
at once from a learned synthetic gradient (Jaderberg et al. 2016, arXiv 1608.05343).

    pipe = dni.decouple([stage_1, stage_2, head], in_shape=(1, 28, 28), num_classes=10)
    pipe.train_step(x, y)

The core (synthesizers, decoupling rules, the step engine, models, the single-process
trainer) needs torch alone; the distributed runtime lives in ``workers/``.
"""

from dni import rules
from dni.build import build_pipeline
from dni.config import Config, ConfigError, load_config
from dni.data.spec import DataSpec
from dni.decouple import decouple
from dni.engine import StageStep, train_step
from dni.interface import BackwardInterface
from dni.losses import cross_entropy, mse
from dni.optim import OptimizerSpec
from dni.pipeline import Pipeline, StepResult
from dni.stage import DecoupledStage, NonFiniteError, StageOptions
from dni.synthesizer import (
    ConvSynthesizer,
    MLPSynthesizer,
    Synthesizer,
    TokenSynthesizer,
    make_synthesizer,
)

__version__ = "0.1.0"

__all__ = [
    "BackwardInterface",
    "Config",
    "ConfigError",
    "ConvSynthesizer",
    "DataSpec",
    "DecoupledStage",
    "MLPSynthesizer",
    "NonFiniteError",
    "OptimizerSpec",
    "Pipeline",
    "StageOptions",
    "StageStep",
    "StepResult",
    "Synthesizer",
    "TokenSynthesizer",
    "build_pipeline",
    "cross_entropy",
    "decouple",
    "load_config",
    "make_synthesizer",
    "mse",
    "rules",
    "train_step",
]
