"""Warnings shown at the user's line."""

from __future__ import annotations

import os
import sys
import warnings

import torch

#: Frames in files under these directories are the package's own, or torch's calling it
#: (a module's hooks, autograd running a backward hook).
_SKIPPED = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules[__package__], torch)
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside the package and torch (the
    user's ``rc.direction``, ``pre.step()`` or ``pre.backward(loss)``), however deep in
    the package the warning arises: a fixed ``stacklevel`` pointed into it (found by
    review: ``direction.py:173`` where the user called ``rc.direction``), where a filter
    by module, or ``-W error`` for the user's own code, missed it. (Python 3.12's
    ``skip_file_prefixes`` does this; 3.10 and 3.11 have no such option.)"""
    frame, level = sys._getframe(1), 2  # level 2: the caller of this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
