"""Warnings shown at the user's line."""

from __future__ import annotations

import os
import sys
import warnings

import torch


def _directory(module) -> str:
    return os.path.normcase(os.path.dirname(os.path.abspath(module.__file__))) + os.sep


#: Frames in files under these directories are the package's own, or torch's calling it
#: (a module's hooks, autograd running a backward hook).
_SKIPPED = tuple(_directory(module) for module in (sys.modules[__package__], torch))


def _skipped(filename: str) -> bool:
    """Whether a frame of code from ``filename`` is the package's or torch's. A name in
    angle brackets (``<stdin>``, ``<string>``, ``<frozen runpy>``) is no file: made
    absolute, it read as one in the working directory, so that the user's ``python -c``
    or ``exec`` run from inside the package's directory was skipped (found by review)."""
    if filename.startswith("<"):
        return False
    return os.path.normcase(os.path.abspath(filename)).startswith(_SKIPPED)


class HookWarning(UserWarning):
    """The model's forward pass registers gradient hooks, which run on the metric's factor
    rows too: what such a hook stores holds a metric row afterwards."""


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the package and torch (the
    user's ``rc.direction``, ``pre.step()`` or ``pre.backward(loss)``), however deep in
    the package the warning arises: a fixed ``stacklevel`` pointed into it (found by
    review: ``direction.py:173`` where the user called ``rc.direction``), where a filter
    by module, or ``-W error`` for the user's own code, missed it. (Python 3.12's
    ``skip_file_prefixes`` does this; 3.10 and 3.11 have no such option.) Where no such
    caller is on the stack (a thread whose outermost frame is the package's, as one
    started from C), the outermost frame: past it ``warnings`` names ``sys:1`` (found by
    review)."""
    frame, level = sys._getframe(1), 2  # level 2: the caller of this function
    while frame.f_back is not None and _skipped(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
