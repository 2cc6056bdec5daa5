"""Errors of the package's jobs (`qlora-kernels finetune`, `qlora-kernels bench`).

The command line turns them into an exit code and one line on stderr; any other exception
is a bug and keeps its traceback.
"""

from __future__ import annotations


class JobArgumentError(ValueError):
    """A job was given an argument it cannot run with (a size preset, a step count, a device)."""


class JobFailed(RuntimeError):
    """A job could not run here or its result cannot be trusted (a missing dependency, a
    non-finite loss, ours disagreeing with the baseline)."""
