"""Token ids stored by the shard writer (mgn/tokens.py): the loader pads them instead of tokenizing, and the
batches are exactly what tokenizing gives, wherever the ids are read, ignored or absent."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mgn import shards, tokens
from mgn.config import PACKAGED_MINILM, DataConfig
from mgn.data import train_loader
from mgn.decode import Decoder
from mgn.tokens import load_tokenizer, tokenize
from mgn.tar import tar_samples

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """The same synthetic samples written twice: with the default tokenizer's ids, and with none."""
    root = tmp_path_factory.mktemp("token-ids")
    for name, tokenizer in (("with", PACKAGED_MINILM), ("without", None)):
        shards.write_synthetic(root / name, samples=96, image_size=32, seed=3, max_samples=48, test_fraction=0.0,
                               tokenizer=tokenizer)
    return root


def _tokens(folder, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    spec = str(folder / "train-*.tar")
    cfg = DataConfig(train_shards=spec, test_shards=spec, num_workers=0)
    loader = train_loader(cfg, image_size=32, mean=MEAN, std=STD, tokenizer_name=PACKAGED_MINILM, seq_len=seq_len,
                          batch_size=16, rank=0, world_size=1, seed=0, epoch=0)
    batches = [b for b in loader if "input_ids" in b]
    return (np.concatenate([b["input_ids"].numpy() for b in batches]),
            np.concatenate([b["attention_mask"].numpy() for b in batches]))


@pytest.mark.parametrize("seq_len", [36, 29, 16])  # every caption fits; some do (a mixed batch); none does
def test_batches_from_stored_ids_equal_tokenized_ones(two_sets, seq_len):
    stored, tokenized = _tokens(two_sets / "with", seq_len), _tokens(two_sets / "without", seq_len)
    assert len(stored[0]) == 96
    np.testing.assert_array_equal(stored[0], tokenized[0])
    np.testing.assert_array_equal(stored[1], tokenized[1])
    if seq_len == 29:  # the synthetic captions have 25-33 tokens: both kinds in one epoch
        lengths = tokenized[1].sum(1)
        assert (lengths < 29).any() and (lengths == 29).any()


def _sample(caption: str, **fields) -> dict:
    image = shards.synthetic.render(shards.synthetic.SyntheticSpec(samples=1, image_size=32), (0, "train")).jpeg
    return {"__key__": "k", "__url__": "u", "__index__": 0, "jpg": image, "txt": caption.encode(), "cls": b"1",
            **fields}


def _decoder(seq_len: int = 16, **kwargs) -> Decoder:
    return Decoder(32, MEAN, STD, PACKAGED_MINILM, seq_len, train=False, **kwargs)


def test_the_loader_reads_the_stored_ids_rather_than_the_caption():
    decoder = _decoder()
    # ids that are not this caption's: only reading the field can produce them
    item = decoder.decode(_sample("a caption", **{decoder.ids_field: np.array([101, 7, 8, 102], "<u4").tobytes()}))
    assert item[4]["ids"].tolist() == [101, 7, 8, 102]
    batch = decoder.collate([item, decoder.decode(_sample("a caption"))], {}, (0, 0))
    assert batch["input_ids"][0].tolist() == [101, 7, 8, 102] + [load_tokenizer(PACKAGED_MINILM).pad_token_id] * 12
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 12
    expected = tokenize(PACKAGED_MINILM, 16, ["a caption"])  # the second sample has no field: tokenized
    assert batch["input_ids"][1].tolist() == expected[0][0].tolist()
    assert batch["attention_mask"][1].tolist() == expected[1][0].tolist()


def test_ids_that_cannot_stand_for_the_caption_are_not_read():
    decoder = _decoder(seq_len=16, max_caption_bytes=12)
    field, vocab = decoder.ids_field, len(load_tokenizer(PACKAGED_MINILM))
    good = np.array([101, 7, 102], "<u4").tobytes()
    assert decoder.decode(_sample("short", **{field: good}))[4]["ids"] is not None
    for caption, fields in (
            ("short", {"ids.0123456789abcdef": good}),  # another tokenizer's fingerprint
            ("short", {field: np.arange(17, dtype="<u4").tobytes()}),  # longer than seq_len: needs cutting
            ("short", {field: good[:-1]}),  # not whole uint32 values
            ("short", {field: b""}),
            ("short", {field: np.array([101, vocab, 102], "<u4").tobytes()}),  # outside the vocabulary
            ("a caption over twelve bytes", {field: good})):  # cut by data.max_caption_bytes: not what was tokenized
        item = decoder.decode(_sample(caption, **fields))
        assert item[4].get("ids") is None, (caption, fields)
        batch = decoder.collate([item], {}, (0, 0))
        assert batch["input_ids"].tolist() == tokenize(PACKAGED_MINILM, 16, [item[2]])[0].tolist()


def test_the_fingerprint_covers_what_decides_the_ids_and_not_truncation_or_padding(tmp_path):
    load_tokenizer(PACKAGED_MINILM).save_pretrained(tmp_path / "same")
    spec = json.loads((tmp_path / "same" / "tokenizer.json").read_text())
    spec["truncation"], spec["padding"] = None, None
    (tmp_path / "same" / "tokenizer.json").write_text(json.dumps(spec))
    assert tokens.field_name(str(tmp_path / "same")) == tokens.field_name(PACKAGED_MINILM)

    vocab = spec["model"]["vocab"]
    vocab["violent"], vocab["peaceful"] = vocab["peaceful"], vocab["violent"]  # two words' ids swapped
    (tmp_path / "other").mkdir()
    for path in (tmp_path / "same").iterdir():
        (tmp_path / "other" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(spec))
    assert tokens.field_name(str(tmp_path / "other")) != tokens.field_name(PACKAGED_MINILM)


def test_the_writer_stores_no_ids_when_told_and_refuses_a_tokenizer_it_cannot_load(tmp_path, capsys):
    argv = ["--synthetic", "--samples", "20", "--image-size", "32", "--workers", "1"]
    assert shards.main([*argv, "--out", str(tmp_path / "none"), "--tokenizer", "none"]) == 0
    card = json.loads((tmp_path / "none" / "dataset_card.json").read_text())
    assert card["token_ids"] == {"tokenizer": None, "field": None}
    with open(tmp_path / "none" / "train-000000.tar", "rb") as f:
        fields = {name for sample in tar_samples(f) for name in sample}
    assert not any(name.startswith(tokens.FIELD_PREFIX) for name in fields)

    assert shards.main([*argv, "--out", str(tmp_path / "bad"), "--tokenizer", str(tmp_path / "no-such")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m mgn.shards: error: --tokenizer {tmp_path / 'no-such'}: ")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # nothing written


def test_padding_matches_the_tokenizers_own_padding():
    captions = ["violent scene in the upper left", "calm", "a much longer caption about a peaceful stream frame"]
    stored = [np.frombuffer(raw, "<u4") for raw in tokens.encode(PACKAGED_MINILM, captions)]
    padded = tokens.pad(stored, 24, load_tokenizer(PACKAGED_MINILM).pad_token_id)
    expected = tokenize(PACKAGED_MINILM, 24, captions)
    np.testing.assert_array_equal(padded[0], expected[0])
    np.testing.assert_array_equal(padded[1], expected[1])
