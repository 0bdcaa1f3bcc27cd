"""The ``riemann-bench`` command line.

Every subcommand takes the same four options with the same meaning: ``--device`` (``cpu``,
or ``cuda[:N]`` where CUDA is available), ``--out`` (the results directory; the pipeline
commands default to ``reports/<device>``), ``--quick`` (a smaller problem or grid) and
``--seed``. Each subcommand's ``--help`` ends with an example invocation. The subcommands
come from :mod:`riemann_core.scaling` (the scaling study and the performance targets) and
:mod:`riemann_core.studies` (training, stability and the demo on real data).

Exit codes: 0 done, 1 a claim failed or a goal was missed (a finding), 2 bad options,
unreadable files or a missing extra, 3 an unexpected error broke the command off (its
traceback is printed), 130 interrupted (Ctrl-C), 143 terminated (a SIGTERM: ``kill``,
``timeout``, a batch scheduler's cancel), which stops a command as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import textwrap
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata

import torch

from .arguments import Command, check_device, common_options
from .measure.allocator import keep_freed_memory
from .measure.environment import on_one_line
from .scaling import commands as scaling_commands
from .scaling import compare, parallel, targets
from .studies import demo, stability, training

PROG = "riemann-bench"
COMMANDS: tuple[Command, ...] = (
    *scaling_commands.COMMANDS,
    targets.COMMAND,
    compare.COMMAND,
    parallel.COMMAND,
    training.COMMAND,
    stability.COMMAND,
    demo.COMMAND,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``riemann-bench`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = _attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    keep_freed_memory()  # timings without the page faults of glibc's default policy
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named with the usage of the parser they were given to
        before = argv[: argv.index(args.command)]
        owner = parser if any(a in before for a in unknown) else args.parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    # whether given: --report-only refuses them where it would ignore them
    args.seed_given, args.device_given = args.seed is not None, args.device is not None
    args.seed = 0 if args.seed is None else args.seed
    args.device = torch.device("cpu") if args.device is None else args.device
    # on a cluster, the workers' devices count; analyses and redraws of recorded results
    # need none (found by a hunt: train --report-only --device cuda needed a GPU)
    redraw = getattr(args, "report_only", False)
    if args.runs_on_device and getattr(args, "scheduler", None) is None and not redraw:
        try:
            check_device(args.device)
        except ValueError as err:
            args.parser.error(str(err))
    # recorded with the results, as a shell takes it back (found by a hunt: a path with a
    # space in the report's command to resume or redraw split in two); on one line, as the
    # reports draw it and their checks of a record ask (found by a review: a --out with a
    # tab in it trained or measured for minutes, then its report refused its own record)
    for token in argv:
        if not on_one_line(token):
            args.parser.error(
                f"argument {token!r} holds a control character (a tab or line break?), which "
                "the command recorded with the results cannot hold: pass one without it"
            )
    args.command_line = shlex.join([PROG, *argv])
    return args.run(args)


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--widths -8,16`` as ``--widths=-8,16``: argparse takes a value that starts with a
    minus and is not a plain number (a list) for an option, and says only "expected one
    argument"; attached, it reaches the option's own check, which names the problem. No
    option of ``riemann-bench`` is spelt as a minus and a digit."""
    out: list[str] = []
    for token in argv:
        negative = token.startswith("-") and token[1:2].isdigit()
        if negative and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_paragraph(
            "Reference implementation and measuring instrument for the layerwise Riemannian "
            "metric (Pehle & Slotine, arXiv 2603.03610) and the methods it is compared with."
        ),
        epilog=f"example:\n  {PROG} run --quick\n\nrun '{PROG} COMMAND --help' for a "
        "command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            parents=[common],
            help=command.help,
            description=_paragraph(command.description),
            epilog=f"example:\n  {PROG} {command.example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command.add_arguments is not None:
            command.add_arguments(sub)
        sub.set_defaults(
            run=guarded(command.run),
            parser=sub,
            runs_on_device=command.runs_on_device,
            report_table=command.report_table,
        )
    return parser


#: Exit codes beside 0 (done; every claim passed, every goal met) and 1 (a claim failed or
#: a goal was missed: a finding): bad options or unreadable files, and an unexpected
#: error that broke the command off (its traceback is printed; no verdict); Ctrl-C, as
#: shells report a SIGINT; a SIGTERM, as shells report one (128 + 15).
USAGE_ERROR, UNEXPECTED_ERROR, INTERRUPTED, TERMINATED = 2, 3, 130, 143


class Terminated(KeyboardInterrupt):
    """A SIGTERM (``kill``, ``timeout``, a batch scheduler's cancel) received while a
    command runs: raised in the main thread, it stops the command as Ctrl-C does, through
    every ``except KeyboardInterrupt`` and ``finally`` on the way (an earlier study set
    aside whole, no temporary file or empty directory left, child processes ended where
    Ctrl-C ends them), where Python's default ends the process on the spot."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """For the block, a SIGTERM raises :class:`Terminated` in the main thread (once: a
    second one does not break off the unwinding of the first; SIGKILL still does); the
    previous handler is restored after. Outside the main thread, where no handler can be
    set, nothing changes (a gap found by review: a command stopped by ``kill`` ended on
    the spot, unlike Ctrl-C: no line saying what is left, a set-aside of an earlier study
    cut off midway splitting it, a temporary file or an --out it made left behind, the
    ranks of ``distributed`` running on). Nor where SIGTERM's handler is not the default,
    as Python leaves SIGINT alone where its parent changed it: a process started with
    SIGTERM ignored keeps ignoring it, and a program calling :func:`main` keeps its own
    handler, also one set in C, which Python cannot put back (found by review: the first
    was stopped, the second's handler replaced by this one, and the command, done, exited
    3 with a ``TypeError`` from the restore)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return
    raised = False

    def terminate(signum, frame) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded(fn):
    """Turn bad options and unreadable files into a one-line error and exit code 2, and an
    unexpected error into its traceback and exit code 3 (Python's own 1 would read as a
    failed claim); Ctrl-C, and a SIGTERM taken as one (:func:`sigterm_as_interrupt`), into
    a line saying what is left and exit code 130 or 143."""

    def run(args) -> int:
        try:
            with sigterm_as_interrupt():
                return fn(args)
        except (ValueError, OSError) as err:  # bad options, unreadable or unwritable paths
            print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
            return USAGE_ERROR
        except ModuleNotFoundError as err:
            if not _of_an_extra(err):
                return _unexpected(args.command)
            # an extra not installed: the core needs torch and numpy alone, the measuring
            # tools pandas, dask, matplotlib, ... (found by a walk through the docs: a
            # bare `pip install -e .` answered `riemann-bench --help` with a traceback)
            print(
                f"{PROG} {args.command}: error: {err}: this command needs the 'bench' extra; "
                'install it with: python -m pip install -c constraints.txt -e ".[bench]"',
                file=sys.stderr,
            )
            return USAGE_ERROR
        except KeyboardInterrupt as err:
            terminated = isinstance(err, Terminated)
            resumes = args.command in ("sweep", "run")
            print(
                f"{PROG} {args.command}: "
                + ("terminated (SIGTERM)" if terminated else "interrupted")
                + ". Every file written so far is whole (written atomically)"
                + ("; run it again with the same --out to resume" if resumes else "")
                + _redraw_hint(args),
                file=sys.stderr,
            )
            return TERMINATED if terminated else INTERRUPTED
        except Exception:
            return _unexpected(args.command)

    return run


def _of_an_extra(err: ModuleNotFoundError) -> bool:
    """Whether ``err`` is a module an extra installs: not riemann_core's own, nor a part of
    what the core needs (torch, numpy) or of the standard library, which no extra brings
    (found by review: a torch built without ``torch.distributed``, or one whose install
    lost a submodule, was told to install the 'bench' extra, without a traceback)."""
    top = (err.name or "").partition(".")[0]
    return top not in ("", "riemann_core", "torch", "numpy") and top not in sys.stdlib_module_names


def _unexpected(command: str) -> int:
    """The traceback of the error being handled and the exit code of an unexpected one."""
    traceback.print_exc()
    print(
        f"{PROG} {command}: unexpected error (above), no verdict: exit code {UNEXPECTED_ERROR}",
        file=sys.stderr,
    )
    return UNEXPECTED_ERROR


def _redraw_hint(args) -> str:
    """What an interrupted study leaves to draw: its report of what finished, with
    ``--report-only``, where the table that report needs is in ``--out`` (found by a
    hunt: a study's partial report was there to draw, unsaid); else that nothing is yet
    (found by a hunt: ``train`` stopped in its first round of seeds pointed to
    ``--report-only``, which then refused the ``--out`` for its missing runs.csv)."""
    report_table = getattr(args, "report_table", None)
    if report_table is None:
        return ""
    table = report_table(args)
    if table.is_file():
        return "; --report-only with the same --out draws the report of what finished"
    return f"; nothing --report-only could draw was written yet (no {table}): run it again"


def _paragraph(text: str) -> str:
    # the help formatter keeps line breaks (for the examples), so wrap prose here
    return textwrap.fill(text, width=88)


def _version() -> str:
    try:
        return metadata.version("riemann-bench")
    except metadata.PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    sys.exit(main())
