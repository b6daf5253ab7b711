"""Config: YAML values over dataclass defaults, CLI overrides over both, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dni.cli import main
from dni.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_and_overrides_in_order_of_precedence(tmp_path: Path) -> None:
    p = write(tmp_path, "method: dni\ntrain:\n  epochs: 3\n  lr: 1e-2\n")
    cfg = load_config(p, ["train.epochs=5", "model.boundaries=[2]"])
    assert cfg.method == "dni"  # YAML over default
    assert cfg.train.epochs == 5  # CLI over YAML
    assert cfg.train.lr == 0.01  # 1e-2 is a string to YAML 1.1; still a number here
    assert cfg.train.batch_size == Config().train.batch_size  # default
    assert cfg.model.boundaries == [2]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("trian:\n  epochs: 1\n", [], "trian: unknown key; valid keys here are name, method"),
        ("train:\n  epoch: 1\n", [], "train.epoch: unknown key; valid keys here are epochs"),
        ("train:\n  epochs: many\n", [], "train.epochs: must be an integer (got 'many')"),
        ("", ["train.lr=-0.1"], "train.lr: must be > 0"),
        ("", ["method=sgd"], "method: must be one of backprop, dni, cdni, delayed, corrected, local, nobprop (got 'sgd')"),
        ("", ["model.boundaries=[3,9]"], "model.boundaries: must be strictly increasing layer indices in 1..3"),
        ("", ["synthesizer.p_update=0"], "synthesizer.p_update: must be in (0, 1]"),
        ("", ["synthesizer.kind=conv"], "synthesizer.kind: must be one of auto, mlp (got 'conv')"),
        ("", ["synthesizer.normalize=maybe"], "synthesizer.normalize: must be true or false"),
        ("", ["train.epochs"], "an override must look like section.key=value"),
        ("", ["train=3"], "train: must be a mapping"),
        ("- a\n- b\n", [], "must hold a mapping of sections"),
        ("train: [1\n", [], "not valid YAML at line"),
        ("log:\n  progress: maybe\n", [], "log.progress: must be true or false"),
        ("", ["runtime.ray_log_level=loud"],
         "runtime.ray_log_level: must be one of debug, info, warning, error (got 'loud')"),
    ],
)
def test_bad_config_raises_one_line_naming_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_ray_logs_only_errors_unless_asked(tmp_path: Path) -> None:
    assert Config().runtime.ray_log_level == "error"
    for level in ("debug", "info", "warning", "error"):
        assert load_config(write(tmp_path, ""), [f"runtime.ray_log_level={level}"]).runtime.ray_log_level == level


def test_cli_config_error_exits_2_with_one_line_and_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, "train:\n  lr: -1\n")
    assert main(["train", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dni: error: train.lr: must be > 0")
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_help_exits_0_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["data", "mnist", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    assert "section.key=value" in capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_says_how_to_run_it(path: Path) -> None:
    assert path.read_text().startswith("#")
    assert "dni " in path.read_text().split("\n\n")[0]
    load_config(path)
