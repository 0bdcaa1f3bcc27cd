"""Result files are written atomically."""

import io
import json

import pytest

from riemann_core.measure import output


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path):
    path = output.write_json(tmp_path, "r.json", {"a": 1})
    with pytest.raises(TypeError):
        output.write_json(tmp_path, "r.json", {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = output.write_json(tmp_path, "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_study_set_aside_stays_whole_when_interrupted(tmp_path, monkeypatch):
    """Found by review: Ctrl-C during the moves split the earlier study between --out and
    the new directory (and the next rerun split it again)."""
    names = ["a.json", "b.csv", "c.png", "d.md"]
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / "other.txt").write_text("kept")
    replace, calls = output.os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:
            replace(src, dst)  # the second file moved, then Ctrl-C
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(output.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.set_aside(tmp_path, ("*.json", "*.csv", "*.png", "*.md"))
    (aside,) = tmp_path.glob("earlier-*")
    assert sorted(f.name for f in aside.iterdir()) == names
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_file()) == ["other.txt"]


def test_results_missing_beside_a_study_set_aside_name_it(tmp_path):
    """A rerun that failed before writing leaves only the study it set aside: say where."""
    (tmp_path / "earlier-20261203T000000Z").mkdir()
    with pytest.raises(ValueError, match=r"set aside in .*earlier-20261203T000000Z"):
        output.read_study(tmp_path, {"runs.csv": ()}, "training.json", (), "riemann-bench train")


def test_a_failed_move_is_raised_once_and_nothing_is_retried(tmp_path, monkeypatch):
    """Found by review: the interrupt's clean-up ran for any error, retried the failed file
    and raised a second error over the first."""
    for name in ("a.json", "b.csv", "c.png"):
        (tmp_path / name).write_text(name)
    replace, calls = output.os.replace, []

    def refused(src, dst):
        calls.append(src.name)
        if src.name == "b.csv":
            raise PermissionError(13, "Permission denied", str(src))
        replace(src, dst)

    monkeypatch.setattr(output.os, "replace", refused)
    with pytest.raises(PermissionError) as error:
        output.set_aside(tmp_path, ("*.json", "*.csv", "*.png"))
    assert calls == ["a.json", "b.csv"] and error.value.__context__ is None


@pytest.mark.parametrize("announce", [False, True], ids=["after", "announced"])
def test_the_progress_bar_counts_a_step_when_it_is_done(monkeypatch, announce):
    """Found on a targets run: steps announced before they ran were counted at their start,
    and the bar read 100% through the last one (K-FAC at batch 1024, minutes)."""
    import tqdm

    counts = []

    class Recorded(tqdm.tqdm):
        def update(self, n=1):
            super().update(n)
            counts.append(self.n)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    with output.progress_bar("steps", total=3, announce=announce) as advance:
        for label in ("first", "second", "third"):
            advance(label)
            counts.append(f"ran {label}")  # the step's work, after its announcement
    if announce:
        assert counts == ["ran first", 1, "ran second", 2, "ran third", 3]
    else:  # advance(label) after each step's work: here the work of the one before
        assert counts == [1, "ran first", 2, "ran second", 3, "ran third"]


@pytest.mark.parametrize("width", [2.8, 5.6, 11.0])
def test_a_figure_title_is_wrapped_inside_the_figure(width):
    """Found in the reports: a two-line title written for several panels was cut off at
    both sides of a one-method figure."""
    plt = output.pyplot()
    fig, ax = plt.subplots(figsize=(width, 3))
    ax.plot([1, 2], [1, 2])
    text = (
        "neighbouring runs against the damping mu\n(median over pairs, bars min to max; "
        "grid points where every pair trained)"
    )
    output.suptitle(fig, text)
    fig.tight_layout()
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
    assert fig._suptitle.get_text().split() == text.split()  # every word kept
    plt.close(fig)


def _outputs(out, text: str) -> None:
    with output.staged(out) as stage:
        for name in ("a.csv", "b.csv", "c.csv"):
            (stage / name).write_text(text)


def test_staged_outputs_are_all_written_or_none(tmp_path, monkeypatch):
    """Found by a hunt: fit rewrote two of its three files, then failed on the third,
    whose place was a directory, with a bare [Errno 21]. Such a place is refused before any
    move, and a move that fails puts the ones before it back."""
    _outputs(tmp_path, "old")
    (tmp_path / "b.csv").unlink()
    (tmp_path / "b.csv").mkdir()
    with pytest.raises(ValueError, match=r"b.csv is not a file \(a directory\?\): move it"):
        _outputs(tmp_path, "new")
    assert [(tmp_path / n).read_text() for n in ("a.csv", "c.csv")] == ["old", "old"]
    (tmp_path / "b.csv").rmdir()
    replace, failed = output.os.replace, []

    def failing(source, target):  # the third file's move fails once (a full disk)
        if str(target).endswith("c.csv") and ".staged-" in str(source) and not failed:
            failed.append(target)
            raise OSError("no space left on device")
        replace(source, target)

    monkeypatch.setattr(output.os, "replace", failing)
    with pytest.raises(OSError, match="no space"):
        _outputs(tmp_path, "new")
    assert (tmp_path / "a.csv").read_text() == "old" and not (tmp_path / "b.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "c.csv"]  # no stage left


def test_an_atomic_write_over_a_directory_is_refused_by_name(tmp_path):
    """Found by a hunt: validate with a directory named claims.json failed with a bare
    [Errno 21]."""
    (tmp_path / "claims.json").mkdir()
    with pytest.raises(ValueError, match=r"claims.json is not a file \(a directory\?\)"):
        output.write_atomic(tmp_path / "claims.json", "{}")
    assert (tmp_path / "claims.json").is_dir() and len(list(tmp_path.iterdir())) == 1


def test_files_that_cannot_be_put_back_are_kept_and_named(tmp_path, monkeypatch):
    """Found by review: a put-back that failed too lost the earlier files with the stage."""
    _outputs(tmp_path, "old")
    replace = output.os.replace

    def failing(source, target):  # the third move fails, and so does putting a.csv back
        if (
            str(target).endswith("c.csv")
            and ".old-" not in str(source)
            and ".staged-" in str(source)
        ):
            raise OSError("no space left on device")
        if str(target).endswith("a.csv") and ".old-" in str(source):
            raise OSError("still no space")
        replace(source, target)

    monkeypatch.setattr(output.os, "replace", failing)
    with pytest.raises(OSError, match=r"could not be put back: their earlier files are in"):
        _outputs(tmp_path, "new")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".kept")]
    assert len(kept) == 1 and (kept[0] / "0").read_text() == "old"  # a.csv's, kept
    assert [(tmp_path / n).read_text() for n in ("b.csv", "c.csv")] == ["old", "old"]


def test_a_derived_table_is_the_same_file_from_last_digits_another_machine_computes():
    """The committed stability slopes and fits, computed again on another CPU, differed
    in their 15th-17th digits (its BLAS sums a least-squares fit in another order)."""
    import pandas as pd

    here = pd.DataFrame({"slope": [-0.00708510369175597], "flops": [12953482247.0]})
    there = pd.DataFrame({"slope": [-0.0070851036917557704], "flops": [12953482247.0]})
    assert here.to_csv() != there.to_csv()
    assert output.derived_csv(here) == output.derived_csv(there)
    # counts keep every digit (past the significant digits of the derived figures)
    assert output.derived_csv(here) == "slope,flops\n-0.007085103692,12953482247\n"
    assert pd.read_csv(io.StringIO(output.derived_csv(here)))["flops"][0] == 12953482247


def test_a_table_cell_with_a_pipe_or_a_line_break_stays_one_cell_of_one_row():
    """A ``|`` in a cell (a ``--cases 'layerwise|step'``, a recorded value) ended the
    cell, and a line break the row: the table lost its columns."""
    import pandas as pd

    table = output.markdown_table(pd.DataFrame({"case": ["layerwise|step", "a\nb"], "x": [1.0, 2]}))
    assert table.splitlines() == [
        "| case | x |",
        "|---|---|",
        r"| layerwise\|step | 1 |",
        "| a b | 2 |",
    ]
