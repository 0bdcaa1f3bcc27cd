"""The ``riemann-bench`` command line.

Every subcommand takes the same four options with the same meaning: ``--device`` (``cpu``, or
``cuda[:N]`` where CUDA is available), ``--out`` (the results directory; the pipeline
commands default to ``reports/<device>``), ``--quick`` (a smaller problem or grid) and
``--seed``.
Each subcommand's ``--help`` ends with an example invocation.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from . import demo, pipeline, stability, targets, training

PROG = "riemann-bench"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``riemann-bench`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = " ".join([PROG, *argv])  # recorded with the results
    return args.run(args)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_paragraph(
            "Reference implementation and measuring instrument for the layerwise Riemannian "
            "metric (Pehle & Slotine, arXiv 2603.03610) and the methods it is compared with."
        ),
        epilog=f"example:\n  {PROG} demo --quick\n\nrun '{PROG} COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    for name, module in (
        ("demo", demo),
        ("targets", targets),
        ("train", training),
        ("stability", stability),
    ):
        parser_ = commands.add_parser(
            name,
            parents=[common],
            help=module.HELP,
            description=_paragraph(module.DESCRIPTION),
            epilog=f"example:\n  {PROG} {module.EXAMPLE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser_)
        parser_.set_defaults(run=pipeline.guarded(module.run))
    pipeline.register(commands, common, argparse.RawDescriptionHelpFormatter, _paragraph, PROG)
    return parser


def _paragraph(text: str) -> str:
    # the help formatter keeps line breaks (for the examples), so wrap prose here
    return textwrap.fill(text, width=88)


def _version() -> str:
    try:
        return metadata.version("riemann-bench")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _device(name: str) -> torch.device:
    """argparse type for ``--device``: a usable ``cpu`` or ``cuda[:N]`` device."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(
            f"unknown device {name!r}; use 'cpu' or 'cuda' (or 'cuda:N')"
        ) from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(
            f"unsupported device {name!r}; use 'cpu' or 'cuda' (or 'cuda:N')"
        )
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"device {name!r} requested but CUDA is not available to this torch "
            f"({torch.__version__}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(
            f"device {name!r} requested but only {count} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return device


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand shares, as a parent parser."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument(
        "--device",
        type=_device,
        default="cpu",
        help="torch device to run on: cpu, or cuda[:N] where available (default: cpu)",
    )
    group.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="directory for the results, created if missing (default: reports/<device> "
        "for the pipeline commands, with /training or /stability appended for train and "
        "stability, reports/<device>/quick/... with --quick; print only for demo and "
        "targets)",
    )
    group.add_argument(
        "--quick",
        action="store_true",
        help="a smaller problem or grid (minutes, not tens of minutes)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for data, models and sampling; for fit/validate/report the bootstrap "
        "(default: 0)",
    )
    return common


if __name__ == "__main__":
    sys.exit(main())
