"""The shard writer and the synthetic generator: what goes in comes out, bad rows never get in."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgn import shards
from mgn.data import writer
from mgn.data import tokens
from mgn.io import synthetic
from mgn.config import PACKAGED_MINILM, DataConfig
from mgn.data.loader import eval_loader
from mgn.io.manifest import read_folder, read_manifest
from mgn.io.shard_sets import expand_shards, read_sizes

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(path: Path, size=(64, 48), mode="RGB", seed=0) -> Path:
    """Smooth random images: JPEG keeps them close, so a round trip can be checked by pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.BICUBIC).convert(mode)
    image.save(path)
    return path


def _manifest(tmp_path: Path, rows: list[dict], name="manifest.csv") -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    return path


def _read_all(out: Path, split: str, batch_size=4) -> dict[str, tuple]:
    cfg = DataConfig(test_shards=str(out / f"{split}-*.tar"), num_workers=0)
    loader = eval_loader(cfg, image_size=32, mean=MEAN, std=STD, tokenizer_name=None, seq_len=4,
                         batch_size=batch_size, rank=0, world_size=1)
    found = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            found[key] = (batch["label"][i].item(), batch["image"][i])
    return found


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_manifest_round_trip(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    rows = [
        {"id": "a.1", "image": str(_image(images / "a.jpg", seed=1)), "caption": "first frame",
         "label": "violent",
         "split": "train", "game": "x"},
        {"id": "b", "image": "img/b.png", "caption": "second", "label": "non_violent", "split": "train",
         "game": "y"},
        {"id": "c", "image": "img/c.png", "caption": "third, grey", "label": "violent", "split": "test",
         "game": ""},
    ]
    _image(images / "b.png", mode="RGBA", seed=2)
    _image(images / "c.png", mode="L", seed=3)
    out = tmp_path / "shards"
    card = writer.write_shards(read_manifest(_manifest(tmp_path, rows)), out,
                               labels=["non_violent", "violent"], source="test", max_samples=1)
    assert card["splits"]["train"] == {"samples": 2, "shards": 2, "per_label": {"non_violent": 1,
                                                                                "violent": 1}}
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 1, "train-000001.tar": 1,
                                                           "test-000000.tar": 1}
    listing = subprocess.run(["tar", "-tf", str(out / "train-000000.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    ids_field = card["token_ids"]["field"]  # the caption's token ids for the loader (mgn/data/tokens.py)
    # dots would break keys
    assert listing == ["a_1.cls", f"a_1.{ids_field}", "a_1.jpg", "a_1.json", "a_1.txt"]
    assert card["token_ids"] == {"tokenizer": PACKAGED_MINILM, "field": tokens.field_name(PACKAGED_MINILM)}

    stored = {k: v for p in sorted(out.glob("*.tar")) for k, v in _tar_samples(p).items()}
    assert {k: v["txt"].decode() for k, v in stored.items()} == {"a_1": "first frame", "b": "second",
                                                                 "c": "third, grey"}
    assert json.loads(stored["a_1"]["json"]) == {"id": "a.1", "label": "violent", "source": "manifest.csv:2",
                                                 "game": "x"}

    read = {**_read_all(out, "train"), **_read_all(out, "test")}
    assert {k: v[0] for k, v in read.items()} == {"a_1": 1, "b": 0, "c": 1}
    for key, name in (("a_1", "a.jpg"), ("b", "b.png"), ("c", "c.png")):
        with Image.open(images / name) as im:
            reference = np.asarray(im.convert("RGB").resize((32, 32), Image.BILINEAR, box=_centre(im.size)))
        pixels = (read[key][1].permute(1, 2, 0).numpy() * STD + MEAN) * 255
        if name == "b.png":  # transparency is composited on white before JPEG
            continue
        assert np.abs(pixels - reference).mean() < 4.0, key  # JPEG tolerance


def _centre(size):
    w, h = size
    side = min(w, h) * 0.875
    return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


def test_jsonl_manifest_seeded_split_and_reencoding(tmp_path):
    rows = [{"image": str(_image(tmp_path / f"{i}.jpg", size=(200, 100), seed=i)), "caption": f"c{i}",
             "label": "1" if i % 2 else "0"} for i in range(40)]
    manifest = _manifest(tmp_path, rows, "m.jsonl")
    out = tmp_path / "s"
    card = writer.write_shards(read_manifest(manifest), out, labels=["0", "1"], source="t",
                               image_size=50, test_fraction=0.3, seed=1, workers=2)
    n_test = card["splits"]["test"]["samples"]
    assert 3 <= n_test <= 25 and card["splits"]["train"]["samples"] + n_test == 40
    sample = next(iter(_tar_samples(out / "train-000000.tar").values()))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (100, 50)  # shorter side re-encoded to 50
    again = tmp_path / "s2"
    writer.write_shards(read_manifest(manifest), again, labels=["0", "1"], source="t", image_size=50,
                        test_fraction=0.3, seed=1)
    assert (again / "sizes.json").read_text() == (out / "sizes.json").read_text()


def test_folder_layout(tmp_path):
    root = tmp_path / "data"
    for split, label, name in (("train", "cat", "x"), ("train", "dog", "y"), ("test", "dog", "z")):
        folder = root / split / label
        folder.mkdir(parents=True)
        _image(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(f"a {label}")
    rows, labels = read_folder(root)
    assert labels == ["cat", "dog"]
    card = writer.write_shards(rows, tmp_path / "out", labels=labels, source="folder")
    assert card["splits"]["test"]["per_label"] == {"cat": 0, "dog": 1}
    assert set(_read_all(tmp_path / "out", "train")) == {"cat_x", "dog_y"}


def test_rejects_each_kind_of_bad_row(tmp_path):
    good = _image(tmp_path / "good.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    rows = [
        {"id": "ok", "image": str(good), "caption": "fine", "label": "violent"},        # line 2
        {"id": "gone", "image": "nowhere.jpg", "caption": "x", "label": "violent"},     # line 3
        {"id": "bad", "image": str(broken), "caption": "x", "label": "violent"},        # line 4
        {"id": "empty", "image": str(good), "caption": "  ", "label": "violent"},       # line 5
        {"id": "other", "image": str(good), "caption": "x", "label": "gore"},           # line 6
        {"id": "ok", "image": str(good), "caption": "again", "label": "violent"},       # line 7
    ]
    out = tmp_path / "out"
    card = writer.write_shards(read_manifest(_manifest(tmp_path, rows)), out,
                               labels=["non_violent", "violent"], source="t", test_fraction=0.0)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"]) for r in rejects] == [
        (3, "missing_file"), (4, "unreadable_image"), (5, "empty_caption"), (6, "unknown_label"), (7,
                                                                                                   "duplicate_id")]
    assert "nowhere.jpg" in rejects[0]["reason"] and "line 2" in rejects[4]["reason"]
    assert card["rejected"]["rows"] == 5 and card["splits"]["train"]["samples"] == 1
    assert list(_tar_samples(out / "train-000000.tar")) == ["ok"]  # bad rows left no files behind

    with pytest.raises(writer.BadRowError, match=r"manifest.csv:3: missing file"):
        writer.write_shards(read_manifest(_manifest(tmp_path, rows)), tmp_path / "strict",
                            labels=["non_violent", "violent"], source="t", strict=True)
    assert not list((tmp_path / "strict").glob("*.tar"))


def test_interrupted_writer_leaves_no_complete_looking_shard(tmp_path, monkeypatch):
    real_render = synthetic.render

    def render_then_die(spec, item):
        if item[0] == 300:
            raise KeyboardInterrupt
        return real_render(spec, item)

    monkeypatch.setattr(synthetic, "render", render_then_die)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        writer.write_synthetic(out, samples=500, image_size=32, seed=0, max_samples=64)
    assert list(out.iterdir()) == []  # finished shards of a failed run are removed too


def test_killed_writer_leaves_only_whole_shards(tmp_path):
    """A SIGKILL cannot be cleaned up after: whole shards may stay, partial ones keep a hidden name."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mgn.shards", "--synthetic", "--out", str(out), "--samples", "100000",
           "--image-size", "32", "--max-samples-per-shard", "200", "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 2:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    whole = sorted(out.glob("*.tar"))
    assert whole, "the writer produced no shard before the deadline"
    for path in whole:
        assert len(_tar_samples(path)) == 200, path
    assert all(p.name.startswith(".") for p in out.iterdir() if p not in whole)
    assert expand_shards(str(out / "*")) == [str(p) for p in whole]  # hidden partial files never match
    with pytest.raises(FileNotFoundError, match="sizes.json"):
        read_sizes(whole)  # written last: the reader refuses the unfinished set


def test_existing_shards_are_not_silently_mixed(tmp_path):
    writer.write_synthetic(tmp_path, samples=20, image_size=32, seed=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        writer.write_synthetic(tmp_path, samples=20, image_size=32, seed=0)
    writer.write_synthetic(tmp_path, samples=10, image_size=32, seed=0, overwrite=True)
    assert sum(json.loads((tmp_path / "sizes.json").read_text()).values()) == 10


def _disk_with_room(room: int):
    """`open` for the writer's shard files as on a disk with `room` bytes left: past them a write fails as a
    full disk's does, with no file named."""
    left = [room]

    class Filling(io.FileIO):
        def write(self, data) -> int:
            if len(data) > left[0]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            left[0] -= len(data)
            return super().write(data)

    return lambda path, mode: io.BufferedWriter(Filling(path, mode))


def test_a_full_disk_removes_every_partial_file_names_the_file_and_a_rerun_is_not_refused(
        tmp_path, monkeypatch, capsys):
    """The probe without a real full disk: both splits' files open when the disk fills. Before, closing the
    first one raised again, so its partial file stayed and the other split's writer was never aborted."""
    out = tmp_path / "out"
    monkeypatch.setattr(writer, "open", _disk_with_room(100_000), raising=False)
    argv = ["--synthetic", "--out", str(out), "--samples", "200", "--image-size", "32", "--workers", "1",
            "--tokenizer", "none"]
    assert shards.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"python -m mgn.shards: error: {out}/.")
    assert ".tar.partial: No space left on device (its file system has " in error and "MB free" in error
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    assert shards.main(argv) == 0  # nothing left that would refuse the same command


def test_the_writer_on_a_full_tmpfs_leaves_it_empty_with_one_line(small_tmpfs):
    small = small_tmpfs("2m")
    command = [sys.executable, "-m", "mgn.shards", "--synthetic", "--out", str(small / "demo"),
               "--workers", "1", "--tokenizer", "none", "--samples"]
    full = subprocess.run([*command, "1000"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert full.returncode == 2
    assert full.stderr.startswith(f"python -m mgn.shards: error: {small / 'demo'}/.")
    assert "No space left on device (its file system has 2.0 MB free" in full.stderr  # all free again
    assert full.stderr.count("\n") == 1  # one line, no "Exception ignored ... tarfile" after it
    assert list((small / "demo").iterdir()) == []
    again = subprocess.run([*command, "20"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr


def test_cli_synthetic_demo_layout(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "mgn.shards", "--synthetic", "--out", str(out),
                             "--samples", "600",
                             "--image-size", "48", "--seed", "0", "--max-samples-per-shard", "64"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(expand_shards(str(out / "train-{000000..000007}.tar"))) == 8  # 510 train samples / 64
    assert len(expand_shards(str(out / "test-{000000..000001}.tar"))) == 2  # 90 test samples
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["splits"]["test"]["samples"] == 90 and card["generator"]["seed"] == 0
    subprocess.run(["tar", "-tf", str(out / "test-000001.tar")], check=True, capture_output=True)


def test_cli_manifest_needs_declared_labels(tmp_path):
    manifest = _manifest(tmp_path, [{"image": "x.jpg", "caption": "c", "label": "a"}])
    result = subprocess.run([sys.executable, "-m", "mgn.shards", "--manifest", str(manifest), "--out",
                             str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "--labels" in result.stderr


# ---------------------------------------------------------------------------------------------- synthetic

def _synthetic(n=400, **knobs) -> list[synthetic.SyntheticSample]:
    spec = synthetic.SyntheticSpec(samples=n, image_size=48, seed=knobs.pop("seed", 0), **knobs)
    return [synthetic.render(spec, item) for item in enumerate(synthetic.assign_splits(spec))]


def test_synthetic_is_deterministic_for_a_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    writer.write_synthetic(a, samples=120, image_size=32, seed=7, max_samples=50)
    writer.write_synthetic(b, samples=120, image_size=32, seed=7, max_samples=50, workers=2)
    for path in sorted(a.glob("*.tar")):
        assert path.read_bytes() == (b / path.name).read_bytes()
    c = _synthetic(30, seed=8)
    assert [s.jpeg for s in c] != [s.jpeg for s in _synthetic(30, seed=7)]
    assert [s.split for s in _synthetic(1000)].count("test") == 150  # the paper's 85/15


def _caption_only_accuracy(samples) -> float:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"] + train[-200:]
    train = train[:-200]
    vec = CountVectorizer().fit([s.caption for s in train])
    model = LogisticRegression(max_iter=500).fit(vec.transform([s.caption for s in train]),
                                                 [s.label for s in train])
    return model.score(vec.transform([s.caption for s in test]), [s.label for s in test])


def test_caption_informativeness_raises_caption_only_accuracy():
    accuracy = {info: _caption_only_accuracy(_synthetic(800, caption_info=info, label_noise=0.0))
                for info in (0.0, 0.5, 1.0)}
    assert accuracy[0.0] < 0.62 < accuracy[0.5] < 0.85 < accuracy[1.0]


def _pixel_features(jpeg: bytes) -> list[float]:
    """Two things anyone could measure on a splat: how ragged its outline is and how dark its red."""
    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    red = (rgb[..., 0] > rgb[..., 1] + 50) & (rgb[..., 0] > rgb[..., 2] + 40)
    edges = (red[1:, :] != red[:-1, :]).sum() + (red[:, 1:] != red[:, :-1]).sum()
    return [edges / max(red.sum(), 1) ** 0.5, rgb[..., 0][red].mean() if red.any() else 0.0]


def _image_only_accuracy(**knobs) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    samples = _synthetic(400, label_noise=0.0, **knobs)
    features = np.array([_pixel_features(s.jpeg) for s in samples])
    features = (features - features.mean(0)) / features.std(0)
    return cross_val_score(LogisticRegression(), features, [s.label for s in samples], cv=4).mean()


def test_cue_strength_controls_how_much_the_image_says():
    assert _image_only_accuracy(cue_strength=0.0, decoys=0) < 0.6
    assert _image_only_accuracy(cue_strength=1.0, decoys=0) > 0.9


def test_spurious_badge_correlation_differs_between_splits():
    samples = _synthetic(2000, spurious_train=0.8, spurious_test=-0.8)

    def agreement(split):
        chosen = [s for s in samples if s.split == split]
        return np.mean([s.meta["badge"] == bool(s.meta["true_label"]) for s in chosen])

    assert agreement("train") > 0.85 and agreement("test") < 0.15


def test_the_badge_is_in_the_pixels():
    """Backgrounds and clutter are never this saturated, so saturated green up there is the badge."""
    spec = synthetic.SyntheticSpec(samples=200, image_size=96, seed=0)
    for index in range(200):
        sample = synthetic.render(spec, (index, "train"))
        hsv = np.asarray(Image.open(io.BytesIO(sample.jpeg)).convert("HSV")).astype(int)[10:21, 38:57]
        green = (hsv[..., 0] > 60) & (hsv[..., 0] < 120) & (hsv[..., 1] > 185)
        assert green.any() == sample.meta["badge"], index


def test_label_noise_and_class_balance():
    samples = _synthetic(2000, label_noise=0.1, positive_fraction=0.2)
    flipped = np.mean([s.label != s.meta["true_label"] for s in samples])
    positives = np.mean([s.meta["true_label"] for s in samples])
    assert 0.07 < flipped < 0.13 and 0.17 < positives < 0.23
