"""Safe to share: hostile checkpoints never run code without --trust-checkpoint; hostile manifests, images and
captions cost a clear message, bounded time and memory, and the good rows survive."""
import csv
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import evaluate
from mgn.config import preset_config
from mgn.model.export import export_student
from mgn.model.networks import ImageClassifier
from mgn.io.manifest import read_manifest
from mgn.data.writer import write_shards
from tests.conftest import calibrate_batchnorm

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this writes the marker file: what an attacker's code would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",)


def _student(tmp: Path) -> tuple[ImageClassifier, object]:
    cfg = preset_config("tiny", {"objective": {"name": "baseline"}})
    torch.manual_seed(0)
    student = ImageClassifier(cfg.model)
    calibrate_batchnorm(student, image_size=64)
    return student, cfg


def hostile_pt2(tmp: Path, marker: Path) -> Path:
    """A real student.pt2 whose archive marks its first weight as pickled, the pickle being the payload."""
    student, cfg = _student(tmp)
    export_student(student, cfg, tmp / "clean", formats=("pt2",))
    source, target = tmp / "clean" / "student.pt2", tmp / "hostile" / "student.pt2"
    target.parent.mkdir()
    with zipfile.ZipFile(source) as zin:
        config_name = next(n for n in zin.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(zin.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        weight = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
        with zipfile.ZipFile(target, "w") as zout:
            for item in zin.infolist():
                data = {config_name: json.dumps(config).encode(),
                        weight: pickle.dumps(_Payload(marker))}.get(item.filename) or zin.read(item.filename)
                zout.writestr(item, data)
    return target


def test_a_pt2_with_a_pickled_weight_is_refused_by_every_entry_point(tmp_path, capsys):
    marker = tmp_path / "marker"
    hostile = hostile_pt2(tmp_path, marker)
    assert evaluate.main(["--ckpt", str(hostile), "--shards", "unused"]) == 2
    assert "pickles" in capsys.readouterr().err and not marker.exists()
    assert benchmark.main(["--ckpt", str(hostile), "--tiny", "--out", str(tmp_path / "b.json")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err and not marker.exists()
    result = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--train.output_dir",
                             str(tmp_path),
                             "--train.init_from", str(hostile)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "--trust-checkpoint" in result.stdout + result.stderr
    assert not marker.exists()
    # The file really is hostile: trusting it runs the payload.
    evaluate.main(["--ckpt", str(hostile), "--shards", "unused", "--trust-checkpoint"])
    assert marker.exists()


def test_the_safetensors_student_loads_without_the_project_and_matches(tmp_path):
    student, cfg = _student(tmp_path)
    path = export_student(student, cfg, tmp_path, formats=("safetensors",))
    images = torch.randn(3, 3, 64, 64)
    np.save(tmp_path / "images.npy", images.numpy())
    with torch.no_grad():
        expected = student.eval()(images).numpy()
    script = f"""
import json, numpy, torch, timm
from safetensors import safe_open
from timm.utils import reparameterize_model
try:
    import mgn
    raise SystemExit("mgn is importable here")
except ImportError:
    pass
with safe_open({str(path)!r}, framework="pt") as f:
    model_cfg = json.loads(f.metadata()["config.json"])["model"]
    weights = {{k.removeprefix("encoder."): f.get_tensor(k) for k in f.keys()}}
model = reparameterize_model(timm.create_model(model_cfg["image_model"], \
num_classes=model_cfg["num_classes"]).eval())
model.load_state_dict(weights)
with torch.no_grad():
    out = model(torch.from_numpy(numpy.load({str(tmp_path / 'images.npy')!r})))
numpy.save({str(tmp_path / 'out.npy')!r}, out.numpy())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    from mgn.data.writer import write_synthetic

    work = tmp_path_factory.mktemp("zero2")
    write_synthetic(work / "shards", samples=120, image_size=64, seed=0, max_samples=40)
    result = subprocess.run(
        [sys.executable, "train.py", "--preset", "tiny", "--objective.name", "baseline", "--train.zero_stage",
         "2",
         "--data.train_shards", str(work / "shards" / "train-*.tar"), "--data.test_shards",
         str(work / "shards" / "test-*.tar"), "--data.synthetic_samples", "0", "--train.output_dir",
         str(work),
         "--train.run_name", "z2", "--train.eval_every", "-1"], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return work


@pytest.mark.slow
def test_a_zero_folder_with_a_crafted_optimizer_file_is_never_unpickled_without_trust(zero2_run, tmp_path,
                                                                                      capsys):
    run = tmp_path / "z2"
    shutil.copytree(zero2_run / "z2", run)
    marker = tmp_path / "marker"
    optimizer = next((run / "checkpoints").glob("step_*/*optim_states.pt"))
    torch.save(_Payload(marker), optimizer)  # torch's own zip format, as DeepSpeed writes it
    # The crafted tag itself is named: through the run folder a reader would pass over it (its manifest no
    # longer matches) for an intact one, and the hostile file would never be in reach.
    tag = optimizer.parent
    shards = str(zero2_run / "shards" / "test-*.tar")
    assert evaluate.main(["--ckpt", str(tag), "--shards", shards, "--out", str(tmp_path / "eval")]) == 0
    assert "read from the module states" in capsys.readouterr().out and not marker.exists()
    assert benchmark.main(["--ckpt", str(tag), "--tiny", "--out", str(tmp_path / "b.json")]) == 0
    assert not marker.exists()
    evaluate.main(["--ckpt", str(tag), "--shards", shards, "--out", str(tmp_path / "eval2"),
                   "--trust-checkpoint"])
    assert marker.exists()  # consolidation unpickles the optimizer shards: the file really is hostile


@pytest.mark.slow
def test_a_resume_folder_outside_the_run_needs_trust(zero2_run, tmp_path):
    marker = tmp_path / "marker"
    outside = tmp_path / "elsewhere"
    shutil.copytree(zero2_run / "z2" / "checkpoints", outside)
    states = next(outside.glob("step_*/mp_rank_00_model_states.pt"))
    torch.save(_Payload(marker), states)
    args = [sys.executable, "train.py", "--preset", "tiny", "--objective.name", "baseline",
            "--train.zero_stage", "2",
            "--data.train_shards", str(zero2_run / "shards" / "train-*.tar"), "--data.test_shards",
            str(zero2_run / "shards" / "test-*.tar"), "--data.synthetic_samples", "0", "--train.output_dir",
            str(tmp_path), "--train.run_name", "new", "--train.resume", str(outside)]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and "outside this run's folder" in result.stdout + result.stderr
    assert "--trust-checkpoint" in result.stdout + result.stderr and not marker.exists()


# ---------------------------------------------------------------------------------------------- the writer

def _jpeg(path: Path, colour=(120, 60, 30), size=(32, 32), **save) -> Path:
    Image.new("RGB", size, colour).save(path, format="JPEG", **save)
    return path


def _manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stored(out: Path) -> dict[str, dict]:
    from mgn.io.tar import tar_samples

    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with open(shard, "rb") as f:
            samples.update({s["__key__"]: s for s in tar_samples(f)})
    return samples


def _rejects(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def test_manifest_paths_outside_the_data_root_are_rejected_and_the_rest_written(tmp_path):
    data, secret = tmp_path / "data", tmp_path / "secret"
    data.mkdir(), secret.mkdir()
    _jpeg(data / "good.jpg")
    _jpeg(secret / "private.jpg")
    (data / "link.jpg").symlink_to(secret / "private.jpg")
    rows = [{"id": "good", "image": "good.jpg", "caption": "c", "label": "a"},
            {"id": "dots", "image": "../secret/private.jpg", "caption": "c", "label": "a"},
            {"id": "absolute", "image": str(secret / "private.jpg"), "caption": "c", "label": "a"},
            {"id": "symlink", "image": "link.jpg", "caption": "c", "label": "a"}]
    out = tmp_path / "out"
    card = write_shards(read_manifest(_manifest(data, rows)), out, labels=["a"], source="test",
                        data_root=data,
                        test_fraction=0.0)
    rejects = _rejects(out)
    assert set(rejects) == {"dots", "absolute", "symlink"}
    assert all(r["kind"] == "outside_root" and "outside the data root" in r["reason"]
               for r in rejects.values())
    assert list(_stored(out)) == ["good"] and card["rejected"]["by_kind"] == {"outside_root": 3}
    allowed = write_shards(read_manifest(_manifest(data, rows)), tmp_path / "allowed", labels=["a"],
                           source="test",
                           data_root=None, test_fraction=0.0)
    assert allowed["rejected"]["rows"] == 0


def test_a_member_named_dot_dot_is_read_without_writing_outside(tmp_path):
    from mgn.config import DataConfig
    from mgn.data.loader import eval_loader

    inside = tmp_path / "shards"
    inside.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="JPEG")
    with tarfile.open(inside / "test-000000.tar", "w") as tar:
        for name, data in (("../evil.jpg", buf.getvalue()), ("../evil.txt", b"x"), ("../evil.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (inside / "sizes.json").write_text('{"test-000000.tar": 1}')
    before = sorted(p.name for p in tmp_path.iterdir())
    loader = eval_loader(DataConfig(test_shards=str(inside / "test-*.tar"), num_workers=0), image_size=16,
                         mean=(0.5,) * 3, std=(0.5,) * 3, tokenizer_name=None, seq_len=4, batch_size=2,
                         rank=0,
                         world_size=1)
    assert [k for b in loader for k in b["key"]] == ["../evil"]  # a dictionary key, never a path
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_hostile_images_get_their_documented_outcome_quickly(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    huge = data / "huge.png"
    Image.new("1", (13000, 13000), 1).save(huge)  # ~170 M pixels, a small file
    assert huge.stat().st_size < 2_000_000
    sixteen = data / "sixteen.png"
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(sixteen)  # mid grey in 16 bits
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0)}  # GPS info
    gps = _jpeg(data / "gps.jpg", exif=exif)
    gps.write_bytes(gps.read_bytes() + b"SECRET-TRAILING-BYTES")
    rows = [{"id": n, "image": f"{n}.{e}", "caption": "c", "label": "a"}
            for n, e in (("huge", "png"), ("sixteen", "png"), ("gps", "jpg"))]
    start = time.perf_counter()
    out = tmp_path / "out"
    write_shards(read_manifest(_manifest(data, rows)), out, labels=["a"], source="test", data_root=data,
                 test_fraction=0.0)
    assert time.perf_counter() - start < 10
    rejects, stored = _rejects(out), _stored(out)
    assert rejects["huge"]["kind"] == "too_large" and "13000x13000" in rejects["huge"]["reason"]
    grey = np.asarray(Image.open(io.BytesIO(stored["sixteen"]["jpg"])).convert("L")).mean()
    assert 120 < grey < 136  # scaled, not clipped to white
    assert (b"SECRET" not in stored["gps"]["jpg"]
            and not Image.open(io.BytesIO(stored["gps"]["jpg"])).getexif())
    kept = tmp_path / "kept"
    write_shards(read_manifest(_manifest(data, rows[2:])), kept, labels=["a"], source="test", data_root=data,
                 test_fraction=0.0, keep_original=True)
    assert _stored(kept)["gps"]["jpg"] == gps.read_bytes()  # asked for: byte for byte


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_ten_megabyte_caption_is_cut_and_recorded_and_the_other_rows_survive(tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    _jpeg(data / "x.jpg")
    rows = [{"id": "long", "image": "x.jpg", "caption": "fight " * 1_750_000, "label": "a"},
            {"id": "fine", "image": "x.jpg", "caption": "ok", "label": "a"}]
    if kind == "jsonl":
        manifest = _manifest(data, rows)
    else:
        manifest = data / "manifest.csv"
        with manifest.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["id", "image", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows)
    out = tmp_path / "out"
    start = time.perf_counter()
    card = write_shards(read_manifest(manifest), out, labels=["a"], source="test", data_root=data,
                        test_fraction=0.0)
    assert time.perf_counter() - start < 10
    stored = _stored(out)
    assert len(stored["long"]["txt"]) == 4096 and stored["fine"]["txt"] == b"ok"
    assert (json.loads(stored["long"]["json"])["caption_truncated_from_bytes"]
            == len(rows[0]["caption"].strip()))
    assert card["captions_truncated"] == 1


def test_a_csv_cell_beyond_the_field_limit_is_a_rejected_row_with_its_line(tmp_path):
    from mgn.io.manifest import MAX_CSV_FIELD

    data = tmp_path / "data"
    data.mkdir()
    _jpeg(data / "x.jpg")
    manifest = data / "manifest.csv"
    manifest.write_text("id,image,caption,label\n" f"huge,x.jpg,{'a' * (MAX_CSV_FIELD + 10)},a\n"
                        "fine,x.jpg,ok,a\n")
    out = tmp_path / "out"
    card = write_shards(read_manifest(manifest), out, labels=["a"], source="test", data_root=data,
                        test_fraction=0.0)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert (len(rejects) == 1 and rejects[0]["line"] == 2
            and "field larger than field limit" in rejects[0]["reason"])
    assert list(_stored(out)) == ["fine"] and card["splits"]["train"]["samples"] == 1


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _one_shard(folder: Path, samples: list[tuple[str, str, bytes, bytes]]) -> str:
    """A test shard written by another tool, of (key, image extension, image, caption) samples, all of class
    0; returns its pattern."""
    folder.mkdir()
    with tarfile.open(folder / "test-000000.tar", "w") as tar:
        for key, ext, image, caption in samples:
            for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", caption), (f"{key}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({"test-000000.tar": len(samples)}))
    return str(folder / "test-*.tar")


def test_the_reader_caps_pixels_before_decoding_and_captions_before_tokenizing(tmp_path):
    from mgn.config import PACKAGED_MINILM, DataConfig, resolve_text_model
    from mgn.data.loader import eval_loader

    huge = _encoded(Image.new("1", (13000, 13000), 1), "PNG")
    small = _encoded(Image.new("RGB", (16, 16)), "JPEG")
    shards = _one_shard(tmp_path / "shards", [("huge", "png", huge, b"c"),
                                              ("long", "jpg", small, b"fight " * 1_750_000),
                                              ("fine", "jpg", small, b"ok")])
    cfg = DataConfig(test_shards=shards, num_workers=0, max_skip_fraction=0.5)
    start = time.perf_counter()
    loader = eval_loader(cfg, image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3,
                         tokenizer_name=resolve_text_model(PACKAGED_MINILM), seq_len=16, batch_size=4, rank=0,
                         world_size=1)
    keys = [k for batch in loader for k in batch["key"]]
    assert time.perf_counter() - start < 10
    assert keys == ["long", "fine"] and sum(loader.skipped().values()) == 1


def test_an_empty_image_a_thin_strip_and_control_characters_are_rejected_with_their_line_and_what_is_wrong(
        tmp_path):
    """The probe: a 0-byte image was rejected as `<_io.BytesIO object at 0x...>`; a 60000 x 1 PNG and a
    caption holding NUL bytes were written."""
    data = tmp_path / "data"
    data.mkdir()
    _jpeg(data / "good.jpg")
    (data / "empty.jpg").write_bytes(b"")
    Image.new("L", (60000, 1)).save(data / "strip.png")
    rows = [{"id": "good", "image": "good.jpg", "caption": "two lines\r\nand\ta tab", "label": "a"},  # line 1
            {"id": "empty", "image": "empty.jpg", "caption": "c", "label": "a"},  # line 2
            {"id": "strip", "image": "strip.png", "caption": "c", "label": "a"},  # line 3
            {"id": "nul", "image": "good.jpg", "caption": "fine\x00\x00print", "label": "a"}]  # line 4
    out = tmp_path / "out"
    card = write_shards(read_manifest(_manifest(data, rows)), out, labels=["a"], source="test",
                        data_root=data, test_fraction=0.0)
    rejects = _rejects(out)
    assert {k: (r["line"], r["kind"], r["reason"]) for k, r in rejects.items()} == {
        "empty": (2, "unreadable_image", "unreadable image: an empty file (0 bytes)"),
        "strip": (3, "too_thin", "image too thin: 60000x1: its sides are more than 50 to 1 apart (the cap is "
                                 "1:50)"),
        "nul": (4, "control_characters", "caption holds the control character U+0000 at character 5 "
                                         "(allowed: tab and line breaks)")}
    assert list(_stored(out)) == ["good"] and card["splits"]["train"]["samples"] == 1


def test_the_reader_skips_and_counts_an_image_past_the_aspect_cap_and_keeps_square_ones(tmp_path):
    from mgn.config import DataConfig
    from mgn.data.loader import eval_loader

    strip, square = _encoded(Image.new("L", (60000, 1)), "PNG"), _encoded(Image.new("RGB", (16, 16)), "JPEG")
    shards = _one_shard(tmp_path / "shards", [("strip", "png", strip, b"c"), ("fine", "jpg", square, b"c")])
    loader = eval_loader(DataConfig(test_shards=shards, num_workers=0, max_skip_fraction=0.5), image_size=16,
                         mean=(0.5,) * 3, std=(0.5,) * 3, tokenizer_name=None, seq_len=4, batch_size=2,
                         rank=0, world_size=1)
    assert [k for batch in loader for k in batch["key"]] == ["fine"] and sum(loader.skipped().values()) == 1
