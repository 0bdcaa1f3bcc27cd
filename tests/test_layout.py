"""The package layout: imports flow one way, and the core needs none of the measuring tools."""

import ast
import doctest
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import riemann_core

ROOT = Path(riemann_core.__file__).parent
#: a module may import from its own layer and the layers before it, never after
LAYERS = {"core": 0, "measure": 1, "arguments": 1, "scaling": 2, "studies": 2, "cli": 3}


def layer(module: str) -> str:
    """``riemann_core.scaling.fit`` -> ``scaling``; modules of the core -> ``core``."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    return name if name in LAYERS else "core"


def imported(path: Path) -> set[str]:
    """The ``riemann_core`` modules imported by the file at ``path``, absolute."""
    package = ".".join(("riemann_core", *path.relative_to(ROOT).with_suffix("").parts[:-1]))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found |= {f"{target}.{a.name}" for a in node.names} if not node.module else {target}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] == "riemann_core"}


MODULES = sorted(ROOT.rglob("*.py"))


def tracked_files() -> list[str]:
    """The repository's files as git lists them; the test is skipped outside a checkout."""
    out = subprocess.run(
        ["git", "-C", str(ROOT.parent), "ls-files"], capture_output=True, text=True
    )
    if not out.stdout.split():
        pytest.skip("not a git checkout")
    return out.stdout.split()


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_from_the_core_outwards(path):
    own = layer(".".join(("riemann_core", *path.relative_to(ROOT).with_suffix("").parts)))
    for target in imported(path):
        other = layer(target)
        assert LAYERS[other] < LAYERS[own] or other == own, (
            f"{path.relative_to(ROOT)} ({own}) imports {target} ({other})"
        )


def test_scaling_and_studies_are_independent():
    for a, b in (("scaling", "studies"), ("studies", "scaling")):
        for path in (ROOT / a).rglob("*.py"):
            assert all(layer(t) != b for t in imported(path)), f"{path} imports {b}"


def test_the_core_imports_without_the_measuring_tools():
    heavy = ("pandas", "seaborn", "matplotlib", "sklearn", "scipy", "dask")
    code = (
        f"import sys, riemann_core; print([m for m in sys.modules if m.split('.')[0] in {heavy!r}])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nothing_refers_to_files_outside_the_repository():
    repo, tracked = ROOT.parent, tracked_files()
    outside = ("DESIGN" + ".md", "STYLE" + ".md", "../" + "shared")
    for name in tracked:
        path = repo / name
        if (
            path.suffix in (".py", ".md", ".toml", ".ini", ".cfg", ".json", ".txt")
            and path.is_file()
        ):
            text = path.read_text(errors="ignore")
            assert not any(o in text for o in outside), (
                f"{name} refers to a file outside the repository"
            )


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_tracked_file():
    repo, tracked = ROOT.parent, tracked_files()
    pages = [
        n for n in tracked if n == "README.md" or (n.startswith("docs/") and n.endswith(".md"))
    ]
    broken = []
    for page in pages:
        text = (repo / page).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if not path or re.match(r"[a-z]+:", path):  # an anchor on the page, or a URL
                continue
            resolved = (repo / page).parent / path
            if resolved.resolve().relative_to(repo.resolve()).as_posix() not in tracked:
                broken.append(f"{page}: {target}")
    assert not broken, (
        f"links to files not in the repository (run the command that writes them): {broken}"
    )


def test_every_git_show_of_the_readme_and_docs_names_the_commit_that_wrote_the_file():
    """A cited ``git show REV:PATH`` shows the file of the run the text describes: REV is a
    commit that wrote PATH (``REV^``, the file as it stood before REV, only has to exist).
    Found by an audit: ``git show e3be62a:reports/cpu/targets.md`` cited a run measured at
    e3be62a, whose files 9a90ed4 committed; at e3be62a the file held another machine's run."""
    repo, tracked = ROOT.parent, tracked_files()

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    pages = [n for n in tracked if n == "README.md" or re.fullmatch(r"docs/[^/]+\.md", n)]
    cited = r"git show\s+([0-9a-f]{7,40})([\^~][\^~0-9]*)?:([^`\s]+)`"
    wrong = []
    for page in pages:
        for rev, suffix, path in re.findall(cited, (repo / page).read_text()):
            if git("cat-file", "-e", f"{rev}^{{commit}}").returncode:
                pytest.skip(f"{rev} is not in this clone's history (a shallow clone)")
            if suffix:  # the file before a commit
                wrote = git("cat-file", "-e", f"{rev}{suffix}:{path}").returncode == 0
            else:
                wrote = git("log", "-1", "--format=%H", rev, "--", path).stdout.startswith(rev)
            if not wrote:
                wrong.append(f"{page}: git show {rev}{suffix}:{path}")
    assert not wrong, f"cited commits that did not write the file (cite the one that did): {wrong}"


def test_asv_environments_pin_the_torch_of_the_constraints():
    """asv builds each commit's environment with the tested torch (``constraints.txt``):
    in its matrix, and again where the wheel is installed with the ``compare`` extra, whose
    curvlinops would otherwise be free to pull another torch."""
    repo = ROOT.parent
    (pin,) = re.findall(r"^torch==(\S+)$", (repo / "constraints.txt").read_text(), re.M)
    text = (repo / "asv.conf.json").read_text()
    config = json.loads("\n".join(re.sub(r"^\s*//.*", "", line) for line in text.splitlines()))
    assert config["matrix"]["req"]["torch"] == [pin]
    (install,) = config["install_command"]
    assert f"torch=={pin} " in install and install.endswith("{wheel_file}[compare]")


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(ROOT.rglob("*.py")) if ">>> " in p.read_text()],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_docstrings_examples_hold(path):
    """Each example in a docstring runs and prints what it shows (found in review: one
    read ``-0.0`` where it showed ``0.0``, run by no test)."""
    name = ".".join(("riemann_core", *path.relative_to(ROOT).with_suffix("").parts))
    results = doctest.testmod(importlib.import_module(name.removesuffix(".__init__")))
    assert results.attempted > 0 and results.failed == 0, results
