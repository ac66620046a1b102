"""The reader: equal batches on every rank, each test sample once, bad samples skipped and counted."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mgn.config import PACKAGED_MINILM, DataConfig, resolve_text_model
from mgn.data import decode, tokens
from mgn.data.loader import eval_loader, train_loader
from mgn.data.tokens import tokenize
from mgn.data.epoch_plan import worker_quotas
from mgn.io.shard_sets import expand_shards, read_sizes
from mgn.io.tar import tar_files

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOADER_ARGS = dict(image_size=16, mean=MEAN, std=STD, tokenizer_name=None, seq_len=8, batch_size=4)


def _jpeg(colour=(200, 30, 30), size=(24, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _sample(key: str, label: int = 0, **fields) -> dict:
    sample = {"__key__": key, "jpg": _jpeg(), "txt": f"caption of {key}".encode(), "cls": str(label).encode()}
    sample.update(fields)
    return {k: v for k, v in sample.items() if v is not None}


def _write(folder: Path, shards: dict[str, list[dict]], sizes: dict[str, int] | None = None) -> None:
    """Shards written by hand, so that they can be broken on purpose."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, samples in shards.items():
        with open(folder / name, "wb") as f, wds.TarWriter(f, encoder=False) as tar:
            for sample in samples:
                tar.write(sample)
    counts = sizes or {name: len(samples) for name, samples in shards.items()}
    (folder / "sizes.json").write_text(json.dumps(counts))


def _uneven(folder: Path, counts=(37, 11, 5), prefix="train") -> list[str]:
    _write(folder, {f"{prefix}-{i:06d}.tar": [_sample(f"s{i}_{j:03d}", label=j % 2) for j in range(n)]
                    for i, n in enumerate(counts)})
    return [f"s{i}_{j:03d}" for i, n in enumerate(counts) for j in range(n)]


def _cfg(folder: Path, prefix="train", **kw) -> DataConfig:
    pattern = str(folder / f"{prefix}-*.tar")
    return DataConfig(train_shards=pattern, test_shards=pattern, shuffle_buffer=kw.pop("shuffle_buffer", 16),
                      **kw)


def _train_keys(cfg, rank=0, world_size=1, seed=0, epoch=0, **kw) -> list[list[str]]:
    args = {**LOADER_ARGS, **kw}
    loader = train_loader(cfg, **args, rank=rank, world_size=world_size, seed=seed, epoch=epoch)
    batches = [batch["key"] for batch in loader]
    assert len(batches) == len(loader)
    return batches


# ---------------------------------------------------------------------------------------------- shard lists

def test_expand_shards_patterns_and_errors(tmp_path):
    _uneven(tmp_path, (2, 2, 2, 2))
    names = [str(tmp_path / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(tmp_path / "train-{000000..000003}.tar")) == names
    assert expand_shards(str(tmp_path / "train-*.tar")) == names
    (tmp_path / "list.txt").write_text("# two shards\ntrain-000001.tar\n\ntrain-000003.tar\n")
    assert expand_shards(str(tmp_path / "list.txt")) == [names[1], names[3]]
    assert expand_shards(f"{names[0]}::{tmp_path / 'list.txt'}") == [names[0], names[1], names[3]]
    with pytest.raises(FileNotFoundError, match="no shards match .*nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="1 of 5 shards .*train-000004"):
        expand_shards(str(tmp_path / "train-{000000..000004}.tar"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        expand_shards(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="more than once"):
        expand_shards(f"{names[0]}::{names[0]}")


def test_read_sizes_needs_every_shard(tmp_path):
    _uneven(tmp_path, (3, 4))
    shards = expand_shards(str(tmp_path / "train-*.tar"))
    assert list(read_sizes(shards).values()) == [3, 4]
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 3}))
    with pytest.raises(ValueError, match="lacks 1 shard.*train-000001"):
        read_sizes(shards)
    (tmp_path / "sizes.json").unlink()
    with pytest.raises(FileNotFoundError, match="sizes.json is missing"):
        read_sizes(shards)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_agrees_with_tarfile(fmt):
    files = [("a/" + "long" * 40 + ".jpg", b"x" * 700), ("b.txt", "caption ü".encode()), ("b.cls", b"")]
    if fmt == tarfile.USTAR_FORMAT:
        files[0] = ("a/" + "long" * 30 + "/k.jpg", b"x" * 700)  # ustar: long paths go to the prefix field
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    assert list(tar_files(io.BytesIO(buf.getvalue()))) == files
    broken = bytearray(buf.getvalue())
    broken[10] ^= 1
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(broken))))


# ---------------------------------------------------------------------------------------------- training

def test_uneven_shards_give_every_rank_the_same_number_of_batches(tmp_path):
    _uneven(tmp_path, (37, 11, 5))  # 53 samples, 3 shards for 2 ranks x 2 workers
    expected = 7  # ceil(53 / (4 * 2))
    for workers in (0, 1, 2):
        for epoch in (0, 1, 2):
            for rank in (0, 1):
                batches = _train_keys(_cfg(tmp_path, num_workers=workers), rank, 2, epoch=epoch)
                assert len(batches) == expected and all(len(b) == 4 for b in batches), (workers, epoch, rank)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_are_balanced_by_samples_not_shards(tmp_path, workers):
    """The tiny preset's own layout, 256 + 16 samples on 2 ranks: dealt by shard, one rank would read its 16
    samples 8 times over while 120 others were never seen. Split by samples, each is read once."""
    keys = _uneven(tmp_path, (256, 16))
    cfg = _cfg(tmp_path, num_workers=workers)
    seen = [k for rank in (0, 1) for batch in _train_keys(cfg, rank, 2, batch_size=8) for k in batch]
    assert Counter(seen) == Counter(keys)
    loader = train_loader(cfg, **{**LOADER_ARGS, "batch_size": 8}, rank=0, world_size=2, seed=0, epoch=0)
    assert loader.balance == {"repeated_fraction": 0.0, "unseen_fraction": 0.0}
    uneven = train_loader(cfg, **{**LOADER_ARGS, "batch_size": 10}, rank=0, world_size=3, seed=0, epoch=0)
    # 272 samples fill 10 batches of 3 ranks x 10 = 300 places: the 28 missing from the last global batch
    # repeat (the documented bound: less than one global batch), and none is left out.
    assert uneven.balance == {"repeated_fraction": 28 / 300, "unseen_fraction": 0.0}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_raw_samples_and_continues_with_the_same_batches(tmp_path, workers, monkeypatch):
    _uneven(tmp_path, (23, 17, 9))
    cfg = _cfg(tmp_path, num_workers=workers)
    full = [(b["key"], b["image"]) for b in train_loader(cfg, **LOADER_ARGS, rank=0, world_size=1, seed=3,
                                                         epoch=1)]
    decoded = []
    original = decode.Decoder.decode
    monkeypatch.setattr(decode.Decoder, "decode", lambda self, sample,
                        rng=None: decoded.append(1) or original(
        self, sample, rng))
    for skip in (1, 5, len(full) - 1):
        decoded.clear()
        rest = [(b["key"], b["image"]) for b in train_loader(cfg, **LOADER_ARGS, rank=0, world_size=1, seed=3,
                                                               epoch=1, skip_batches=skip)]
        assert [k for k, _ in rest] == [k for k, _ in full[skip:]], skip
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[skip:]))  # same crops and flips
        if workers == 0:  # counted in this process: nothing skipped was decoded
            assert len(decoded) == 4 * (len(full) - skip)


def test_an_epoch_is_a_permutation_when_shards_divide_evenly(tmp_path):
    keys = _uneven(tmp_path, (8, 8, 8, 8))  # each worker holds a whole number of batches
    cfg = _cfg(tmp_path, num_workers=2)
    seen = [k for rank in (0, 1) for batch in _train_keys(cfg, rank, 2) for k in batch]
    assert sorted(seen) == sorted(keys)


def test_worker_quotas_follow_the_data_each_worker_holds():
    assert worker_quotas(10, [300, 100]) == [8, 2]  # not 5/5: the small worker would repeat its data
    assert worker_quotas(5, [10, 10]) == [3, 2]
    assert sum(worker_quotas(7, [37, 11, 5])) == 7
    assert worker_quotas(8, [30, 1]) == [8, 0]


def test_a_worker_with_no_quota_yields_nothing(tmp_path):
    _uneven(tmp_path, (30, 1))
    batches = _train_keys(_cfg(tmp_path, num_workers=2))
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)


def test_train_order_is_reproducible_and_changes_with_the_epoch(tmp_path):
    _uneven(tmp_path, (20, 20, 20, 20))
    cfg = _cfg(tmp_path, num_workers=2)
    first = _train_keys(cfg, epoch=3)
    assert _train_keys(cfg, epoch=3) == first
    assert _train_keys(cfg, epoch=4) != first
    assert _train_keys(cfg, epoch=3, seed=1) != first


def test_fewer_shards_than_ranks_still_feed_every_rank(tmp_path):
    keys = _uneven(tmp_path, (6, 6))
    seen = [k for rank in range(3) for batch in _train_keys(_cfg(tmp_path, num_workers=1), rank=rank,
                                                            world_size=3)
            for k in batch]
    assert len(seen) == 12 and Counter(seen) == Counter(keys)


def test_batches_hold_normalised_rgb_and_tokens(tmp_path):
    _write(tmp_path, {"train-000000.tar": [_sample(f"k{i}", label=i % 2) for i in range(6)]})
    tokenizer = resolve_text_model(PACKAGED_MINILM)
    loader = train_loader(_cfg(tmp_path, num_workers=1), **{**LOADER_ARGS, "tokenizer_name": tokenizer},
                          rank=0, world_size=1, seed=0, epoch=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 8)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["label"].dtype == torch.long and set(batch) == {"image", "label", "key", "input_ids",
                                                                 "attention_mask", "caption"}
    pixels = batch["image"] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    red, green, blue = pixels.mean(dim=(0, 2, 3)).tolist()
    assert red > 0.7 and green < 0.2 and blue < 0.2  # (200, 30, 30) stays red: RGB, never BGR

    from transformers import AutoTokenizer

    direct = AutoTokenizer.from_pretrained(tokenizer)(f"caption of {batch['key'][0]}", padding="max_length",
                                                      truncation=True, max_length=8)
    assert batch["input_ids"][0].tolist() == direct["input_ids"]


CAPTIONS = ["category: Just Chatting | title: road to 1k followers | device: laptop | focus: bottom-left",
            "", "Ünïcode   caption with  CAPS and punctuation!!", "fight " * 200, "a"]


@pytest.mark.parametrize("seq_len", [8, 121])
@pytest.mark.parametrize("which", ["minilm", "bert768"])
def test_fast_tokenize_matches_the_transformers_wrapper(which, seq_len, request, monkeypatch):
    from transformers import AutoTokenizer

    name = resolve_text_model(PACKAGED_MINILM) if which == "minilm" else request.getfixturevalue("bert768")
    expected = AutoTokenizer.from_pretrained(name)(CAPTIONS, padding="max_length", truncation=True,
                                                   max_length=seq_len, return_tensors="np")
    ids, mask = tokenize(name, seq_len, CAPTIONS)
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == (len(CAPTIONS), seq_len)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert mask[3].all() and mask[1].sum() == 2  # truncated to the full length; empty = [CLS] [SEP]

    # a tokenizer with no Rust backend
    monkeypatch.setattr(tokens, "_fixed_length_backend", lambda *args: None)
    slow_ids, slow_mask = tokenize(name, seq_len, CAPTIONS)
    np.testing.assert_array_equal(slow_ids, ids)
    np.testing.assert_array_equal(slow_mask, mask)


# ---------------------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 2), (4, 2)])
def test_eval_reads_every_test_sample_exactly_once(tmp_path, world_size, workers):
    keys = _uneven(tmp_path, (37, 11, 5), prefix="test")
    cfg = _cfg(tmp_path, "test", num_workers=workers)
    read = []
    for rank in range(world_size):
        loader = eval_loader(cfg, **LOADER_ARGS, rank=rank, world_size=world_size)
        batches = [b["key"] for b in loader]
        assert sum(map(len, batches)) == loader.num_samples
        read += [k for b in batches for k in b]
    assert Counter(read) == Counter(keys)  # with 4 ranks and 3 shards, one rank simply gets nothing


def test_eval_images_are_deterministic(tmp_path):
    _uneven(tmp_path, (6,), prefix="test")
    cfg = _cfg(tmp_path, "test", num_workers=0)
    a = [b["image"] for b in eval_loader(cfg, **LOADER_ARGS, rank=0, world_size=1)]
    b = [b["image"] for b in eval_loader(cfg, **LOADER_ARGS, rank=0, world_size=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == 2  # 6 samples: 4 + partial 2


# ---------------------------------------------------------------------------------------------- bad samples

def _broken_shards(folder: Path) -> dict[str, int]:
    good = [_sample(f"g{i}") for i in range(12)]
    corrupt = [_sample("c0"), _sample("c1", jpg=b"\xff\xd8\xff\xe0 not really a jpeg"), _sample("c2"),
               _sample("c3", jpg=_jpeg()[:60])]  # garbage, and a JPEG cut short
    duplicate = [_sample("d0"), _sample("d1"), _sample("d0", txt=b"impostor"), _sample("d2", cls=None)]
    truncated = [_sample(f"t{i}") for i in range(10)]
    _write(folder, {"test-000000.tar": good, "test-000001.tar": corrupt, "test-000002.tar": duplicate,
                    "test-000003.tar": truncated})
    path = folder / "test-000003.tar"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut mid-member
    return {"good": 12, "corrupt": 4, "duplicate": 4, "truncated": 10}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_reported(tmp_path, workers):
    _broken_shards(tmp_path)
    cfg = _cfg(tmp_path, "test", num_workers=workers, max_skip_fraction=0.9)
    loader = eval_loader(cfg, **LOADER_ARGS, rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["key"]]
    truncated_read = [k for k in keys if k.startswith("t")]
    assert sorted(k for k in keys if not k.startswith("t")) == sorted(
        [f"g{i}" for i in range(12)] + ["c0", "c2", "d0", "d1"])  # first d0 kept, the impostor and d2 dropped
    assert 0 < len(truncated_read) < 10
    name = lambda i: str(tmp_path / f"test-{i:06d}.tar")  # noqa: E731
    assert loader.skipped() == {name(1): 2, name(2): 2, name(3): 10 - len(truncated_read)}
    assert loader.seen() == {name(0): 12, name(1): 4, name(2): 4, name(3): 10}


def test_too_many_bad_samples_stop_the_run_naming_the_shards(tmp_path):
    _broken_shards(tmp_path)
    cfg = _cfg(tmp_path, "test", num_workers=0, max_skip_fraction=0.05)
    with pytest.raises(RuntimeError, match=r"bad \(more than max_skip_fraction=0.05\).*test-000001.tar: 2/4"):
        list(eval_loader(cfg, **LOADER_ARGS, rank=0, world_size=1))
    with pytest.raises(RuntimeError, match="test-000003.tar"):
        list(train_loader(cfg, **LOADER_ARGS, rank=0, world_size=1, seed=0, epoch=0))


def test_training_over_bad_shards_still_yields_full_epochs(tmp_path):
    _broken_shards(tmp_path)
    cfg = _cfg(tmp_path, "test", num_workers=2, max_skip_fraction=0.9)
    loader = train_loader(cfg, **LOADER_ARGS, rank=0, world_size=1, seed=0, epoch=0)
    batches = [b["key"] for b in loader]
    assert len(batches) == len(loader) == 8 and all(len(b) == 4 for b in batches)  # ceil(30 / 4)
    assert sum(loader.skipped().values()) >= 5 and not any(k in ("c1", "c3",
                                                                 "d2") for b in batches for k in b)


def test_synthetic_shards_feed_the_reader(tmp_path):
    from mgn.data.writer import write_synthetic

    write_synthetic(tmp_path, samples=200, image_size=32, seed=0, max_samples=40)
    cfg = DataConfig(train_shards=str(tmp_path / "train-{000000..000004}.tar"),
                     test_shards=str(tmp_path / "test-*.tar"), num_workers=2, shuffle_buffer=50)
    args = {**LOADER_ARGS, "image_size": 32}
    batches = list(train_loader(cfg, **args, rank=0, world_size=1, seed=0, epoch=0))
    assert len(batches) == 43 and batches[0]["image"].shape == (4, 3, 32, 32)  # ceil(170 / 4)
    test_keys = [k for b in eval_loader(cfg, **args, rank=0, world_size=1) for k in b["key"]]
    assert len(test_keys) == len(set(test_keys)) == 30
    assert np.isfinite(torch.cat([b["image"] for b in batches]).numpy()).all()


def test_a_worker_whose_samples_never_decode_stops_the_run_instead_of_hanging(tmp_path):
    _write(tmp_path, {"train-000000.tar": [_sample(f"bad{i}",
                                                   jpg=b"<html>not an image</html>") for i in range(6)]})
    cfg = _cfg(tmp_path, num_workers=0, max_skip_fraction=1.0)
    with pytest.raises(RuntimeError, match="not one sample of this worker's range decodes"):
        list(train_loader(cfg, **LOADER_ARGS, rank=0, world_size=1, seed=0, epoch=0))


def test_members_the_run_does_not_read_never_reach_the_shuffle_buffer(tmp_path):
    # A 50 MB member beside each image was held by every shuffle buffer slot: 1.40 -> 1.73 GB for ten samples.
    from mgn.data.worker import SampleLimits, _read_pieces, _Stats
    from mgn.data.epoch_plan import Piece

    video = b"\0" * (2 << 20)
    _write(tmp_path, {"train-000000.tar": [_sample(f"s{i}", mp4=video, json=b"{}") for i in range(6)]})
    decoder = decode.Decoder(16, MEAN, STD, None, 8, train=True)
    read = list(_read_pieces([Piece(str(tmp_path / "train-000000.tar"), 0, 6)], _Stats(), repeat=False,
                             shuffle_buffer=4, seed="s", limits=SampleLimits(64 << 20, 16 << 20),
                             keep=decoder.reads))
    assert [s["__key__"] for s in sorted(read, key=lambda s: s["__key__"])] == [f"s{i}" for i in range(6)]
    assert all(set(s) == {"__key__", "__url__", "__index__", "__pass__", "jpg", "txt", "cls"} for s in read)


def test_a_sample_over_the_byte_cap_is_skipped_and_counted(tmp_path):
    big = _jpeg(size=(600, 600))
    _write(tmp_path, {"test-000000.tar": [_sample("small"), _sample("big", jpg=big), _sample("small2")]})
    cfg = DataConfig(test_shards=str(tmp_path / "test-*.tar"), num_workers=0, max_skip_fraction=0.5,
                     max_sample_bytes=len(big) // 2)
    loader = eval_loader(cfg, **LOADER_ARGS, rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["key"]]
    assert keys == ["small", "small2"] and sum(loader.skipped().values()) == 1
    assert "over data.max_sample_bytes" in loader._report()


def test_passing_over_members_keeps_the_samples_as_they_were(tmp_path):
    from mgn.io.tar import tar_samples

    _write(tmp_path, {"a.tar": [_sample("x", mp4=b"v" * 1000), {"__key__": "only-video", "mp4": b"v"},
                                _sample("y")]})
    with open(tmp_path / "a.tar", "rb") as f:
        everything = list(tar_samples(f))
    with open(tmp_path / "a.tar", "rb") as f:
        kept = list(tar_samples(f, keep=lambda ext: ext != "mp4"))
    assert [s["__key__"] for s in kept] == [s["__key__"] for s in everything] == ["x", "only-video", "y"]
    assert kept[0] == {k: v for k, v in everything[0].items() if k != "mp4"}
