"""What every ``riemann-bench`` subcommand shares: the common options, argparse types, the
default output directory and the description of a subcommand."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Command:
    """One subcommand: ``run(args) -> exit code`` and what ``--help`` shows."""

    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str
    example: str  # the arguments after ``riemann-bench``
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    #: whether it runs on ``--device`` (else ``--device`` only names recorded results,
    #: which need no such device here: a CUDA sweep analysed on a CPU-only host)
    runs_on_device: bool = True
    #: the table ``--report-only`` draws a study's report from, in the ``--out`` of
    #: ``args``: Ctrl-C points to ``--report-only`` only where it is there to draw
    report_table: Callable[[argparse.Namespace], Path] | None = None


def ints(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> ``(1, 2, 3)``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err


def positive_int(text: str) -> int:
    """``"4"`` -> ``4``; zero, negative or not an integer is an argparse error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


#: The largest seed: torch's generators take seeds below 2^64, and the studies derive
#: others from it (``seed * 7919 + n``, ``seed + pair``), which stay below that from here.
MAX_SEED = 2**32 - 1

#: The largest seed a record may hold: torch's generators take any below 2**64, and
#: earlier versions of the commands took any torch could seed (found by review: records
#: of then refused), never 2**80 (found by a hunt: reported as a study's).
RECORDED_SEED = 2**64 - 1


def seed(text: str) -> int:
    """``"3"`` -> ``3``; a seed outside ``[0, MAX_SEED]`` or not an integer is an argparse
    error (found by review: numpy's message below 0 and torch's overflow past 2^64, for a
    seed or one derived from it, named no option)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer seed from 0 to {MAX_SEED}, got {text!r}"
        )
    return value


#: The most timed calls per point (``sweep``, ``run``) or per method (``distributed``): the
#: standard error of a median, ``1.25 sigma / sqrt(repeats)``, is 3% of the repeats'
#: interquartile range at 1000, and more add little while a run's time grows with them
#: (found by a hunt: ``--repeats 10**12`` timed the first point without end; a sweep of
#: one point of an 8-1-2 MLP took 45 s at 10 repeats, 87 s at 1000 and 374 s at 10000 on
#: 2 CPU cores).
MAX_REPEATS = 1000


def check_at_most(option: str, value: float, largest: float, why: str) -> None:
    """``ValueError`` naming ``option``, its ``value``, its bound ``largest`` (``why``: what
    the bound holds the command to) and the fix, for a ``value`` past ``largest``: a count a
    study makes a list of, or loops over, refused before any work (found by a hunt: at
    ``10**20`` a list of seeds was killed for memory, and steps ran without end)."""
    if value > largest:
        raise ValueError(
            f"{option} {value} is more than {largest}, {why}: pass {option} {largest} or fewer"
        )


def positive_seconds(text: str) -> float:
    """``"600"`` -> ``600.0``; zero, negative, NaN, inf or more than a collective can wait
    (``riemann_core.distributed.MAX_TIMEOUT``) is an argparse error."""
    from .distributed import MAX_TIMEOUT

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # (found by a hunt: --timeout 1e30 spawned the ranks, whose timedelta raised
    # OverflowError: a traceback and exit code 3)
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, at most {MAX_TIMEOUT:g}, got {text!r}"
        )
    return value


def floats(text: str) -> tuple[float, ...]:
    """``"0.1,1e-2"`` -> ``(0.1, 0.01)``."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def names(text: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``; no name at all is an argparse error (found by a hunt:
    ``--methods ''`` read "unknown method ()")."""
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    if not chosen:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return chosen


def check_report_only(
    args: argparse.Namespace,
    parser_group: str,
    dests: tuple[str, ...],
    directory: str | None = None,
) -> None:
    """``ValueError`` naming the study options given beside ``--report-only``, which draws
    the report from the recorded study and would ignore them (found by a hunt: ``train
    --report-only --lrs 0.1`` said nothing). ``--quick`` and ``--device`` only choose the
    default directory of the recorded study, ``reports/<device>[/quick]/<directory>``: they
    are refused beside ``--out``, and always where ``directory`` is ``None`` (no default:
    found by a hunt, ``targets --report-only --device cuda`` and ``distributed
    --report-only --out DIR --quick`` said nothing)."""
    given = ["--" + d.replace("_", "-") for d in dests if getattr(args, d, None) is not None]
    if getattr(args, "seed_given", False):  # the report resamples with the recorded seed
        given.append("--seed")  # (found by a hunt: --seed 7 was ignored, silently)
    choosing = (("--quick", args.quick), ("--device", getattr(args, "device_given", False)))
    chosen = [o for o, on in choosing if on and (args.out is not None or directory is None)]
    if given or chosen:
        where = (
            f" (--quick and --device choose its directory, reports/<device>[/quick]/"
            f"{directory}, only without --out)"
            if chosen and directory is not None
            else ""
        )
        given += chosen
        raise ValueError(
            f"{', '.join(given)} would be ignored with --report-only, which draws the report "
            f"from the {parser_group} recorded in --out{where}: drop "
            f"{'them' if len(given) > 1 else 'it'}, or run the study without --report-only"
        )


def check_choices(what: str, chosen: tuple[str, ...], known: tuple[str, ...]) -> None:
    """``ValueError`` naming the unknown ``what``\\ s and the choices, for an empty choice,
    or for one listed twice."""
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise ValueError(
            f"unknown {what}(s) {unknown or list(chosen)}; choose from {', '.join(known)}"
        )
    check_distinct(f"{what}s", chosen)


def check_distinct(what: str, values) -> None:
    """``ValueError`` naming the values ``what`` lists more than once: each would be run,
    and recorded, twice."""
    values = list(values)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(
            f"{what}: {', '.join(map(str, repeated))} given more than once, which would "
            "measure and record them twice; give each value once"
        )


def default_out(args: argparse.Namespace, *parts: str) -> Path:
    """``--out``, else ``reports/<device type>[/quick]/<parts>``."""
    if args.out is not None:
        return args.out
    default = Path("reports") / torch.device(args.device).type
    return default.joinpath("quick" if args.quick else "", *parts)


def out_dir(text: str) -> Path:
    """argparse type for ``--out``: a directory, or a path where one can be created."""
    path = Path(text)
    for part in (path, *path.parents):
        try:
            is_file = part.exists() and not part.is_dir()
        except OSError as err:  # a name too long, a loop of links (found by review: traceback)
            message = f"{text}: {err.strerror}; pass another --out"
            raise argparse.ArgumentTypeError(message) from err
        if is_file:
            where = "is" if part == path else f"lies under {part}, which is"
            raise argparse.ArgumentTypeError(
                f"{text} {where} a file, not a directory; pass a directory (it is created "
                "if missing)"
            )
    return path


def device(name: str) -> torch.device:
    """argparse type for ``--device``: ``cpu`` or ``cuda[:N]`` (see :func:`check_device`
    for whether this process can use it)."""
    try:
        chosen = torch.device(name)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(
            f"unknown device {name!r}; use 'cpu' or 'cuda' (or 'cuda:N')"
        ) from err
    if chosen.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(
            f"unsupported device {name!r}; use 'cpu' or 'cuda' (or 'cuda:N')"
        )
    return chosen


def check_device(chosen: torch.device) -> None:
    """``ValueError`` unless this process can run on ``chosen`` (the CUDA device exists)."""
    if chosen.type == "cpu":
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {str(chosen)!r} requested but CUDA is not available to this torch "
            f"({torch.__version__}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if chosen.index is not None and chosen.index >= count:
        raise ValueError(
            f"device {str(chosen)!r} requested but only {count} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{count - 1})"
        )


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand shares, as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument(
        "--device",
        type=device,
        default=None,  # cpu, once cli.main has noted whether it was given
        help="torch device to run on: cpu, or cuda[:N] where available (default: cpu)",
    )
    group.add_argument(
        "--out",
        type=out_dir,
        default=None,
        metavar="DIR",
        help="directory for the results, created if missing (default: reports/<device> "
        "for the pipeline commands, with /training, /stability or /distributed appended for "
        "train, stability and distributed, reports/<device>/quick/... with --quick; print "
        "only for demo, targets and compare)",
    )
    group.add_argument(
        "--quick",
        action="store_true",
        help="a smaller problem or grid (minutes, not tens of minutes)",
    )
    group.add_argument(
        "--seed",
        type=seed,
        default=None,  # 0, once cli.main has noted whether it was given
        help="seed for data, models and sampling; for fit/validate/report the bootstrap "
        "(default: 0)",
    )
    return common
