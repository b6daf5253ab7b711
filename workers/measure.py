"""What the measurement commands on the Ray runtime (the fault drill, the soak) share."""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from dni.config import Config, load_config


def measurement_parser(prog: str, doc: str, out: str) -> argparse.ArgumentParser:
    """A parser of ``CONFIG [section.key=value ...] --out FOLDER`` (options and overrides in any order:
    parse with ``parse_intermixed_args``)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default=out, help="where the results go (default: %(default)s)")
    return parser


def measured_config(args: argparse.Namespace, *extra: str) -> Config:
    """The config of a measured run: on the Ray runtime, its run directories under ``<out>/runs``."""
    return load_config(args.config, [*args.overrides, "backend=ray", f"log.dir={Path(args.out) / 'runs'}",
                                     "log.progress=false", *extra])


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs"
