"""``dni submit``: run ``dni train`` on a Ray cluster as a Ray job (``ray job submit``).

The working directory (the repository, by default) is uploaded with the job, so the
cluster runs the code and configs you have; the run directory is written on the
cluster under ``log.dir``. Ray 2.60 clusters authenticate clients with a token
(``RAY_AUTH_MODE=token``, the token in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``); the command says what to do when none is found. This module
imports no Ray: it builds the command for Ray's own CLI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from dni.config import ConfigError, load_config
from dni.run import RunError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Not uploaded with a job: environments, version control, outputs and caches. (Ray would also
# skip what .gitignore lists, data/ among it; dni submit uploads by this list instead, so a
# dataset in the working directory travels with the job.)
EXCLUDES = [".venv", ".git", "runs", "results", "**/__pycache__", "*.egg-info", "build", "*.pt", ".pytest_cache"]
DEFAULT_LOG_DIR = "~/dni-runs"


def submit_argv(config: str, overrides: list[str], *, address: str, working_dir: str = ".", python: str = "python3",
                wait: bool = True, submission_id: str | None = None, excludes: list[str] | None = None) -> list[str]:
    """The ``ray job submit`` command that trains ``config`` with ``overrides`` on the Ray runtime.

    The config is validated here first (a typo fails before anything is sent), and must lie
    inside ``working_dir``. A relative ``log.dir`` would land inside the job's temporary copy of
    the working directory, so it becomes ``~/dni-runs`` on the cluster unless an override says otherwise.

    Raises:
        ConfigError: the config does not validate, or lies outside the working directory.
    """
    cfg = load_config(config, [*overrides, "backend=ray"])
    wd = Path(working_dir).resolve()
    try:
        rel = Path(config).resolve().relative_to(wd)
    except ValueError:
        raise ConfigError(f"{config}: the config must lie inside the working directory uploaded with the job "
                          f"({wd}); copy it there or pass --working-dir") from None
    if not Path(cfg.log.dir).is_absolute() and not cfg.log.dir.startswith("~") and \
            not any(o.startswith("log.dir=") for o in overrides):
        overrides = [*overrides, f"log.dir={DEFAULT_LOG_DIR}"]
    runtime_env = {"working_dir": str(wd), "excludes": [*EXCLUDES, *(excludes or [])],
                   "env_vars": {"PYTHONUNBUFFERED": "1"}}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
            "--runtime-env-json", json.dumps(runtime_env)]
    if submission_id:
        argv += ["--submission-id", submission_id]
    if not wait:
        argv.append("--no-wait")
    return [*argv, "--", python, "-m", "dni.cli", "train", str(rel), "backend=ray", *overrides, "--no-progress"]


def check_dashboard(address: str, *, timeout_s: float = 3.0) -> None:
    """Fail in seconds, with one line, when nothing listens at the dashboard ``address`` (Ray's
    CLI would print a long traceback); a TCP connect, before anything is uploaded.

    Raises:
        RunError: the connection is refused, or not made within ``timeout_s``.
    """
    url = urlparse(address if "://" in address else f"http://{address}")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        socket.create_connection((url.hostname or "127.0.0.1", port), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise RunError(f"no Ray dashboard answers at {address} ({why}): start a cluster with `ray start --head` or "
                       "`bash launch/local_cluster.sh up`, or tunnel to a remote one with "
                       "`ray dashboard launch/cluster.yaml`, or give its --address") from None


def submit_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Ray's CLI: token authentication unless ``RAY_AUTH_MODE`` says otherwise.

    Raises:
        ConfigError: token authentication and no token to send, or Ray's job client is missing.
    """
    env = dict(os.environ if environ is None else environ)
    if importlib.util.find_spec("aiohttp") is None:
        raise ConfigError("dni submit needs Ray's job client: pip install 'ray[default]' (or the project's "
                          "'.[cluster]' extra)")
    env.setdefault("RAY_AUTH_MODE", "token")
    env.setdefault("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # see EXCLUDES
    if env["RAY_AUTH_MODE"] == "token" and not _has_token(env):
        raise ConfigError(
            "Ray token authentication is on but no token was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
            "~/.ray/auth_token): copy the cluster's token from its head (`ray get-auth-token`) to "
            "~/.ray/auth_token, or set RAY_AUTH_MODE=disabled for a cluster started without authentication")
    return env


def _has_token(env: dict[str, str]) -> bool:
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    return path.is_file() and path.stat().st_size > 0
