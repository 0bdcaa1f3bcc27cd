"""Result files are written atomically."""

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
