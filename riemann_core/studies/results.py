"""Checks of a study's recorded results that :func:`~riemann_core.measure.output.read_study`
leaves to the study: rows cut short, labels the study never writes, numbers out of their
range, fields of the JSON record of the wrong kind, and a recorded command and environment
the report cannot draw.

Each raises ``ValueError`` naming the file, the line (or the key) and the fix, as
``read_study`` does, so that ``--report-only`` refuses the results before it writes
anything (the CLI turns the error into exit code 2).
"""

from __future__ import annotations

import csv
import io
import math
import reprlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from ..arguments import RECORDED_SEED
from ..measure.environment import provenance_problem
from ..measure.output import rerun


class Range(NamedTuple):
    """The values a numeric column can hold, as the study writes them."""

    text: str  # what the refusal says the value must be
    holds: Callable[[pd.Series], pd.Series]


# an ok row is finite in every measured column (read_study checks it); a diverged row may
# hold inf where a loss or distance blew up, so only the settings are bounded above
POSITIVE = Range("positive and finite", lambda v: (v > 0) & (v < math.inf))
NON_NEGATIVE = Range(">= 0", lambda v: v >= 0)
FRACTION = Range("within [0, 1]", lambda v: (v >= 0) & (v <= 1))
COUNT = Range("a whole number >= 0", lambda v: (v >= 0) & (v % 1 == 0))


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


#: the kind of a recorded ``--seed``
SEED = f"a seed, a whole number from 0 to {RECORDED_SEED}"
#: the JSON kinds of a record's fields, under the words a refusal names them with
KINDS: dict[str, Callable[[object], bool]] = {
    SEED: lambda v: _whole(v) and v <= RECORDED_SEED,
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a list of names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "text": lambda v: isinstance(v, str),
    "a finite number": _number,
    "a whole number >= 0": _whole,
    "a list of finite numbers": lambda v: isinstance(v, list) and all(map(_number, v)),
    "a list of whole numbers >= 0": lambda v: isinstance(v, list) and all(map(_whole, v)),
    "an object of lists of finite numbers": lambda v: (
        isinstance(v, dict)
        and all(isinstance(x, list) and all(map(_number, x)) for x in v.values())
    ),
    "an object of whole numbers >= 0": lambda v: (
        isinstance(v, dict) and all(map(_whole, v.values()))
    ),
}


def check_whole_rows(path: Path, command: str) -> None:
    """Refuse a CSV file cut short: a row with fewer fields than the header, or a last line
    without its line break (pandas writes one after every row). pandas would read the
    missing cells as blanks, and a row cut before its status as one that measured nothing.

    Called before ``read_study``, which names a missing or unreadable file."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    truncated = f"the file is truncated; {rerun(command)}, or restore the file"
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        return
    for row in rows:
        if row and len(row) < len(header):  # pandas skips blank lines, and so does this
            raise ValueError(
                f"{path} line {rows.line_num} has {len(row)} of {len(header)} fields: {truncated}"
            )
    if not text.endswith("\n"):
        raise ValueError(f"{path} line {rows.line_num} ends without a line break: {truncated}")


def check_rows(
    frame: pd.DataFrame,
    path: Path,
    command: str,
    labels: dict[str, Iterable[str]],
    ranges: dict[str, Range],
    every_row: Iterable[str],
) -> None:
    """Refuse a row of ``frame`` (read from ``path`` by ``read_study``) whose text column
    is blank or not one of its ``labels`` (column -> allowed values), that lacks a number
    the study writes in ``every_row``, or whose number lies outside its column's
    :class:`Range` (``ranges``: column -> range). Other blanks are left to ``read_study``:
    a diverged row may lack its measurements, an ok row may not."""
    fix = rerun(command)
    for column, allowed in labels.items():
        allowed = list(allowed)
        bad = ~frame[column].isin(allowed)
        if bad.any():
            line, value = first_line(bad), frame[column][bad].iloc[0]
            shown = "blank" if pd.isna(value) else repr(value)
            raise ValueError(
                f"{path} line {line}: {column} is {shown}, not one of those the study records "
                f"({', '.join(allowed)}): {fix}"
            )
    for column in every_row:
        bad = frame[column].isna()
        if bad.any():
            raise ValueError(
                f"{path} line {first_line(bad)}: {column} is blank, but the study records it in "
                f"every row: {fix}"
            )
    for column, allowed in ranges.items():
        values = frame[column]
        bad = values.notna() & ~allowed.holds(values)
        if bad.any():
            raise ValueError(
                f"{path} line {first_line(bad)}: {column} is {values[bad].iloc[0]:g}, but it must "
                f"be {allowed.text}: {fix}"
            )


def check_record(
    record: dict, path: Path, command: str, fields: dict[str, str | dict], within: str = ""
) -> None:
    """Refuse a JSON ``record`` that lacks one of ``fields`` (key -> one of :data:`KINDS`,
    or the fields of a nested object) or holds another kind of value there: the report
    would stop on a ``KeyError`` or ``TypeError`` half way instead."""
    for key, kind in fields.items():
        name = within + key
        if key not in record:
            raise ValueError(f"{path} lacks {name!r}: {rerun(command)}")
        value = record[key]
        expected = "an object" if isinstance(kind, dict) else kind
        if not KINDS[expected](value):
            raise ValueError(
                f"{path}: {name!r} is {reprlib.repr(value)}, but the study records "
                f"{expected} there: {rerun(command)}"
            )
        if isinstance(kind, dict):
            check_record(value, path, command, kind, f"{name}.")


def check_provenance(record: dict, path: Path, command: str) -> None:
    """Refuse the ``command`` and ``environment`` of ``record`` (of the kinds
    :func:`check_record` checked) that the report cannot draw as ``command`` writes them
    (:func:`~riemann_core.measure.environment.provenance_problem`): another command, one
    with a line break (a ``# heading`` after it rewrote report.md), an environment without
    the entries the report reads, or of another device than the command's ``--device``."""
    if problem := provenance_problem(record, command):
        raise ValueError(f"{path}: {problem}: {rerun(command)}")


def check_options(record: dict, key: str, path: Path, command: str, check: Callable) -> None:
    """Refuse the options ``record[key]`` (of the kinds :func:`check_record` checked) that
    the command itself refuses (``check``: its own checks of its options): an unknown name,
    a number out of range, a value given twice, which the report would otherwise print as
    recorded (found by a hunt: a target accuracy of 7, a learning rate "abc")."""
    try:
        check(record[key])
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{path}: {key!r} holds options the command refuses ({err}): {rerun(command)}"
        ) from None


def first_line(bad: pd.Series) -> int:
    """The file line of the first row marked ``bad`` (after the header, as read_study)."""
    return int(bad.idxmax()) + 2
