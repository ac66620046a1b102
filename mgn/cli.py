"""How every entry point ends on a bad flag, bad input or a diverged run: one line, a documented exit code.

    exit 2  a configuration or input error: a flag out of range, a missing shard or checkpoint, unusable data,
            no usable device; `<prog>: error: <what, naming the flag or file, and what is allowed>`
    exit 3  a training run that diverged and stopped (train.on_divergence=stop, or no rollback left): its
            message, already logged by the run, names the step, the last verified checkpoint and the resume

A stack trace helps nobody who passed a wrong flag, so none is printed for these; any other exception is a
bug and keeps its traceback. MGN_TRACEBACK=1 prints the traceback for these too. This module imports nothing
heavy: `--help` and flag errors must answer before torch loads.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean the user's input is wrong, not the code. Imported here, on failure only."""
    from mgn.checkpoint import CheckpointError  # noqa: PLC0415 - torch: only once something failed
    from mgn.data import BadDataError  # noqa: PLC0415
    from mgn.distributed import DeviceError  # noqa: PLC0415
    from mgn.guard import NonFiniteError  # noqa: PLC0415
    from mgn.tar import ShardError  # noqa: PLC0415

    return ValueError, OSError, CheckpointError, BadDataError, DeviceError, NonFiniteError, ShardError


def run_command(prog: str, main: Callable[[], int]) -> int:
    """`main()`'s exit code, or one line on stderr and 2 (bad input) or 3 (a diverged run) instead of a traceback."""
    try:
        return main()
    except Exception as error:  # noqa: BLE001 - sorted below: user errors get a line, bugs their traceback
        from mgn.guard import Diverged  # noqa: PLC0415

        if not isinstance(error, user_errors()):
            raise
        if os.environ.get("MGN_TRACEBACK"):
            traceback.print_exc()
        if isinstance(error, Diverged):  # the run logged it already, on every rank
            return EXIT_DIVERGED
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
