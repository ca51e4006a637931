"""The error of everything checkpoint-shaped: a missing, corrupt, incomplete or foreign one."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory or file at fault."""
