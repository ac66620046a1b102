"""Precomputed caption blocks (mgn/train/text_blocks.py): what is stored, what the loader hands over, when it
is redone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from mgn.data import block_files
from mgn.train import text_blocks
from mgn.config import preset_config
from mgn.data.loader import build_loader
from mgn.data.tokens import tokenize
from mgn.model.objectives import build_objective
from mgn.io.sources import open_shard
from mgn.data.writer import write_synthetic
from mgn.io.tar import tar_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic(out, samples=96, image_size=64, seed=0, max_samples=32)
    return out


def config(shards: Path, blocks: Path, text_model: str, **model):
    return preset_config("tiny", {"data": {"train_shards": str(shards / "train-*.tar"),
                                           "test_shards": str(shards / "test-*.tar"), "num_workers": 0,
                                           "text_blocks": str(blocks)},
                                  "model": {"text_model": text_model, **model}})


def captions_of(shard: str) -> tuple[list[str], list[str]]:
    with open_shard(shard) as f:
        samples = list(tar_samples(f))
    return [s["__key__"] for s in samples], [s["txt"].decode() for s in samples]


def test_blocks_are_the_frozen_encoders_pooled_output_in_tar_order_and_reach_the_guided_path(shards, tmp_path,
                                                                                             bert32):
    cfg = config(shards, tmp_path / "blocks", bert32)
    objective = build_objective(cfg).eval()
    text_blocks.ensure(cfg, objective.guide.text, torch.device("cpu"))
    shard = sorted(str(p) for p in shards.glob("train-*.tar"))[0]
    keys, captions = captions_of(shard)
    with safe_open(str(block_files.sidecar(cfg.data.text_blocks, shard)), "pt") as f:
        assert json.loads(f.metadata()["keys"]) == keys
        stored = f.get_tensor("blocks")
    # hidden 32, 64 px -> 2x2 grid
    assert stored.dtype == torch.bfloat16 and stored.shape == (len(keys), 32, 2, 2)
    ids, mask = (torch.from_numpy(a) for a in tokenize(bert32, cfg.model.seq_len, captions))
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(objective.guide.text(ids, mask), (2, 2))
        assert torch.allclose(stored.float(), pooled, atol=2e-2, rtol=1e-2)  # bf16
        # the guided path reads a stored block as it reads the tokens it came from
        embedding = objective.student.encoder(torch.randn(len(keys), 3, 64, 64))
        from_tokens = objective.guided(embedding, ids, mask).logits
        from_blocks = objective.guided(embedding, text_block=stored).logits
    assert torch.allclose(from_tokens, from_blocks, atol=5e-2), (from_tokens - from_blocks).abs().max()
    # The training loader carries the blocks of its samples instead of tokens (no tokenizer, no text encoder).
    batch = next(iter(build_loader(cfg, "train")))
    assert "input_ids" not in batch and batch["text_block"].shape == (cfg.train.micro_batch, 32, 2, 2)
    everything = {}
    for path in sorted(shards.glob("train-*.tar")):
        with safe_open(str(block_files.sidecar(cfg.data.text_blocks, str(path))), "pt") as f:
            everything |= dict(zip(json.loads(f.metadata()["keys"]), f.get_tensor("blocks")))
    for key, block in zip(batch["key"], batch["text_block"]):
        assert torch.equal(block, everything[key]), key
    # Evaluation still tokenizes: the teacher's accuracy reads the captions themselves.
    assert "input_ids" in next(iter(build_loader(cfg, "test")))


def test_caption_dropout_empties_a_block_as_it_empties_a_caption(bert32):
    cfg = preset_config("tiny", {"model": {"text_model": bert32}, "objective": {"caption_dropout": 1.0}})
    objective = build_objective(cfg)
    ids, mask = torch.randint(5, 50, (4, 16)), torch.ones(4, 16, dtype=torch.long)
    embedding = torch.randn(4, objective.student.num_features, 2, 2)
    objective.eval()  # BatchNorm on running statistics: both calls see the same fusion
    with torch.no_grad():
        empty = objective.guided(embedding, ids, torch.zeros_like(mask)).logits
        objective.training = True  # the dropout itself (the module's own flag, BatchNorm stays in eval)
        dropped_tokens = objective.guided(embedding, ids, mask).logits
        dropped_block = objective.guided(embedding, text_block=torch.ones(4, 32, 2, 2)).logits
    assert torch.equal(dropped_tokens, empty) and torch.equal(dropped_block, empty)


def test_only_stale_files_are_computed_again_and_blocks_of_another_shard_version_stop_the_run(shards,
                                                                                              tmp_path,
                                                                                                bert32):
    cfg = config(shards, tmp_path / "blocks", bert32)
    encoder = build_objective(cfg).guide.text
    text_blocks.ensure(cfg, encoder, torch.device("cpu"))
    files = sorted((tmp_path / "blocks").glob("*" + block_files.SUFFIX))
    assert len(files) == len(list(shards.glob("train-*.tar")))
    written = {f: f.stat().st_mtime_ns for f in files}
    files[0].write_bytes(b"cut short")  # a damaged file counts as missing
    text_blocks.ensure(cfg, encoder, torch.device("cpu"))
    assert [f.stat().st_mtime_ns == written[f] for f in files] == [False] + [True] * (len(files) - 1)
    longer = config(shards, tmp_path / "blocks", bert32, seq_len=25)  # another shape: every file is stale
    text_blocks.ensure(longer, build_objective(longer).guide.text, torch.device("cpu"))
    assert all(f.stat().st_mtime_ns != written[f] for f in files[1:])
    shard = str(sorted(shards.glob("train-*.tar"))[0])
    with pytest.raises(block_files.TextBlockError, match=f"{files[0].name}.*another version"):
        block_files.TextBlockReader(str(tmp_path / "blocks")).batch([(shard, 0, "a-key-the-shard-never-had")])


def test_a_trained_text_encoder_cannot_use_precomputed_blocks():
    with pytest.raises(ValueError, match="data.text_blocks.*freeze_text"):
        preset_config("tiny", {"data": {"text_blocks": "blocks"}, "model": {"freeze_text": False}})


@pytest.mark.slow
def test_train_py_computes_the_blocks_once_then_trains_on_them(shards, tmp_path, bert32):
    args = [sys.executable, "train.py", "--preset", "tiny", "--data.train_shards",
            str(shards / "train-*.tar"),
            "--data.test_shards", str(shards / "test-*.tar"), "--data.synthetic_samples", "0",
            "--model.text_model", bert32, "--data.text_blocks", str(tmp_path / "blocks"),
            "--train.output_dir", str(tmp_path / "runs")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.run([*args, "--train.run_name", "a"], cwd=ROOT, env=env, capture_output=True,
                           text=True,
                           timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "text blocks: computing 3 of 3 shards" in first.stdout and "MGN: done step=" in first.stdout
    second = subprocess.run([*args, "--train.run_name", "b"], cwd=ROOT, env=env, capture_output=True,
                            text=True,
                            timeout=400)
    assert second.returncode == 0 and "text blocks: computing" not in second.stdout
    assert "MGN: done step=" in second.stdout


ENSURE_ON_EACH_RANK = """
import sys, torch
from mgn import distributed
from mgn.train import text_blocks
from mgn.config import preset_config
from mgn.model.objectives import build_objective
shards, blocks, text_model = sys.argv[1:]
world = distributed.detect_world()
distributed.init_distributed(world, 60, "cpu")
cfg = preset_config("tiny", {"data": {"train_shards": shards + "/train-*.tar", "text_blocks": blocks},
                             "model": {"text_model": text_model}})
written = []
original = text_blocks.write_blocks
text_blocks.write_blocks = lambda cfg, encoder, shard, *rest: \
written.append(shard) or original(cfg, encoder, shard,
                                                                                                  *rest)
text_blocks.ensure(cfg, build_objective(cfg).guide.text, torch.device("cpu"))
print(f"rank {world.rank} wrote {len(written)}")
distributed.shutdown()
"""


@pytest.mark.slow
def test_two_ranks_split_the_shards_and_each_is_computed_once(shards, tmp_path, bert32):
    script = tmp_path / "ensure.py"
    script.write_text(ENSURE_ON_EACH_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2",
                           str(script), str(shards), str(tmp_path / "blocks"), bert32], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank 0 wrote 2" in done.stdout and "rank 1 wrote 1" in done.stdout  # 3 shards, split 2 + 1
    assert len(list((tmp_path / "blocks").glob("*" + block_files.SUFFIX))) == 3


def test_flipped_bytes_or_an_edited_header_are_caught_and_computed_again_with_a_line(shards, tmp_path, bert32,
                                                                                      monkeypatch):
    # 4 KB of flipped data bytes passed the fingerprint check and fed the fusion values up to 2.5e33.
    cfg = config(shards, tmp_path / "blocks", bert32)
    encoder = build_objective(cfg).guide.text
    text_blocks.ensure(cfg, encoder, torch.device("cpu"))
    files = sorted((tmp_path / "blocks").glob("*" + block_files.SUFFIX))
    assert all(block_files.verify(f) is None for f in files)
    good = files[0].read_bytes()
    good_rows = block_files.map_blocks(files[0])[0].copy()
    flipped = bytearray(good)
    for i in range(len(good) - 4096, len(good)):
        flipped[i] ^= 0xFF
    files[0].write_bytes(bytes(flipped))
    renamed = files[1].read_bytes().replace(b'"blocks"', b'"blockz"', 1)  # a header key edited
    files[1].write_bytes(renamed)
    assert "damaged" in block_files.verify(files[0]) and "cannot be read" in block_files.verify(files[1])
    said = []
    monkeypatch.setattr(text_blocks.log, "warning", lambda fmt, *args: said.append(fmt % args))
    text_blocks.ensure(cfg, encoder, torch.device("cpu"))
    lines = [line for line in said if "computing it again" in line]
    assert len(lines) == 2 and str(files[0]) in lines[0] and str(files[1]) in lines[1]
    assert (block_files.map_blocks(files[0])[0] == good_rows).all()
    assert all(block_files.verify(f) is None for f in files)


def test_a_folder_the_run_cannot_write_or_a_file_is_one_line_naming_the_flag(shards, tmp_path, bert32,
                                                                             monkeypatch):
    from mgn.train.inputs import check_training_inputs

    a_file = tmp_path / "blocks.txt"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match=r"data.text_blocks='.*blocks.txt': a file, not a folder"):
        check_training_inputs(config(shards, a_file, bert32))
    locked = tmp_path / "locked"
    locked.mkdir()
    # a read-only folder, as a user sees it (these tests may run as root, whom modes let by)
    real_access = os.access
    monkeypatch.setattr("mgn.train.inputs.os.access", lambda path,
                        mode: Path(path) != locked and real_access(path, mode))
    with pytest.raises(ValueError, match=r"data.text_blocks='.*locked': a folder this run cannot write"):
        check_training_inputs(config(shards, locked, bert32))


def test_train_py_given_a_file_for_the_blocks_folder_stops_with_one_line_before_its_run_folder(shards,
                                                                                              tmp_path):
    a_file = tmp_path / "blocks.txt"
    a_file.write_text("not a folder")
    done = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--data.train_shards",
                           str(shards / "train-*.tar"), "--data.test_shards", str(shards / "test-*.tar"),
                           "--data.synthetic_samples", "0", "--data.text_blocks", str(a_file),
                           "--train.output_dir", str(tmp_path / "runs")], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith(f"train.py: error: data.text_blocks='{a_file}': a file, not a folder")
    assert not (tmp_path / "runs").exists() and a_file.read_text() == "not a folder"


def test_blocks_that_cannot_be_written_stop_the_run_with_the_flag_named(shards, tmp_path, bert32,
                                                                        monkeypatch):
    cfg = config(shards, tmp_path / "blocks", bert32)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(block_files, "save_file", full)
    with pytest.raises(block_files.TextBlockError, match=r"data.text_blocks='.*blocks': cannot write .*No "
                                                         r"space"):
        text_blocks.ensure(cfg, build_objective(cfg).guide.text, torch.device("cpu"))
    assert not list((tmp_path / "blocks").glob(".*partial"))
