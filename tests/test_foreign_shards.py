"""Shards other tools wrote: webdataset's own ShardWriter (jpg, txt, cls) and an img2dataset-shaped set (jpg,
txt, json with url/key/status and the label in a field). Before indexing a run stops with one line and leaves
them untouched; after `python -m mgn.shards --index` they train and evaluate as they are."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgn.io.sample_fields import SampleFieldError, SampleFields, member

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("safe", "violent")


def _jpeg(label: int, seed: int, size: int = 48, fmt: str = "JPEG") -> bytes:
    """A photo-like image whose label is visible: red-ish for violent, blue-ish for safe."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    pixels[..., 0 if label else 2] += 120
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return out.getvalue()


def write_with_shardwriter(folder: Path, split: str, count: int, first: int = 0) -> None:
    """The way a webdataset user writes shards: ShardWriter with jpg/txt/cls, no sizes.json, no card."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=max(1, count // 2), verbose=0) as sink:
        for i in range(first, first + count):
            label = i % 2
            sink.write({"__key__": f"{split}{i:05d}", "jpg": _jpeg(label, i),
                        "txt": f"stream {i} {'fight weapon' if label else 'cooking chat'}", "cls": label})


def write_img2dataset_like(folder: Path, split: str, count: int) -> None:
    """img2dataset's layout: {key}.jpg, {key}.txt, {key}.json (url, key, status, ...; here a label field)."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"{split}-00000.tar", "w") as tar:
        for i in range(count):
            key = f"{i:09d}"
            label = i % 2
            meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                    "width": 48, "height": 48, "moderation": LABELS[label]}
            members = {"jpg": _jpeg(label, 1000 + i), "txt": f"clip {i}".encode(),
                       "json": json.dumps(meta).encode()}
            if i == 3:
                del members["txt"]  # a row without a caption: counted, listed, skipped
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK", "MASTER_"))}
    return clean | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=600)


def index(pattern: str, *flags: str) -> subprocess.CompletedProcess:
    return run("-m", "mgn.shards", "--index", pattern, "--labels", ",".join(LABELS), "--workers", "1", *flags)


# ------------------------------------------------------------------------------------------ sample fields

def test_a_member_is_found_by_its_name_or_its_last_extension():
    assert member({"jpg": 1}, "jpg") == 1
    assert member({"__key__": "a", "b.jpg": 2, "b.txt": 3}, "jpg") == 2  # key "a.b": webdataset splits at "."
    assert member({"b.jpg": 2, "c.jpg": 3}, "jpg") is None  # two: not one sample's
    assert member({"txt": 1}, "jpg") is None


def test_labels_come_as_indices_names_or_booleans_and_anything_else_is_refused():
    by_cls = SampleFields(LABELS)
    assert by_cls.label({"cls": b"1\n"}) == 1
    assert by_cls.label({"cls": b"violent"}) == 1
    by_json = SampleFields(LABELS, "json:y", "json:title")
    assert by_json.label({"json": b'{"y": "safe"}'}) == 0
    assert by_json.label({"json": b'{"y": true}'}) == 1
    assert by_json.caption({"json": '{"title": "Call of Duty"}'.encode()}) == b"Call of Duty"
    for sample, problem in (({"cls": b"2"}, "not a class index"), ({"cls": b"gore"}, "not one of the labels"),
                            ({}, "missing cls")):
        with pytest.raises(SampleFieldError, match=problem):
            by_cls.label(sample)
    with pytest.raises(SampleFieldError, match="has no 'y'"):
        by_json.label({"json": b'{"z": 1}'})
    with pytest.raises(ValueError, match="--label-from 'label'"):
        SampleFields(LABELS, "label")


def test_a_card_without_fields_means_cls_and_txt():
    assert SampleFields.from_card({"labels": ["a", "b"]}) == SampleFields(("a", "b"), "cls", "txt")
    fields = SampleFields(LABELS, "json:moderation", "txt")
    assert SampleFields.from_card({"labels": list(LABELS), "fields": fields.to_card()}) == fields


def test_a_caption_is_needed_only_by_a_reader_of_captions():
    from mgn.config import PACKAGED_MINILM
    from mgn.data.decode import BadSample, Decoder

    sample = {"__key__": "k", "__url__": "s.tar", "jpg": _jpeg(1, 0), "cls": b"1"}
    mean = std = (0.5, 0.5, 0.5)
    assert Decoder(32, mean, std, None, 16, train=False).decode(sample)[3] == 1  # the student's reader
    with pytest.raises(BadSample, match="no caption: missing txt"):
        Decoder(32, mean, std, PACKAGED_MINILM, 16, train=False).decode(sample)


# ------------------------------------------------------------------------------------------ the index command

def test_index_counts_every_shard_lists_the_unusable_and_changes_no_shard(tmp_path):
    data = tmp_path / "mine"
    write_img2dataset_like(data, "train", 12)
    before = tree_digest(data)
    done = index(str(data / "*.tar"), "--label-from", "json:moderation")
    assert done.returncode == 0, done.stderr
    card = json.loads((data / "dataset_card.json").read_text())
    assert json.loads((data / "sizes.json").read_text()) == {"train-00000.tar": 12}
    assert card["fields"] == {"label": "json:moderation", "caption": "txt"}
    assert card["per_label"] == {"safe": 6, "violent": 5} and card["usable"] == 11
    rejects = [json.loads(line) for line in (data / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"shard": "train-00000.tar", "key": "000000003", "reason": "no caption: missing txt"}]
    after = tree_digest(data)
    assert {k: v for k, v in after.items() if k.endswith(".tar")} == before  # the shards, byte for byte
    assert set(after) - set(before) == {"sizes.json", "dataset_card.json", "rejects.jsonl"}
    assert "1 samples (8.3%) the loader will skip" in done.stdout
    assert "--data.max_skip_fraction" in done.stdout


def test_index_adds_a_second_split_and_refuses_other_labels_or_a_set_it_did_not_write(tmp_path):
    data = tmp_path / "mine"
    write_with_shardwriter(data, "train", 8)
    write_with_shardwriter(data, "test", 4, first=100)
    assert index(str(data / "train-*.tar")).returncode == 0
    assert index(str(data / "test-*.tar")).returncode == 0
    assert json.loads((data / "sizes.json").read_text()) == {
        "test-000000.tar": 2, "test-000001.tar": 2, "train-000000.tar": 4, "train-000001.tar": 4}
    other = run("-m", "mgn.shards", "--index", str(data / "test-*.tar"), "--labels", "a,b")
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "was indexed with labels ['safe', 'violent']" in other.stderr
    (data / "dataset_card.json").write_text('{"labels": ["safe", "violent"], "created_by": "mgn.shards"}')
    ours = index(str(data / "test-*.tar"))
    assert ours.returncode == 2 and "not written by --index" in ours.stderr


def test_png_and_webp_images_are_indexed_and_decoded_like_jpeg(tmp_path):
    """img2dataset and webdataset users store png and webp as well as jpg; each is a sample's image."""
    import webdataset as wds

    from mgn.data.decode import Decoder

    data = tmp_path / "mixed"
    data.mkdir()
    formats = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    with wds.ShardWriter(str(data / "train-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i, (ext, fmt) in enumerate(formats.items()):
            sink.write({"__key__": f"s{i}", ext: _jpeg(1, i, fmt=fmt), "txt": f"clip {i}", "cls": 1})
    done = index(str(data / "*.tar"))
    assert done.returncode == 0, done.stderr
    assert json.loads((data / "dataset_card.json").read_text())["usable"] == 3
    assert not (data / "rejects.jsonl").exists() or not (data / "rejects.jsonl").read_text().strip()
    decoder = Decoder(32, (0.5,) * 3, (0.5,) * 3, None, 16, train=False)
    for i, (ext, fmt) in enumerate(formats.items()):
        crop = np.asarray(decoder.decode({"__key__": f"s{i}", "__url__": "train-000000.tar",
                                          ext: _jpeg(1, i, fmt=fmt), "cls": b"1"})[1], dtype=np.float32)
        channels = crop if crop.shape[0] == 3 else np.moveaxis(crop, -1, 0)
        assert channels.shape == (3, 32, 32), (ext, crop.shape)
        assert channels[0].mean() > channels[2].mean() + 0.2 * np.ptp(channels), ext  # red-ish: RGB, in order


def test_keys_with_dots_that_fall_together_are_rejected_with_the_reason(tmp_path):
    import tarfile

    data = tmp_path / "dots"
    data.mkdir()
    with tarfile.open(data / "train-0.tar", "w") as tar:
        for name, payload in (("clip.v1.jpg", _jpeg(0, 0)), ("clip.v1.txt", b"a"), ("clip.v1.cls", b"0"),
                              ("clip.v2.jpg", _jpeg(1, 1)), ("clip.v2.txt", b"b"), ("clip.v2.cls", b"1"),
                              ("solo.v3.jpg", _jpeg(1, 2)), ("solo.v3.txt", b"c"), ("solo.v3.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert index(str(data / "*.tar")).returncode == 0
    rejects = [json.loads(line) for line in (data / "rejects.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rejects] == ["clip"] and "keys with dots" in rejects[0]["reason"]
    card = json.loads((data / "dataset_card.json").read_text())
    # solo.v3: one key with a dot, its members found by their last extension
    assert card["per_label"] == {"safe": 0, "violent": 1}


# ------------------------------------------------------------------------------------------ train.py on them

def train(train_spec: str, test_spec: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("train.py", "--preset", "tiny", "--data.train_shards", train_spec, "--data.test_shards",
               test_spec, "--train.output_dir", str(out), "--train.run_name", "r", "--model.image_size", "32",
               *extra)


def test_a_run_pointed_at_unindexed_shards_stops_with_one_line_and_writes_nothing_there(tmp_path):
    data = tmp_path / "mine"
    write_with_shardwriter(data, "train", 8)
    write_with_shardwriter(data, "test", 4, first=100)
    before = tree_digest(data)
    # the tiny preset has data.synthetic_samples 320: before, the run took the folder for a missing demo set
    done = train(str(data / "train-*.tar"), str(data / "test-*.tar"), tmp_path / "runs")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    line, = done.stderr.strip().splitlines()
    assert "but no sizes.json" in line and "python -m mgn.shards --index" in line, line
    assert tree_digest(data) == before
    plain = train(str(data / "train-*.tar"), str(data / "test-*.tar"), tmp_path / "runs",
                  "--data.synthetic_samples", "0")
    assert plain.returncode == 2 and "no sizes.json in" in plain.stderr and "--index" in plain.stderr
    assert tree_digest(data) == before


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["shardwriter", "img2dataset"])
def test_indexed_shards_from_other_tools_train_and_evaluate_as_they_are(tmp_path, shape):
    data = tmp_path / "mine"
    if shape == "shardwriter":
        write_with_shardwriter(data, "train", 48)
        write_with_shardwriter(data, "test", 16, first=100)
        flags: tuple[str, ...] = ()
    else:
        write_img2dataset_like(data / "train", "train", 48)
        write_img2dataset_like(data / "test", "test", 16)
        flags = ("--label-from", "json:moderation")
    pattern = str(data / "*.tar") if shape == "shardwriter" else str(data / "*" / "*.tar")
    indexed = index(pattern, *flags)
    assert indexed.returncode == 0, indexed.stderr
    shards = tree_digest(data)
    train_spec = str(data / "train-*.tar") if shape == "shardwriter" else str(data / "train" / "*.tar")
    test_spec = str(data / "test-*.tar") if shape == "shardwriter" else str(data / "test" / "*.tar")
    done = train(train_spec, test_spec, tmp_path / "runs", "--train.epochs", "2",
                 "--data.max_skip_fraction", "0.1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "r"
    assert json.loads((run_dir / "summary.json").read_text())["step"] > 0
    evaluated = run("evaluate.py", "--ckpt", str(run_dir / "student" / "student.safetensors"))
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    report = json.loads((run_dir / "student" / "eval" / "eval.json").read_text())
    # every test sample, the captionless one too: the deployed student reads no caption
    assert report["samples"] == 16 and 0 <= report["student"]["accuracy"] <= 1
    assert tree_digest(data) == shards  # training and evaluation wrote nothing beside the shards
