"""How every entry point ends on a bad flag, bad input or a diverged run: one line, a documented exit code.

    exit 2  a configuration or input error: a flag out of range, a missing shard or checkpoint, unusable data,
            no usable device; `<prog>: error: <what, naming the flag or file, and what is allowed>`
    exit 3  a training run that diverged and stopped (train.on_divergence=stop, or no rollback left): its
            message, already logged by the run, names the step, the last verified checkpoint and the resume
    exit 4  stopped before its end by a signal or Ctrl-C (a training run saves a checkpoint first and names
            it, with the command that continues it; mgn/train/preemption.py); not a crash, not a finished run

A stack trace helps nobody who passed a wrong flag, so none is printed for these; any other exception is a
bug and keeps its traceback. MGN_TRACEBACK=1 prints the traceback for these too. Every rank of a multi-process
run prints its own line (each checks its own input, before any collective where it can). Every error of the
user's making is a `UserError` (or a ValueError or OSError), so formatting one needs no import of the module
that raised it. This module imports nothing heavy: `--help` and flag errors must answer before torch loads.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_STOPPED = 4

# The signals that stop a training run before its end, each after a checkpoint (mgn/train/preemption.py):
# Slurm's warning before a time limit or a preemption (the job comes back: requeued), a cancellation or Ctrl-C
# (it stops).
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
STOP_SIGNALS = ("SIGTERM", "SIGINT")


class UserError(Exception):
    """An error in what the user gave (a flag, a file, data, a device, a diverged run), not in the code: it
    ends a command with one line and `exit_code`. `logged`: the run already said it (on every rank), so
    nothing more is printed."""
    exit_code = EXIT_BAD_INPUT
    logged = False


def run_command(prog: str, main: Callable[[], int], also: tuple[type[BaseException], ...] = ()) -> int:
    """`main()`'s exit code, or one line on stderr and the error's code (2: bad input, 3: a diverged run, 4:
    Ctrl-C) instead of a traceback.

    `also`: further exception types this entry point reports as one line (e.g. a failed benchmark check)."""
    try:
        return main()
    except KeyboardInterrupt:  # Ctrl-C before a training run took the signal over (or in another command)
        say(f"{prog}: stopped by Ctrl-C")
        return EXIT_STOPPED
    except Exception as error:  # sorted below: user errors get a line, bugs their traceback
        if not isinstance(error, (UserError, ValueError, OSError, *also)):
            raise
        if os.environ.get("MGN_TRACEBACK"):
            traceback.print_exc()
        if not getattr(error, "logged", False):
            say(f"{prog}: error: {one_line(error)}")
        return getattr(error, "exit_code", EXIT_BAD_INPUT)


def say(line: str) -> None:
    """`line` on stderr in one write: under PYTHONUNBUFFERED (common in Slurm scripts) `print` writes the text
    and its newline separately, and the lines of two ranks that fail together interleave into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(error: BaseException) -> str:
    """The error's message on one line (a library's message may span several), or its type when it has
    none."""
    text = re.sub(r"\s*\n\s*", " ", str(error)).strip()
    return text or type(error).__name__


def bad_flag(flag: str, value: Any, allowed: str) -> ValueError:
    """`flag=value: allowed`, the one format of every flag error (`--x=0: must be >= 1`)."""
    return ValueError(f"{flag}={value!r}: {allowed}")


def require(flag: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise `bad_flag` unless `ok`."""
    if not ok:
        raise bad_flag(flag, value, allowed)


def check_file(flag: str, path: str | None, what: str) -> None:
    """A flag that names an input file: it must exist and be a file."""
    if path and not Path(path).is_file():
        raise bad_flag(flag, path, f"no such file (expected {what})" if not Path(path).exists()
                       else f"not a file (expected {what})")


def config_from_cli(args):
    """`mgn.config.config_from_args`, with a --config file that is missing, not JSON or not {section: {field:
    value}} named in one line instead of a traceback."""
    import json

    from mgn.config import config_from_args

    if args.config:
        check_file("--config", args.config, "a JSON config file such as a run's config.json")
        try:
            raw = json.loads(Path(args.config).read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise bad_flag("--config", args.config, f"not JSON ({one_line(error)})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            raise bad_flag("--config", args.config, 'expected {"section": {"field": value}}, as in a run\'s '
                                                    "config.json")
    try:
        return config_from_args(args)
    except ValueError as error:
        if args.config and str(error).startswith("unknown config"):
            raise bad_flag("--config", args.config, str(error)) from None
        raise
