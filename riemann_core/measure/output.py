"""Result files written atomically (never half-written) and read back with checks; the
figures and Markdown tables of the reports."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def check_place(path: Path) -> None:
    """A ``ValueError`` naming ``path`` where something other than a file is there (a
    directory): an output written there would fail with a bare ``[Errno 21]``."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{path} is not a file (a directory?): move it away")


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename (a place
    that is no file, a directory, refused by name: found by a hunt, a bare ``[Errno 21]``)."""
    check_place(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: significant digits of a table computed from recorded results (fits, slopes): more than
#: any measurement carries, fewer than the 17 of a float's repr, whose last digits differ
#: between machines (their BLAS computes a least-squares fit in another order), so a
#: table computed again from the same results is the same file wherever it is computed
DERIVED_DIGITS = 10


def derived_csv(frame: pd.DataFrame) -> str:
    """``frame`` (computed from recorded results) as CSV, its floats to
    :data:`DERIVED_DIGITS` significant digits, but a column of whole numbers (counts of
    FLOPs or bytes copied from the results, past 10 digits at large sizes; below 2^53,
    where a float holds every whole number) whole; the
    results themselves keep every digit."""
    frame = frame.copy()
    for column in frame.select_dtypes("float"):
        values = frame[column].dropna()
        if not values.empty and ((values % 1 == 0) & (values.abs() < 2**53)).all():
            frame[column] = frame[column].astype("Int64")
    return frame.to_csv(index=False, float_format=f"%.{DERIVED_DIGITS}g")


def check_writable(directory: Path, option: str = "--out") -> None:
    """An ``OSError`` naming ``directory`` and the fix where no file can be made in it (a
    read-only directory or file system, another user's), checked before a command's work:
    the first write would otherwise fail after it, naming a temporary file (found by a
    hunt: ``fit`` on a read-only sweep gave a bare ``[Errno 13]`` once its fits were done).
    ``option``: the command-line option that chose the directory."""
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        raise OSError(
            f"cannot write into {directory} ({err.strerror or err}): make it writable, or "
            f"pass another {option}"
        ) from err


#: The record file each command that fills a directory writes there, and the command: a
#: directory holds the results of one of them (their tables and reports share names).
RECORDS = {
    "sweep.json": "sweep",
    "run.json": "distributed",
    "training.json": "train",
    "stability.json": "stability",
}


def check_not_foreign(out: Path, record: str) -> None:
    """Refuse ``out`` where it holds another command's results (another record of
    :data:`RECORDS` than ``record``, this command's), before any work: this command would
    overwrite them (found by a hunt: ``distributed --out`` on a sweep's directory replaced
    its results.csv, claims.json and report.md) or move them aside."""
    for name, command in RECORDS.items():
        if name != record and (out / name).is_file():
            raise ValueError(
                f"{out} holds the results of 'riemann-bench {command}' ({name}), which this "
                "command would overwrite: pass another --out"
            )


def set_aside(out: Path, patterns: tuple[str, ...]) -> Path | None:
    """Move the files of ``out`` that match ``patterns`` (globs) into a new directory
    ``out/earlier-<UTC time>``, and return it (``None`` where none matched): a study run
    again into its ``--out`` starts afresh, and the earlier one is kept whole, whatever
    happens to the new one."""
    found = sorted({f for pattern in patterns for f in out.glob(pattern) if f.is_file()})
    if not found:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = out / f"earlier-{stamp}"
    for n in range(1, 1000):
        try:
            aside.mkdir()
            break
        except FileExistsError:
            aside = out / f"earlier-{stamp}-{n}"
    moved = 0
    try:
        for f in found:
            os.replace(f, aside / f.name)
            moved += 1
    except KeyboardInterrupt:  # Ctrl-C midway: the rest follows (a failed move is raised)
        for f in found[moved:]:
            with contextlib.suppress(OSError):  # the interrupt is what is raised
                if f.exists():
                    os.replace(f, aside / f.name)
        raise
    return aside


def generated_block(text: str, name: str, path: Path | None = None) -> tuple[int, int]:
    """Where the generated block ``name`` of a Markdown file's ``text`` lies: the span
    ``(start, end)`` between its lines ``<!-- name: begin -->`` and ``<!-- name: end -->``.
    Raises ``ValueError`` naming the fix when the markers are missing, repeated or out of
    order (the file is left alone)."""
    begin, end = f"<!-- {name}: begin -->\n", f"<!-- {name}: end -->"
    counts = text.count(begin), text.count(end)
    if counts != (1, 1) or text.index(begin) > text.index(end):
        raise ValueError(
            f"{path or 'the file'} needs exactly one line {begin.strip()!r} and, after it, one line "
            f"{end!r} around the block to regenerate (found {counts[0]} and {counts[1]}); "
            "add them where the table goes"
        )
    return text.index(begin) + len(begin), text.index(end)


def replace_generated_block(path: Path, name: str, block: str) -> Path:
    """Replace the generated block ``name`` of the Markdown file ``path``
    (:func:`generated_block`) by ``block``, atomically; the rest of the file is kept (a
    symbolic link stays one: its target is rewritten)."""
    text = path.read_text()
    start, end = generated_block(text, name, path)
    write_atomic(path.resolve(), text[:start] + block.rstrip("\n") + "\n" + text[end:])
    return path


@contextmanager
def results_directory(out: Path) -> Iterator[Path]:
    """``out`` made (with its missing parents) for a command's results, and checked
    writable before any work; if the command fails before it writes anything there, it is
    removed again with the parents it made: a failed start leaves no empty directory
    behind, and never touches one that was there."""
    made = [d for d in (out, *out.parents) if not d.exists()]  # out first
    out.mkdir(parents=True, exist_ok=True)
    try:
        check_writable(out)  # an --out we cannot write to stops us here
        yield out
    except BaseException:
        for directory in made:  # rmdir removes empty directories only
            try:
                directory.rmdir()
            except OSError:  # it holds results or another directory, or is x/.. of x/../y
                continue
        raise


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden directory in ``out`` to write a command's outputs in, under their own names;
    when the block ends without error each file moves to its place in ``out`` (a rename),
    else they are all dropped. A command that fails half way, in its work or in a write
    (a full disk), so leaves every earlier output as it was, never new ones beside old: a
    place that is no file (a directory) is refused before any move, and a move that fails
    puts the files moved before it back (found by a hunt: ``fit`` had rewritten two of its
    three files when the third's place was a directory, with a bare ``[Errno 21]``)."""
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staged-"))
    try:
        yield stage
        new = [p for p in sorted(stage.rglob("*")) if p.is_file()]
        places = [out / p.relative_to(stage) for p in new]
        for place in places:  # (nothing written yet)
            check_place(place)
        _move_all(new, places, Path(tempfile.mkdtemp(dir=stage, prefix=".old-")))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _move_all(new: list[Path], places: list[Path], old: Path) -> None:
    """Each of ``new`` to its place, the file there kept in ``old`` until all moved; on a
    failure the places are as they were, or, where one cannot be put back, the files not
    put back are kept beside them (``old`` moved out of the stage) and the error says so."""
    done: list[tuple[Path, Path | None]] = []  # (place, its old file kept, or None)
    try:
        for i, (path, place) in enumerate(zip(new, places, strict=True)):
            place.parent.mkdir(parents=True, exist_ok=True)
            kept = None
            if place.exists():
                kept = old / str(i)
                os.replace(place, kept)
            done.append((place, kept))
            os.replace(path, place)
    except BaseException as err:
        stuck = []  # (found by review: one failed put-back lost the rest with the stage)
        for place, kept in reversed(done):
            try:
                if kept is not None:
                    os.replace(kept, place)
                else:
                    place.unlink(missing_ok=True)
            except OSError:
                stuck.append(place)
        if stuck:
            aside = old.parent.parent / f".kept{old.name}"  # in the outputs, out of the stage
            os.replace(old, aside)
            raise OSError(
                f"writing the outputs failed ({err}) and {[str(p) for p in stuck]} could "
                f"not be put back: their earlier files are in {aside}"
            ) from err
        raise


def write_json(out: Path, name: str, payload: dict) -> Path:
    return write_atomic(out / name, json.dumps(payload, indent=2) + "\n")


def rerun(command: str) -> str:
    """The fix a refused study result names: run its command again into the folder."""
    return f"rerun '{command}' with this --out"


def read_study(
    out: Path,
    tables: dict[str, tuple[str, ...]],
    record: str,
    keys: tuple[str, ...],
    command: str,
    numeric: dict[str, tuple[str, ...]] | None = None,
    measured: dict[str, tuple[str, ...]] | None = None,
) -> tuple[list, dict]:
    """The CSV ``tables`` (name -> required columns) and the JSON ``record`` of a study in
    ``out``; missing, corrupted, empty or foreign files, a cell of a ``numeric`` column
    (name -> columns) that is not a number (blank is NaN), and a blank, NaN or infinite
    cell of a ``measured`` column (name -> numeric columns) in a row whose ``status`` is
    ``ok`` raise ``ValueError`` naming the file (and the line) and ``command``. A run
    writes a finite measurement in every row it marks ok (a diverged or failed row may
    hold none), so anything else there would flow into the report as if measured."""
    import numpy as np
    import pandas as pd

    fix = rerun(command)
    missing = [str(out / f) for f in (*tables, record) if not (out / f).is_file()]
    # another command's directory: its record named (found by a hunt: the advice to run
    # the study there, which refuses a directory holding another command's results)
    foreign = [
        f"'riemann-bench {c}'" for n, c in RECORDS.items() if n != record and (out / n).is_file()
    ]
    if missing and foreign:
        raise ValueError(
            f"{out} holds the results of {foreign[0]}, not of '{command}': pass the --out "
            f"of a '{command}' run"
        )
    if missing:
        earlier = max(out.glob("earlier-*"), key=lambda d: d.stat().st_mtime, default=None)
        aside = f" (an earlier study was set aside in {earlier})" if earlier else ""
        raise ValueError(
            f"no results at {', '.join(missing)}{aside}; run '{command}' with this --out first"
        )
    try:
        frames = [pd.read_csv(out / name) for name in tables]
        meta = json.loads((out / record).read_text())
    except (pd.errors.ParserError, pd.errors.EmptyDataError, json.JSONDecodeError,
            UnicodeDecodeError) as err:  # fmt: skip
        raise ValueError(
            f"cannot read the results in {out} ({err}); they are corrupted: {fix}"
        ) from err
    for frame, (name, columns) in zip(frames, tables.items()):
        absent = [c for c in columns if c not in frame.columns]
        if absent:
            raise ValueError(
                f"{out / name} lacks columns {absent}; it was not written by this version: {fix}"
            )
        if frame.empty:
            raise ValueError(f"{out / name} holds no rows: {fix}")
        for column in (numeric or {}).get(name, ()):
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = values.isna() & frame[column].notna()
            if bad.any():
                line, value = int(bad.idxmax()) + 2, frame[column][bad].iloc[0]  # + header
                raise ValueError(
                    f"{out / name} line {line}: {column} is {value!r}, not a number: {fix}"
                )
            frame[column] = values
        for column in (measured or {}).get(name, ()):
            bad = (frame["status"] == "ok") & ~np.isfinite(frame[column])
            if bad.any():
                line, value = int(bad.idxmax()) + 2, frame[column][bad].iloc[0]
                shown = "blank or NaN" if np.isnan(value) else f"{value:g}"
                raise ValueError(
                    f"{out / name} line {line}: {column} is {shown}, but a row with status ok "
                    f"holds a finite measurement: {fix}"
                )
    if not isinstance(meta, dict) or not set(keys) <= meta.keys():
        raise ValueError(f"{out / record} lacks the record of the run ({', '.join(keys)}); {fix}")
    return frames, meta


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: figures go to files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def suptitle(fig, text: str) -> None:
    """``fig.suptitle(text)``, each line wrapped to the figure's width (a character taken
    as 0.6 of the font size): a title written for several panels was cut off at both
    sides of a figure of one."""
    title = fig.suptitle(text)
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * title.get_fontsize())))
    title.set_text("\n".join(textwrap.fill(line, chars) for line in text.split("\n")))


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig`` (unless it has a layout engine of its own), write it to ``path``
    and free it."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".3g") -> str:
    """``frame`` as a Markdown table; a ``|`` in a cell escaped and a line break made a
    space, which would otherwise end the cell or the row (a ``--cases 'layerwise|step'``
    or a recorded value holding one)."""

    def cell(value) -> str:
        text = format(value, floatfmt) if isinstance(value, float) else str(value)
        return " ".join(text.splitlines()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


@contextmanager
def progress_bar(
    desc: str, unit: str = "step", total: int | None = None, announce: bool = False
) -> Iterator[Callable[[str], None]]:
    """A progress bar on stderr while the block runs (tqdm; gone when it ends). Yields
    ``advance(label)``, which counts one step done and shows ``label``; with ``announce``,
    ``label`` names the step about to run instead, and the step before it counts done (the
    last one when the block ends: announced steps counted at their start read 100% while
    the last one ran, minutes in ``targets``). Without ``total`` the bar shows the count
    and the elapsed time."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr) as bar:
        running = False  # an announced step is running

        def advance(label: str) -> None:
            nonlocal running
            if running or not announce:
                bar.update(1)
            running = announce
            bar.set_postfix_str(label, refresh=not announce)

        yield advance
        if running:
            bar.update(1)
