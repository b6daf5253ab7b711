"""dni: decoupled neural interfaces. Train a network cut into stages, each updating
at once from a learned synthetic gradient (Jaderberg et al. 2016, arXiv 1608.05343).

The core (synthesizers, decoupling rules, models, the single-process trainer)
needs torch alone; the distributed runtime lives in ``workers/``.
"""

from dni.build import build_pipeline
from dni.config import Config, ConfigError, load_config
from dni.pipeline import Pipeline, StepResult
from dni.stage import DecoupledStage, StageOptions
from dni.synthesizer import ConvSynthesizer, MLPSynthesizer, Synthesizer, make_synthesizer

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "ConvSynthesizer",
    "DecoupledStage",
    "MLPSynthesizer",
    "Pipeline",
    "StageOptions",
    "StepResult",
    "Synthesizer",
    "build_pipeline",
    "load_config",
    "make_synthesizer",
]
