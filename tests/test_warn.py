"""Where the core's warnings are attributed (``riemann_core._warn``)."""

import _thread
import os
import warnings

import riemann_core
from riemann_core._warn import warn

PACKAGE = os.path.dirname(os.path.abspath(riemann_core.__file__))


def test_code_named_in_angle_brackets_is_the_users_in_the_packages_directory(monkeypatch):
    """Found by review: ``<string>`` (``python -c``, ``exec``) or ``<stdin>``, made
    absolute, read as a file in the working directory, so run from inside the package's
    directory the user's own line was skipped (here the warning went to this file's)."""
    monkeypatch.chdir(PACKAGE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile("warn('said')", "<string>", "exec"), {"warn": warn})
    assert [w.filename for w in caught] == ["<string>"]


def test_a_stack_of_the_packages_frames_alone_names_its_outermost_not_sys():
    """Found by review: where every frame is skipped (a thread started from C whose
    outermost frame is the package's), the stacklevel ran past the stack and the warning
    read ``sys:1``."""
    where = os.path.join(PACKAGE, "outermost.py")
    code = compile("try:\n    warn('said')\nfinally:\n    done.release()\n", where, "exec")
    done = _thread.allocate_lock()
    done.acquire()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _thread.start_new_thread(exec, (code, {"warn": warn, "done": done}))  # no Python caller
        assert done.acquire(timeout=60)
    assert [(w.filename, w.lineno) for w in caught] == [(where, 2)]
