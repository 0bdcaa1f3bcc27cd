"""The environment record."""

import torch

from riemann_core.measure import environment


def test_environment_record_names_what_a_report_needs():
    env = environment.environment("cpu")
    for key in ("commit", "torch", "device_name", "cpu", "threads", "blas", "python"):
        assert env[key] not in ("", None)
    assert env["torch"] == torch.__version__


def test_the_commit_is_unknown_for_a_copy_installed_inside_another_checkout(tmp_path):
    """Found by review: a package installed (not editable) into an environment inside a
    checkout was recorded as that checkout's HEAD, clean, whatever code it held."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    tracked = tmp_path / "riemann_core"
    tracked.mkdir()
    (tracked / "__init__.py").write_text("")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    installed = tmp_path / ".venv" / "site-packages" / "riemann_core"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")
    assert environment.git_commit(installed) == "unknown"
    commit = environment.git_commit(tracked)
    assert len(commit) == 12 and int(commit, 16) >= 0


def test_the_code_fingerprint_follows_the_sources_alone(tmp_path):
    """Equal for copies of the same sources (wherever they lie, with or without compiled
    caches beside them), different once one byte of one module changes."""
    copies = []
    for name in ("a", "b"):
        package = tmp_path / name / "riemann_core"
        (package / "sub").mkdir(parents=True)
        (package / "__init__.py").write_text("x = 1\n")
        (package / "sub" / "m.py").write_text("y = 2\n")
        copies.append(package)
    (copies[1] / "sub" / "m.cpython-311.pyc").write_bytes(b"\0cache")
    assert environment.code_fingerprint(copies[0]) == environment.code_fingerprint(copies[1])
    (copies[1] / "sub" / "m.py").write_text("y = 3\n")
    environment.code_fingerprint.cache_clear()
    assert environment.code_fingerprint(copies[0]) != environment.code_fingerprint(copies[1])
    assert len(environment.code_fingerprint()) == 12  # this package's own
