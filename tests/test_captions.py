"""Captions reach the model whole, or the user is told: truncation counted from the shards, the comparison
refuses."""
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

import compare
from mgn.data.captions import count_split, read_report, report_run, token_lengths
from mgn.config import PACKAGED_MINILM, preset_config, resolve_text_model
from mgn.data.tokens import tokenize
from mgn.io.manifest import Row
from mgn.data.writer import write_shards

# "a" is one token of the MiniLM (BERT uncased) vocabulary; [CLS] and [SEP] make two more.
FITS = " ".join(["a"] * 14)  # 16 tokens: exactly seq_len 16
ONE_OVER = " ".join(["a"] * 15)  # 17 tokens: one lost
SIX_OVER = " ".join(["a"] * 20)  # 22 tokens: six lost
SHORT = "a"  # 3 tokens


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Train: the four captions above, twice; test: two that fit."""
    root = tmp_path_factory.mktemp("caption-shards")
    image = root / "frame.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    captions = [("train", c) for c in (FITS, ONE_OVER, SIX_OVER, SHORT) * 2] + [("test", FITS), ("test",
                                                                                                 SHORT)]
    rows = [Row(line=i + 1, where=f"row {i}", image=str(image), caption=caption, label="a", id=f"s{i}",
                split=split)
            for i, (split, caption) in enumerate(captions)]
    write_shards(rows, root / "shards", labels=["a", "b"], source="test", max_samples=2)
    return root / "shards"


def test_lengths_are_the_tokenizers_own_with_its_special_tokens_and_agree_with_the_loaders_cut():
    name = resolve_text_model(PACKAGED_MINILM)
    assert token_lengths(name, [FITS, ONE_OVER, SIX_OVER, SHORT]) == [16, 17, 22, 3]
    ids, mask = tokenize(name, 16, [FITS, ONE_OVER])  # what training feeds the text encoder
    assert mask.sum(1).tolist() == [16, 16]
    sep = ids[0, 15]
    # the cut caption ends in [SEP] too: one "a" lost
    assert ids[1, 15] == sep and ids[1].tolist().count(sep) == 1


def test_cut_captions_and_lost_tokens_are_counted_per_split_from_the_shards(shards):
    name = resolve_text_model(PACKAGED_MINILM)
    train = count_split(str(shards / "train-*.tar"), name, 16)
    assert {k: train[k] for k in ("captions", "truncated", "share", "tokens_lost", "max_tokens_lost",
                                  "longest_tokens", "seq_len_to_fit", "sampled")} == {
        "captions": 8, "truncated": 4, "share": 0.5, "tokens_lost": 14, "max_tokens_lost": 6,
        "longest_tokens": 22,
        "seq_len_to_fit": 25, "sampled": False}
    # the writer stored the ids of its default tokenizer, the run's: used where they fit seq_len 16 (FITS,
    # SHORT)
    assert (train["token_ids_used"], train["token_ids_wrong"]) == (4, 0)
    assert count_split(str(shards / "train-*.tar"), name, 25)["truncated"] == 0
    assert count_split(str(shards / "test-*.tar"), name, 16)["truncated"] == 0  # the one that exactly fits
    sample = count_split(str(shards / "train-*.tar"), name, 16, max_captions=3)
    assert (sample["captions"], sample["sampled"], sample["samples"], sample["shards_read"]) == (3, True, 8,
                                                                                                 2)
    assert sample == count_split(str(shards / "train-*.tar"), name, 16, max_captions=3)  # the same sample


class Recorder:
    def __init__(self):
        self.texts, self.points = {}, {}

    def text(self, tag, text):
        self.texts[tag] = text

    def scalars(self, values, step):
        self.points.update(values)


def test_a_run_logs_warns_and_records_its_counts_for_the_summary(shards, tmp_path, caplog):
    cfg = preset_config("tiny", {"data": {"train_shards": str(shards / "train-*.tar"),
                                          "test_shards": str(shards / "test-*.tar")},
                                 "train": {"output_dir": str(tmp_path), "run_name": "r"}})
    cfg.run_dir.mkdir()
    board = Recorder()
    with caplog.at_level(logging.INFO, logger="mgn"):
        counts = report_run(cfg, board)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("MGN: captions: train 4 of 8 cut at seq_len 16 (50.0%; 14 tokens lost, at "
                               "most 6 of "
                               "one; longest 22 tokens; the shards' stored token ids used for 4); test 0 of "
                               "2 cut at "
                               "seq_len 16")
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING).getMessage()
    assert ("50.0% of the train captions" in warning and "22 tokens" in warning
            and "model.seq_len 25" in warning)
    assert (read_report(cfg.paths.captions) == counts
            == json.loads((cfg.run_dir / "captions.json").read_text()))
    assert board.points["captions/train_truncated_share"] == 0.5 and "train 4 of 8" in board.texts["captions"]
    image_only = preset_config("tiny", {"objective": {"name": "baseline"}})
    assert report_run(image_only, board) is None  # reads no captions: nothing to count


def test_the_comparison_refuses_guided_arms_on_cut_captions_unless_allowed(shards, tmp_path, capsys):
    argv = ["--train-shards", str(shards / "train-*.tar"), "--test-shards", str(shards / "test-*.tar"),
            "--pretrained", "none", "--seeds", "1", "--preset", "tiny", "--train.eval_every", "-1",
            "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), "--dry-run"]
    assert compare.main([*argv, "--arms", "baseline,guided"]) == 2
    error = capsys.readouterr().err
    assert "guided arms would train on cut captions" in error and "yours/scratch: 50.0% of the train" in error
    assert "--allow-truncated-captions" in error
    assert compare.main([*argv, "--arms", "baseline,guided", "--allow-truncated-captions"]) == 0
    assert "MGN compare: WARNING (--allow-truncated-captions): yours/scratch" in capsys.readouterr().out
    assert compare.main([*argv, "--arms", "baseline,guided", "--model.seq_len", "25"]) == 0  # whole: accepted
    # 6 of the 8: the comparison carves its validation split (one 2-sample shard) from a user's training
    # shards
    assert "yours/scratch: train 0 of 6 cut at seq_len 25" in capsys.readouterr().out
    assert compare.main([*argv, "--arms", "baseline"]) == 0  # image-only arms read no captions
    assert not (tmp_path / "work").exists()  # a dry run trains and writes nothing
