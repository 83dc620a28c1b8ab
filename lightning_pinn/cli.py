"""The ``lightning-pinn`` console script.

Subcommands:
    demo    Train the harmonic IVP at a bad and a good λ_IC with the monitor attached and show
            the loss-balance crisis and its fix.
    sweep   The λ_IC sweep (Goldilocks curve) against the automatic balancers.
    report  A plain-language diagnosis of existing TensorBoard logs.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import os
import signal
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from lightning_pinn.sweep import BALANCERS

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _omega(text: str) -> float:
    """An angular frequency the harmonic problem takes: > 0, with ω² within float32's range."""
    from lightning_pinn.problems.harmonic import MAX_OMEGA_SQUARED

    value = _positive_float(text)
    if not value * value <= MAX_OMEGA_SQUARED:
        raise argparse.ArgumentTypeError(f"must be at most {math.sqrt(MAX_OMEGA_SQUARED):.3g} (ω² must fit in float32), got {text}")
    return value


def _exponent(text: str) -> float:
    value = _finite_float(text)
    if abs(value) > 30:
        raise argparse.ArgumentTypeError(f"must be a log10 weight in [-30, 30] (a float32 weight holds up to ~3e38), got {text}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32) (a NumPy/PyTorch seed), got {text}")
    return value


def _writable_folder(path: Path, command: str) -> str | None:
    """Create ``path`` if needed and check that files can be written there: an error message, or None.

    Checked before any training, so a sweep does not run all its fits and then lose them.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lightning_pinn_write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        return f"lightning-pinn {command}: cannot write to {str(path)!r} ({error.strerror or error}). Choose another folder."
    return None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: one per CPU core), got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """A weight a float32 weight buffer holds: 0, or within its range (refused before any fit runs)."""
    import torch

    from lightning_pinn.loss import stored_as, weight_range

    value = float(text)
    if not math.isfinite(value) or value < 0 or stored_as(value, torch.float32) is not None:
        smallest, largest = weight_range(torch.float32)
        raise argparse.ArgumentTypeError(f"must be 0 or a number in [{smallest:.3g}, {largest:.3g}] (a float32 weight), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-pinn``."""
    parser = argparse.ArgumentParser(
        prog="lightning-pinn", description="Per-term gradient diagnostics and loss balancing for PINNs in PyTorch Lightning."
    )
    from lightning_pinn import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="show the loss-balance crisis on the harmonic oscillator, and its fix",
        description="Train u'' + ω²u = 0, u(0)=1, u'(0)=0 on [0,1] with a GradientNormMonitor, once per λ_IC, and compare.",
    )
    demo.add_argument(
        "--ic-weights",
        type=_non_negative_float,
        nargs="+",
        default=[1.0, 100.0, 1e5],
        metavar="W",
        help="λ_IC values to train with; a repeated value counts once (default: 1 100 100000)",
    )
    demo.add_argument("--steps", type=_positive_int, default=2000, help="Adam steps per fit (default: 2000)")
    demo.add_argument("--omega", type=_omega, default=2 * math.pi, help="angular frequency ω (default: 2π)")
    demo.add_argument("--seed", type=_seed, default=0, help="initialisation seed (default: 0)")
    demo.add_argument("--every-n-steps", type=_positive_int, default=50, help="monitor cadence in steps (default: 50)")
    demo.add_argument("--logdir", default="lightning_pinn_runs/demo", help="TensorBoard log directory (default: lightning_pinn_runs/demo)")
    demo.add_argument("--no-hard-ic", action="store_true", help="skip the fit with the initial conditions imposed exactly")

    sweep = commands.add_parser(
        "sweep",
        help="λ_IC sweep on the harmonic oscillator against the automatic balancers (table + PNG)",
        description="Train the harmonic IVP for each λ_IC = 10^e on a grid (a fresh fit per value) and once per balancer "
        "(starting from λ = 1); write a table and a plot of relative L² against λ_IC, with the per-term loss histories of "
        "the bad, good and balanced cases.",
    )
    sweep.add_argument("--grid-min", type=_exponent, default=-3.0, help="smallest log10 λ_IC (default: -3)")
    sweep.add_argument("--grid-max", type=_exponent, default=5.0, help="largest log10 λ_IC (default: 5)")
    sweep.add_argument("--grid-step", type=_positive_float, default=1.0, help="grid spacing in log10 λ_IC (default: 1)")
    sweep.add_argument(
        "--balancers",
        nargs="*",
        default=["gradnorm-max", "gradnorm-mean", "ntk"],
        choices=list(BALANCERS),
        help="balancers to compare (default: all three)",
    )
    sweep.add_argument("--steps", type=_positive_int, default=2000, help="Adam steps per fit (default: 2000)")
    sweep.add_argument("--seeds", type=_seed, nargs="+", default=[0], help="seeds; the table reports the median (default: 0)")
    sweep.add_argument("--omega", type=_omega, default=2 * math.pi, help="angular frequency ω (default: 2π)")
    sweep.add_argument("--workers", type=_non_negative_int, default=0, help="parallel fits; 0 = one per CPU core (default: 0)")
    sweep.add_argument("--out", default="lightning_pinn_runs/sweep", help="output folder (default: lightning_pinn_runs/sweep)")

    report = commands.add_parser(
        "report",
        help="write a plain-language diagnosis (diagnosis.md + diagnosis.png) for existing TensorBoard logs",
        description="For every run (folder of event files) under LOGDIR, read the scalars logged by GradientNormMonitor and "
        "write diagnosis.md and diagnosis.png beside them; print the Markdown.",
    )
    report.add_argument("logdir", help="a TensorBoard log directory (searched recursively)")
    return parser


def run_report(args: argparse.Namespace) -> int:
    """``lightning-pinn report LOGDIR``: the diagnosis of existing runs."""
    from lightning_pinn.report import report_runs

    if not Path(args.logdir).exists():
        print(
            f"lightning-pinn report: {args.logdir} does not exist; give the folder you passed to TensorBoardLogger (or `tensorboard --logdir`).",
            file=sys.stderr,
        )
        return 2
    reports = report_runs(args.logdir)
    if not reports:
        where = (
            "is not a TensorBoard event file (events.out.tfevents.*)" if Path(args.logdir).is_file() else "holds no TensorBoard event files"
        )
        print(
            f"lightning-pinn report: {args.logdir} {where}. The command reads a "
            "TensorBoardLogger's folder; with another logger, the monitor already wrote diagnosis.md beside the logs "
            "at the end of the fit.",
            file=sys.stderr,
        )
        return 2
    for path, markdown, problem in reports:
        print(markdown)
        if problem is None:
            print(f"(written to {path} and {path.with_suffix('.png')})\n")
        else:
            print(f"({path}: {problem})\n", file=sys.stderr)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    """``lightning-pinn sweep``: the Goldilocks curve of λ_IC, and the balancers beside it."""
    import json

    from lightning_pinn.sweep import (
        FitSpec,
        grid_size,
        grid_weights,
        plot_sweep,
        ranking_error,
        results_as_dicts,
        run_fits,
        summarize,
        write_table,
    )

    try:
        size = grid_size(args.grid_min, args.grid_max, args.grid_step)
    except ValueError as error:
        print(f"lightning-pinn sweep: {error}", file=sys.stderr)
        return 2
    if size > 1000:
        print(
            f"lightning-pinn sweep: the grid has {size} weights (grid_step {args.grid_step:g}); at most 1000 are "
            "allowed (one fit each). Use a larger --grid-step.",
            file=sys.stderr,
        )
        return 2
    weights = grid_weights(args.grid_min, args.grid_max, args.grid_step)
    out = Path(args.out)
    problem = _writable_folder(out, "sweep")
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    seeds = list(dict.fromkeys(args.seeds))  # a repeated seed would count twice in the median
    balancers = list(dict.fromkeys(args.balancers))
    specs = [FitSpec("fixed", weight, seed, args.steps, args.omega) for seed in seeds for weight in weights]
    specs += [FitSpec(name, 1.0, seed, args.steps, args.omega) for seed in seeds for name in balancers]
    print(
        f"Sweep: {len(weights)} fixed λ_IC from {weights[0]:.3g} to {weights[-1]:.3g}, balancers {', '.join(balancers) or 'none'}; "
        f"{len(seeds)} seed(s), {args.steps} steps each: {len(specs)} fits.",
        flush=True,
    )
    start = time.perf_counter()

    def progress(done: int, total: int, result) -> None:  # type: ignore[no-untyped-def]
        elapsed = time.perf_counter() - start
        print(
            f"  [{done:>{len(str(total))}}/{total}] {result.spec.label:<14} seed {result.spec.seed}: rel. L2 {result.relative_l2:.2e}  "
            f"({result.seconds:.1f} s; {elapsed:.0f} s elapsed)",
            flush=True,
        )

    finished: list = []

    def keep(done: int, total: int, result) -> None:  # type: ignore[no-untyped-def]
        finished.append(result)
        progress(done, total, result)

    interrupted = False
    sigint = signal.getsignal(signal.SIGINT)
    try:
        results = run_fits(specs, workers=args.workers, on_result=keep)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Ctrl-C; inside a fit Lightning turns it into exit(1). Any other exit (e.g. Lightning's
        # SIGTERMException) is not an interruption to summarise: let it through.
        if isinstance(stop, SystemExit) and (stop.code != 1 or type(stop) is not SystemExit):
            raise
        interrupted = True
        if not finished:
            print("\nlightning-pinn sweep: interrupted before any fit finished; nothing written.", file=sys.stderr)
            return 130
        print(f"\nlightning-pinn sweep: interrupted after {len(finished)} of {len(specs)} fits; writing those.", file=sys.stderr)
        results = finished
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores SIGINT after handling a Ctrl-C in a fit
    summaries = summarize(results)
    table = write_table(summaries, out / "sweep.csv")
    omega_text = "2π" if math.isclose(args.omega, 2 * math.pi) else f"{args.omega:g}"
    title = f"harmonic IVP, ω = {omega_text}, {args.steps} steps, {'seed' if len(seeds) == 1 else 'seeds'} {' '.join(map(str, seeds))}"
    if interrupted:
        title += f" (interrupted: {len(results)} of {len(specs)} fits)"
    plot_sweep(summaries, results, out / "sweep.png", title)
    (out / "sweep.md").write_text(f"# λ sweep: {title}\n\n{table}\n", encoding="utf-8")
    (out / "sweep.json").write_text(json.dumps(results_as_dicts(results), default=str), encoding="utf-8")
    print()
    print(table)
    fixed = [s for s in summaries if s.method == "fixed"]
    if fixed:
        best = min(fixed, key=ranking_error)
        print(f"\nbest fixed weight: {best.label} (median rel. L2 {best.median_l2:.2e})")
    print(
        f"\nwrote {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'sweep.png'} and {out / 'sweep.json'} ({time.perf_counter() - start:.0f} s)"
    )
    return 130 if interrupted else 0


def _print_wrapped(prefix: str, message: str) -> None:
    print(textwrap.fill(message, width=110, initial_indent=prefix, subsequent_indent=" " * len(prefix)), flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """``lightning-pinn demo``: the crisis at a bad λ_IC beside a well-chosen one."""
    from lightning_pinn.demo import format_table, run_harmonic, warm_up

    omega_text = "2π" if math.isclose(args.omega, 2 * math.pi) else f"{args.omega:g}"
    print(f"Harmonic oscillator u'' + ω²u = 0, u(0) = 1, u'(0) = 0 on [0, 1], ω = {omega_text}: exact u = cos(ωt).")
    print(
        f"Network 1-32-32-32-1 tanh, Adam lr 1e-3, {args.steps} full-batch steps on 128 points; GradientNormMonitor every {args.every_n_steps} steps.\n"
    )
    if args.logdir is not None:
        problem = _writable_folder(Path(args.logdir), "demo")
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
    warm_up()  # so that the time column compares like with like
    runs = []
    for weight in dict.fromkeys(args.ic_weights):  # a repeated λ_IC counts once (as in `sweep`)
        print(f"training with λ_IC = {weight:g} ...", flush=True)
        run = run_harmonic(
            weight,
            steps=args.steps,
            omega=args.omega,
            seed=args.seed,
            every_n_steps=args.every_n_steps,
            log_dir=args.logdir,
            on_warning=lambda label, message: _print_wrapped(f"  [{label}] ALARM: ", message.removeprefix("GradientNormMonitor: ")),
        )
        runs.append(run)
    if not args.no_hard_ic:
        print("training with the initial conditions imposed exactly (u = 1 + t²·N(t), no ic term) ...", flush=True)
        runs.append(
            run_harmonic(
                steps=args.steps, omega=args.omega, seed=args.seed, every_n_steps=args.every_n_steps, log_dir=args.logdir, hard_ic=True
            )
        )
    print()
    print(format_table(runs))
    print()
    print(
        textwrap.fill(
            "How to read this: the loss-balance alarm fires when one term's weighted gradient norm λ·‖∇θ L‖ is more than "
            "100x another's; gradient descent then neglects the small term. The conflict alarm fires when two terms' "
            "gradients point against each other while their loss stalls. A λ_IC that matches the gradient norms trains "
            "the network to cos(ωt). Imposing the initial conditions exactly (hard IC) removes the term, and the crisis with it. "
            "lightning_pinn.callbacks can also log all this for any Lightning model.",
            width=110,
        )
    )
    print(f"\nTensorBoard logs are in {args.logdir}. To inspect them, run:\n\n    tensorboard --logdir {args.logdir}\n")
    print("and open the 'Custom Scalars' tab (gradient norms, ratio vs threshold, losses, weights, cosines, alarms).")
    return 0


def _console_without_encoding_errors() -> None:
    """Let a console whose encoding lacks λ, – or → (ASCII, Latin-1, a cp1252 Windows console)
    print ``?`` for them instead of stopping the command with a ``UnicodeEncodeError``.

    Only streams that would fail are changed (a non-UTF encoding with strict errors); the files
    the commands write are UTF-8 whatever the console.
    """
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None)
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None or not encoding or getattr(stream, "errors", "strict") != "strict":
            continue
        try:
            if codecs.lookup(encoding).name == "utf-8":
                continue
        except LookupError:
            pass
        reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-pinn`` console script."""
    _console_without_encoding_errors()
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"demo": run_demo, "sweep": run_sweep, "report": run_report}
    if args.command not in commands:
        parser.print_help(sys.stderr)
        return 2  # no subcommand: a usage error, as argparse itself exits for one
    try:
        return commands[args.command](args)
    except BrokenPipeError:
        if not _stdout_pipe_is_closed():
            raise  # another pipe (a worker's, say): a real error
        # the reader went away (`lightning-pinn report LOGDIR | head`): stop quietly, as `cat`
        # does, and point stdout at devnull so that the interpreter's final flush cannot fail again
        with contextlib.suppress(OSError, ValueError):  # io.UnsupportedOperation is both
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _stdout_pipe_is_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports POLLERR for its write end)."""
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        return False
    try:
        import select

        poller = select.poll()
    except (ImportError, AttributeError):  # no poll (Windows): stdout's pipe is the usual cause
        return True
    poller.register(descriptor, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
