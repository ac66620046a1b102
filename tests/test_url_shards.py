"""Shards read from URLs (mgn/io/sources.py): a real HTTP server on the loopback address and `pipe:` commands
give the same batches as the same files on disk; a URL that cannot be opened stops the loader with one line
naming it."""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mgn.io import sources
from mgn.cli import run_command
from mgn.config import preset_config
from mgn.data.loader import build_loader
from mgn.io.sources import ShardOpenError, beside, open_shard, shard_name
from mgn.io.shard_sets import class_names, expand_shards, read_sizes
from tests.conftest import free_port
from mgn.data.writer import write_synthetic
from mgn.io.tar import tar_samples

TRAIN = "train-{000000..000001}.tar"


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no line per request on stderr
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder, base URL): a synthetic set of two train shards and one test shard, served over HTTP from a
    thread."""
    folder = tmp_path_factory.mktemp("served")
    write_synthetic(folder, samples=48, image_size=32, seed=0, max_samples=24)  # train 21 + 20, test 7
    # a shard cut in the middle of a member, beside the sizes.json of the whole set: samples lost mid-stream
    (folder / "cut").mkdir()
    whole = (folder / "train-000000.tar").read_bytes()
    (folder / "cut" / "train-000000.tar").write_bytes(whole[:len(whole) // 2 + 100])
    shutil.copy(folder / "train-000001.tar", folder / "cut")
    shutil.copy(folder / "sizes.json", folder / "cut")
    # a sizes.json naming a shard the server does not have: the shard itself answers 404
    (folder / "gone").mkdir()
    (folder / "gone" / "sizes.json").write_text(json.dumps({"train-000000.tar": 21}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _cfg(train: str, test: str | None = None, **data):
    return preset_config("tiny", {"objective": {"name": "baseline"},
                                  "data": {"train_shards": train, "test_shards": test or train,
                                           "shuffle_buffer": 16,
                                           **data}})


def _batches(loader) -> list[tuple[list[str], list[int], torch.Tensor]]:
    return [(batch["key"], batch["label"].tolist(), batch["image"]) for batch in loader]


def _same(got, want) -> None:
    assert [keys for keys, _, _ in got] == [keys for keys, _, _ in want]
    assert [labels for _, labels, _ in got] == [labels for _, labels, _ in want]
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(got, want))


# ---------------------------------------------------------------------------------------------- names

def test_url_specs_are_expanded_not_globbed_nor_stated(tmp_path):
    assert expand_shards("http://h/train-{000000..000001}.tar?v=1::pipe:cat /x/test-000000.tar") == [
        "http://h/train-000000.tar?v=1", "http://h/train-000001.tar?v=1", "pipe:cat /x/test-000000.tar"]
    assert expand_shards("http://[::1]:8000/a-{0..1}.tar") == ["http://[::1]:8000/a-0.tar",
                                                               "http://[::1]:8000/a-1.tar"]
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "list.txt").write_text("a.tar\nhttps://h/b.tar\n")
    assert expand_shards(str(tmp_path / "list.txt")) == [str(tmp_path / "a.tar"), "https://h/b.tar"]
    assert expand_shards(f"file://{tmp_path}/a.tar") == [str(tmp_path / "a.tar")]
    with pytest.raises(FileNotFoundError, match="do not exist"):  # local paths are still checked
        expand_shards(str(tmp_path / "b.tar"))


def test_where_the_files_beside_a_url_shard_are():
    assert beside("https://h/d/train-000003.tar?X-Amz-Signature=s", "sizes.json") == "https://h/d/sizes.json"
    assert beside("pipe:aws s3 cp s3://b/d/train-000003.tar -",
                  "sizes.json") == "pipe:aws s3 cp s3://b/d/sizes.json -"
    assert beside("pipe:cat train-000003.tar", "sizes.json") == "pipe:cat sizes.json"
    assert shard_name("pipe:aws s3 cp s3://b/d/train-000003.tar - | cat") == "train-000003.tar"
    assert shard_name("https://h/d/train-000003.tar?sig=1") == "train-000003.tar"
    with pytest.raises(ValueError, match="names no '\\*.tar' file"):
        beside("pipe:fetch-shard 3", "sizes.json")


def test_sizes_and_labels_are_fetched_from_beside_the_url_shards(served):
    folder, url = served
    shards = expand_shards(f"{url}/{TRAIN}")
    disk = read_sizes(expand_shards(str(folder / TRAIN)))
    assert read_sizes(shards) == {f"{url}/{Path(s).name}": n for s, n in disk.items()}
    assert read_sizes([f"pipe:cat {folder}/train-000001.tar"]) == {f"pipe:cat {folder}/train-000001.tar": 20}
    assert class_names(f"{url}/test-000000.tar") == ["non_violent",
                                                     "violent"] == class_names(str(folder / TRAIN))
    with open_shard(shards[0]) as f, open(folder / "train-000000.tar", "rb") as g:
        assert list(tar_samples(f)) == list(tar_samples(g))  # the raw samples, image bytes and all


# ---------------------------------------------------------------------------------------------- loaders

def test_train_batches_from_http_and_pipe_equal_those_from_disk(served):
    """Two ranks of two workers each: the pieces start and stop mid-shard, the streams drop and cut
    accordingly."""
    folder, url = served
    specs = {"disk": str(folder / TRAIN), "http": f"{url}/{TRAIN}", "pipe": f"pipe:cat {folder}/{TRAIN}"}
    for rank in (0, 1):
        got = {}
        for name, spec in specs.items():
            loader = build_loader(_cfg(spec, num_workers=2), "train", rank=rank, world_size=2, epoch=1)
            got[name] = _batches(loader)
            assert loader.skipped() == {}
        assert len(got["disk"]) == len(loader) > 1
        _same(got["http"], got["disk"])
        _same(got["pipe"], got["disk"])
    # a resume skips consumed batches as raw samples, from a stream as from a file
    resumed = build_loader(_cfg(specs["http"], num_workers=2), "train", rank=1, world_size=2, epoch=1,
                           skip_batches=1)
    _same(_batches(resumed), got["disk"][1:])


def test_test_batches_from_http_equal_those_from_disk(served):
    folder, url = served
    for rank in (0, 1):
        disk = build_loader(_cfg(str(folder / TRAIN), str(folder / "test-000000.tar"), num_workers=1), "test",
                            rank=rank, world_size=2)
        http = build_loader(_cfg(f"{url}/{TRAIN}", f"{url}/test-000000.tar", num_workers=1), "test",
                            rank=rank, world_size=2)
        assert http.num_samples == disk.num_samples > 0
        _same(_batches(http), _batches(disk))


def test_samples_lost_mid_stream_are_counted_as_from_a_cut_file(served):
    folder, url = served
    cut = folder / "cut" / "train-000000.tar"
    specs = {"disk": str(folder / "cut" / TRAIN), "http": f"{url}/cut/{TRAIN}",
             # the whole shard's first bytes, then the command fails (a connection lost mid-transfer); its
             # sizes.json is the same command on {folder}/sizes.json, whole and with exit status 0
             "pipe": f"pipe:f={folder}/train-000000.tar; head -c {cut.stat().st_size} $f; "
                     f"exit $(( $(wc -c < $f) > {cut.stat().st_size} ))::pipe:cat "
                     f"{folder}/cut/train-000001.tar"}
    skipped = {}
    for name, spec in specs.items():
        loader = build_loader(_cfg(spec, max_skip_fraction=0.9), "train")
        _batches(loader)
        skipped[name] = {shard_name(s): n for s, n in loader.skipped().items()}
    assert skipped["disk"] == skipped["http"] == skipped["pipe"]
    assert 0 < skipped["disk"]["train-000000.tar"] < 21


# ---------------------------------------------------------------------------------------------- errors

def _one_line_error(cfg, split="train") -> str:
    """What a user sees: the entry point's one line on stderr, exit code 2."""
    def main() -> int:
        for _ in build_loader(cfg, split):
            pass
        return 0

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_command("train.py", main) == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_url_that_404s_stops_the_loader_with_one_line_naming_it(served, workers):
    """In a loader worker too: the DataLoader re-raises it in the main process, still one line. Timed up to
    the workers' exit: torch joins a worker whose iterator raised only after its 5 s status interval."""
    _, url = served
    start = time.monotonic()
    line = _one_line_error(_cfg(f"{url}/gone/train-000000.tar", num_workers=workers))
    assert line.startswith(f"train.py: error: cannot open {url}/gone/train-000000.tar: curl: (22) ")
    assert "404" in line
    gc.collect()  # the DataLoader's iterator, kept by the traceback, shuts its workers down here
    assert time.monotonic() - start < 20


def test_a_host_that_refuses_stops_the_loader_with_one_line_naming_the_url(served):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    line = _one_line_error(_cfg(f"{url}/{TRAIN}"))
    # sizes.json comes first
    assert line.startswith(f"train.py: error: cannot open {url}/sizes.json: curl: (7) ")
    assert "the loader needs this sizes.json" in line
    assert time.monotonic() - start < 20


def test_a_silent_stream_stops_after_the_stall_limit_and_its_command_is_ended(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "STALL_SECONDS", 0.5)
    marker = tmp_path / "still-running"
    start = time.monotonic()
    with (pytest.raises(ShardOpenError, match=r"cannot open pipe:sleep 2; touch .*: no data for 0.5 s"),
          open_shard(f"pipe:sleep 2; touch {marker}") as f):
        f.read(512)
    assert time.monotonic() - start < 1.5
    time.sleep(2.5)
    assert not marker.exists()  # the shell was killed with its sleep, not left to run on


def test_fsspec_urls_are_read_when_fsspec_is_installed(served):
    fsspec = pytest.importorskip("fsspec")
    folder, _ = served
    memory = fsspec.filesystem("memory")
    for name in ("train-000000.tar", "train-000001.tar", "sizes.json"):
        memory.pipe(f"/mgn-test/{name}", (folder / name).read_bytes())
    disk = build_loader(_cfg(str(folder / TRAIN)), "train")
    url = build_loader(_cfg(f"memory://mgn-test/{TRAIN}"), "train")
    _same(_batches(url), _batches(disk))
    with pytest.raises(ShardOpenError, match="cannot open memory://mgn-test/nothing.tar: FileNotFoundError"):
        open_shard("memory://mgn-test/nothing.tar")
