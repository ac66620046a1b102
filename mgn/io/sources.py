"""Opening a shard, or a file beside it (`sizes.json`, `dataset_card.json`), wherever it is kept.

Accepted names, as webdataset spells them:
- a local or parallel-filesystem path (`file://` is a path too): opened as a file;
- `pipe:<shell command>`, whose standard output is the shard (`pipe:aws s3 cp s3://b/train-000000.tar -`);
- `http://` and `https://`: read with curl, as webdataset does, but with bounded options: a refused connection
  or an HTTP error (404, 403, ...) fails at once, a transient error (timeout, 5xx) is retried twice,
  connecting gives up after CONNECT_SECONDS (webdataset's own `gopen` retries 30 times and hides curl's
  reason);
- any other `scheme://` that fsspec knows (`s3://` with s3fs, `gs://` with gcsfs, `hf://`, `abfs://`,
  `memory://`, ...), through fsspec, when its backend is installed (fsspec itself comes with huggingface_hub,
  which transformers needs). webdataset's other `gopen` schemes run a tool (`gs://` gsutil, `ais://` ais):
  write them as `pipe:gsutil cat gs://...`, which this module runs in its own process group with the stall
  limit (gopen's commands could not be stopped with their children, nor their stderr kept for the error line).

A stream is read from the start: there is no index in a tar and no byte ranges are asked for, so a reader
whose samples start mid-shard reads the samples before them and drops them (mgn/data/worker.py,
`_piece_samples`).

Failures, and how the reader treats them:
- `ShardOpenError` (an OSError): the URL gave no byte at all (no such object, refused, no credentials, command
  not found, nothing within STALL_SECONDS). One line naming the URL and the cause (curl's or the command's
  last line of stderr and its exit status); the reader stops the run with it rather than counting a skip: a
  shard that cannot be opened is nearly always a wrong URL or missing credentials, which counting would hide
  until `max_skip_fraction` tripped, with another message. Transient errors are retried by curl before that.
- a stream that fails after its first byte (the command exits non-zero, nothing arrives for STALL_SECONDS)
  raises a plain OSError naming the URL: a damaged shard, whose lost samples the reader counts as skipped.
The stall limit (MGN_STREAM_STALL_S, default 120 s) is what keeps a silent server from hanging a loader
worker; fsspec streams rely on their backend's own timeouts.
"""
from __future__ import annotations

import io
import os
import re
import select
import signal
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

STALL_SECONDS = float(os.environ.get("MGN_STREAM_STALL_S", "120"))
CONNECT_SECONDS = 15
CURL = ["curl", "--silent", "--show-error", "--fail", "--location", "--connect-timeout", str(CONNECT_SECONDS),
        "--retry", "2", "--retry-delay", "1", "--retry-max-time", "60"]
BUFFER = 1 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TAR_IN_COMMAND = re.compile(r"[^\s'\"|;<>]+\.tar(?=$|[\s'\"|;<>])")


class ShardOpenError(OSError):
    """A shard or side file that gives no byte at all; its message is one line naming the URL and the
    cause."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


def is_url(name: str) -> bool:
    """`pipe:...` or `scheme://...`, other than `file://` (a path): a name that is not stat-ed or globbed."""
    match = _SCHEME.match(name)
    return name.startswith("pipe:") or (match is not None and match.group(1).lower() != "file")


def local_path(name: str) -> str:
    """A path for a local name: `file:///x/y.tar` -> `/x/y.tar`; any other name as it is."""
    return url2pathname(urlsplit(name).path) if name.lower().startswith("file://") else name


def shard_name(shard: str) -> str:
    """The file name a shard has in `sizes.json`: the last part of its path, URL path or the command's
    `*.tar`."""
    shard = str(shard)
    if shard.startswith("pipe:"):
        found = _TAR_IN_COMMAND.findall(shard)
        return found[-1].rsplit("/", 1)[-1] if found else shard
    return Path(urlsplit(shard).path if is_url(shard) else shard).name


def beside(shard: str, name: str) -> str:
    """Where a file `name` next to a shard lies: a path, the same URL with its last part replaced (query
    dropped: a presigned URL signs one object), or the pipe command with its `*.tar` path's last part
    replaced."""
    shard = str(shard)  # a local Path too
    if shard.startswith("pipe:"):
        found = list(_TAR_IN_COMMAND.finditer(shard))
        if not found:
            raise ValueError(f"cannot tell where {name} lies beside {shard!r}: the command names no '*.tar' "
                             "file "
                             f"(write the shard's path or URL in the command, e.g. 'pipe:aws s3 cp "
                             f"s3://bucket/train-000000.tar -')")
        last = found[-1]
        folder = last.group(0).rpartition("/")[0]
        return shard[:last.start()] + (f"{folder}/" if folder else "") + name + shard[last.end():]
    if is_url(shard):
        parts = urlsplit(shard)
        path = parts.path.rpartition("/")[0] + "/" + name
        return parts._replace(path=path, query="", fragment="").geturl()
    return str(Path(local_path(shard)).parent / name)


def read_beside(shard: str, name: str, limit: int = 64 << 20) -> bytes:
    """The bytes of the file `name` beside a shard (at most `limit`); FileNotFoundError or ShardOpenError if
    absent."""
    where = beside(shard, name)
    if not is_url(where):
        return Path(where).read_bytes()
    with open_shard(where) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{where} holds more than {limit:,} bytes: not a {name}")
    return data


def open_shard(name: str):
    """A binary file object reading the shard `name` (see the module docstring for the forms); `.name` is
    `name`."""
    if not is_url(name):
        return open(local_path(name), "rb", buffering=BUFFER)
    if name.startswith("pipe:"):
        return _run(name, name[5:], shell=True)
    scheme = _SCHEME.match(name).group(1).lower()
    if scheme in ("http", "https"):
        return _run(name, [*CURL, name], shell=False)
    return _fsspec_open(name, scheme)


def _fsspec_open(name: str, scheme: str):
    try:
        import fsspec
    except ImportError:
        raise ShardOpenError(f"cannot open {name}: no reader for {scheme}:// here (pipe: and http(s):// are "
                             "built in, "
                             f"other schemes need fsspec)") from None
    try:
        f = fsspec.open(name, "rb").open()
    except Exception as exc:  # a missing backend, object or credential: one line
        raise ShardOpenError(f"cannot open {name}: {_cause(exc)}") from exc
    return io.BufferedReader(_FileStream(name, f), BUFFER)


def _run(name: str, command, *, shell: bool):
    # a file, not a pipe: a chatty command cannot block on a full stderr pipe; the stream closes it
    errors = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen(command, shell=shell, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errors,
                                bufsize=0, start_new_session=True)
    except OSError as exc:
        errors.close()
        raise ShardOpenError(f"cannot open {name}: {_cause(exc)}") from exc
    return io.BufferedReader(_ProcessStream(name, proc, errors), BUFFER)


class _Stream(io.RawIOBase):
    """A stream that tells a source giving no byte at all (ShardOpenError) from one failing later
    (OSError)."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.received = name, 0

    def readable(self) -> bool:
        return True

    def _failure(self, cause: str) -> OSError:
        if self.received == 0:
            return ShardOpenError(f"cannot open {self.name}: {cause}")
        return OSError(f"{self.name}, stream failed after {self.received:,} bytes: {cause}")


class _FileStream(_Stream):
    """An fsspec file; whatever its backend raises while reading becomes one of the two failures."""

    def __init__(self, name: str, f):
        super().__init__(name)
        self.f = f

    def readinto(self, buffer) -> int:
        try:
            data = self.f.read(len(buffer))
        except Exception as exc:  # aiohttp, botocore, ...: not all are OSErrors
            raise self._failure(_cause(exc)) from exc
        buffer[:len(data)] = data
        self.received += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.f.close()
        super().close()


class _ProcessStream(_Stream):
    """A command's standard output, with a stall limit; its exit status is checked at the end of the output.

    Closing before the end (a piece that stops mid-shard, a finished shard's trailing padding) ends the
    command."""

    def __init__(self, name: str, proc: subprocess.Popen, errors):
        super().__init__(name)
        self.proc, self.errors = proc, errors

    def readinto(self, buffer) -> int:
        ready, _, _ = select.select([self.proc.stdout], [], [], STALL_SECONDS)
        if not ready:
            self._stop()
            raise self._failure(f"no data for {STALL_SECONDS:g} s")
        count = self.proc.stdout.readinto(buffer)
        if count == 0:
            try:
                status = self.proc.wait(timeout=STALL_SECONDS)
            except subprocess.TimeoutExpired:
                self._stop()
                raise self._failure(f"the output ended but the command did not, "
                                    f"for {STALL_SECONDS:g} s") from None
            if status != 0:
                raise self._failure(self._status(status))
        self.received += count
        return count

    def close(self) -> None:
        if not self.closed:
            self._stop()
            self.proc.stdout.close()
            self.errors.close()
        super().close()

    def _stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and what it started (its own session)
            except OSError:  # ended meanwhile
                pass
        self.proc.wait()

    def _status(self, status: int) -> str:
        self.errors.seek(0)
        lines = [x.strip() for x in self.errors.read()[-4096:].decode("utf-8", "replace").splitlines()]
        said = next((x for x in reversed(lines) if x), "")[:300]
        how = f"killed by signal {-status}" if status < 0 else f"exit status {status}"
        return f"{said} ({how})" if said else how


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(message: str) -> str:
    """torch's DataLoader re-raises a worker's exception as `type(exc)(<where> + traceback)`: keep the last
    line's message, so the main process shows the same one line as an in-process reader."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last
