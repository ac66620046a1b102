"""A run's folder before training starts: a name no other run has, the lock that keeps it one run's, the
`latest` link to it, and the synthetic shards a demo-style preset reads, written once."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path

from mgn.data import tokens
from mgn.train.inputs import synthetic_writes
from mgn.config import Config
from mgn.data.writer import write_synthetic

log = logging.getLogger("mgn")


def new_run_name(cfg: Config) -> str:
    """A name for a new run folder, created here so that two runs started in the same second never share
    one."""
    base = datetime.now().strftime(f"%Y%m%d-%H%M%S-{cfg.objective.name}")
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        name = base if attempt == 1 else f"{base}-{attempt}"
        try:
            (Path(cfg.train.output_dir) / name).mkdir()
            return name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder name under {cfg.train.output_dir} for {base}")


class RunFolderBusy(FileExistsError):
    """Another live process holds the run folder's lock (a user error: exit code 2, mgn/cli.py)."""


class RunLock:
    """One run per folder: an exclusive lock on `<run>/.lock`, held for the run's life by its rank 0.

    Two runs writing one folder mix their metrics, configs and students (and a second one started before the
    first saved a checkpoint passed every other check). The lock is the operating system's (flock), so it goes
    with its holder, however that ends; the file keeps who held it (host, pid, start), cleared on a clean
    release, so the next run names a holder that died without releasing it and takes over."""

    def __init__(self, path: Path):
        self.path = Path(path)  # a run's RunPaths.lock
        self.handle = None

    def acquire(self) -> str | None:
        """Take the lock, or raise RunFolderBusy naming the holder. Returns a line about the previous holder
        when it ended without releasing the lock (None otherwise)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # held open for the run's life, closed in release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(handle)
            handle.close()
            raise RunFolderBusy(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                                "end, or "
                                f"pass another --train.run_name") from None
        previous = _holder(handle) if handle.tell() else None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "since": datetime.now().isoformat(timespec="seconds")}) + "\n")
        handle.flush()
        self.handle = handle
        return (f"took over {self.path}: its holder ({previous}) ended without releasing it"
                if previous else None)

    def release(self) -> None:
        if self.handle is not None:
            self.handle.truncate(0)
            self.handle.close()  # closing releases the lock
            self.handle = None


def _holder(handle) -> str:
    """Who the lock file says holds the lock, in words."""
    handle.seek(0)
    text = handle.read()
    handle.seek(0, os.SEEK_END)
    try:
        record = json.loads(text)
        return f"pid {record['pid']} on {record['host']}, since {record['since']}"
    except (ValueError, KeyError, TypeError):
        return "a process that wrote no record"


def refuse_if_locked(lock_file: Path) -> None:
    """RunFolderBusy when a live process holds a run's lock (the comparison runner, before it touches a
    stage's folder); the lock is not kept."""
    if Path(lock_file).exists():
        lock = RunLock(lock_file)
        lock.acquire()
        lock.release()


def ensure_demo_shards(cfg: Config) -> None:
    """Create the synthetic shards the demo preset points at, if they are not there yet."""
    out_dir = synthetic_writes(cfg)
    if out_dir is None:
        return
    log.info("MGN: writing %d synthetic samples to %s", cfg.data.synthetic_samples, out_dir)
    # The data seed is fixed: runs with different `train.seed` must see the same dataset. token ids for the
    # run's own tokenizer (mgn/data/tokens.py), when it reads captions and has a fast tokenizer
    tokenizer = (cfg.model.text_model if cfg.uses_captions and tokens.field_name(cfg.model.text_model)
                 else None)
    # overwrite: synthetic_writes chose a new or empty folder, or one an interrupted write of ours left
    write_synthetic(out_dir, samples=cfg.data.synthetic_samples, image_size=cfg.model.image_size, seed=0,
                    tokenizer=tokenizer, overwrite=True)


def point_latest(run_dir: Path) -> None:
    """`<output_dir>/latest` -> the newest run's folder (a relative symlink, replaced atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest-{run_dir.name}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    tmp.replace(link)
