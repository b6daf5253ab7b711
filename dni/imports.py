"""Import what a config names: ``"path/to/file.py:name"`` or ``"package.module:name"``.

Used for the user's own model (``model.factory``), loss (``model.loss``) and data
(``data.factory``). A spec that cannot be resolved is a :class:`~dni.config.ConfigError`
naming the config key, so the CLI reports it in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from dni.config import Config, ConfigError


def split_spec(spec: str, key: str) -> tuple[str, str]:
    """``"where:name"`` as (where, name). Raises ConfigError when it has not that form."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"{key}: {spec!r} must look like path/to/file.py:function or package.module:function")
    return where, name


def resolve_spec(spec: str) -> str:
    """The spec with a file path made absolute (workers in other folders import the same file)."""
    where, sep, name = spec.rpartition(":")
    if sep and where.endswith(".py"):
        return f"{Path(where).expanduser().resolve()}:{name}"
    return spec


def _load_file(path: Path, key: str) -> Any:
    # One module per file, named by its absolute path, so importing it twice gives the same objects.
    name = "dni_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"{key}: importing {path} failed: {type(e).__name__}: {e}") from None
    return module


def _importable_from_cwd() -> None:
    """Let ``package.module`` specs name the current folder's packages, as ``python -m`` does
    (a console script such as ``dni`` does not put the folder on sys.path)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_object(spec: str, key: str) -> Any:
    """The object ``spec`` names.

    Args:
        spec: ``"path/to/file.py:name"`` (relative to the current folder) or ``"package.module:name"``
            (importable from the current folder or sys.path).
        key: the config key it came from, for error messages.

    Raises:
        ConfigError: bad form, missing file or module, a failing import, or no such name.
    """
    where, name = split_spec(spec, key)
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"{key}: no such file {where} (looked in {path.parent})")
        module = _load_file(path, key)
    else:
        _importable_from_cwd()
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ConfigError(f"{key}: cannot import {where!r} ({e}); give a file path "
                              "(path/to/file.py:function) or put the package on PYTHONPATH") from None
        except Exception as e:
            raise ConfigError(f"{key}: importing {where} failed: {type(e).__name__}: {e}") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}: {where} has no {name!r}")
    return getattr(module, name)


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with ``data.path`` and the file specs of ``model.factory``, ``model.loss`` and
    ``data.factory`` made absolute: workers that start in another folder find the same files."""
    model = dataclasses.replace(cfg.model, factory=cfg.model.factory and resolve_spec(cfg.model.factory),
                                loss=resolve_spec(cfg.model.loss))
    data = dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).expanduser().resolve()),
                               factory=cfg.data.factory and resolve_spec(cfg.data.factory))
    return dataclasses.replace(cfg, model=model, data=data)
