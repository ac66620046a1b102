"""Token ids stored by the shard writer (mgn/data/tokens.py): the loader pads them instead of tokenizing, and
the batches are exactly what tokenizing gives, wherever the ids are read, ignored or absent."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from mgn import shards
from mgn.data import writer
from mgn.io import synthetic
from mgn.data import tokens
from mgn.data.captions import token_lengths
from mgn.config import PACKAGED_MINILM, DataConfig
from mgn.data.loader import train_loader
from mgn.data.decode import Decoder
from mgn.data.tokens import load_tokenizer, tokenize
from mgn.io.tar import tar_samples

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """The same synthetic samples written twice: with the default tokenizer's ids, and with none."""
    root = tmp_path_factory.mktemp("token-ids")
    for name, tokenizer in (("with", PACKAGED_MINILM), ("without", None)):
        writer.write_synthetic(root / name, samples=96, image_size=32, seed=3, max_samples=48,
                               test_fraction=0.0,
                               tokenizer=tokenizer)
    return root


def _tokens(folder, seq_len: int, monkeypatch) -> tuple[np.ndarray, np.ndarray, int]:
    """The loader's input_ids and attention_mask over one epoch, and how many captions it tokenized itself."""
    tokenized, tokenize_all = [], tokens.tokenize
    monkeypatch.setattr(tokens, "tokenize", lambda name, n, captions: tokenized.append(len(captions))
                        or tokenize_all(name, n, captions))
    spec = str(folder / "train-*.tar")
    cfg = DataConfig(train_shards=spec, test_shards=spec, num_workers=0)
    loader = train_loader(cfg, image_size=32, mean=MEAN, std=STD, tokenizer_name=PACKAGED_MINILM,
                          seq_len=seq_len,
                          batch_size=16, rank=0, world_size=1, seed=0, epoch=0)
    batches = [b for b in loader if "input_ids" in b]
    return (np.concatenate([b["input_ids"].numpy() for b in batches]),
            np.concatenate([b["attention_mask"].numpy() for b in batches]), sum(tokenized))


@pytest.mark.parametrize("seq_len", [36, 29, 16])  # every caption fits; some do (a mixed batch); none does
def test_batches_from_stored_ids_equal_tokenized_ones(two_sets, seq_len, monkeypatch):
    stored, tokenized = _tokens(two_sets / "with", seq_len, monkeypatch), _tokens(two_sets / "without",
                                                                                  seq_len,
                                                                                  monkeypatch)
    assert len(stored[0]) == 96
    np.testing.assert_array_equal(stored[0], tokenized[0])
    np.testing.assert_array_equal(stored[1], tokenized[1])
    assert tokenized[2] == 96  # without ids the workers tokenize every caption
    lengths = token_lengths(PACKAGED_MINILM, _captions(two_sets / "with"))
    must_cut = sum(n > seq_len for n in lengths)
    assert stored[2] == must_cut  # with ids: only the captions that must be cut are tokenized
    # the three cases named above
    assert {36: must_cut == 0, 29: 0 < must_cut < 96, 16: must_cut == 96}[seq_len]


def _captions(folder) -> list[str]:
    captions = []
    for shard in sorted(folder.glob("train-*.tar")):
        with open(shard, "rb") as f:
            captions += [s["txt"].decode() for s in tar_samples(f)]
    return captions


def _sample(caption: str, index: int = 10, **fields) -> dict:
    """A sample the loader does not spot-check (tokens.spot_checked) unless `index` < 3: its ids are read as
    stored."""
    image = synthetic.render(synthetic.SyntheticSpec(samples=1, image_size=32), (0, "train")).jpeg
    return {"__key__": "k", "__url__": "u", "__index__": index, "jpg": image, "txt": caption.encode(),
            "cls": b"1",
            **fields}


def _decoder(seq_len: int = 16, **kwargs) -> Decoder:
    return Decoder(32, MEAN, STD, PACKAGED_MINILM, seq_len, train=False, **kwargs)


def _field(caption: str, ids) -> bytes:
    """A stored field as the writer lays it out (the caption's CRC-32, then its ids), here with any ids."""
    return np.array([zlib.crc32(caption.encode()), *ids], "<u4").tobytes()


def test_the_loader_reads_the_stored_ids_rather_than_the_caption():
    decoder = _decoder()
    # ids that are not this caption's: only reading the field can produce them
    item = decoder.decode(_sample("a caption", **{decoder.ids_field: _field("a caption", [101, 7, 8, 102])}))
    assert item[4]["ids"].tolist() == [101, 7, 8, 102]
    batch = decoder.collate([item, decoder.decode(_sample("a caption"))], {}, (0, 0))
    assert batch["input_ids"][0].tolist() == [101, 7, 8,
                                              102] + [load_tokenizer(PACKAGED_MINILM).pad_token_id] * 12
    assert batch["attention_mask"][0].tolist() == [1] * 4 + [0] * 12
    expected = tokenize(PACKAGED_MINILM, 16, ["a caption"])  # the second sample has no field: tokenized
    assert batch["input_ids"][1].tolist() == expected[0][0].tolist()
    assert batch["attention_mask"][1].tolist() == expected[1][0].tolist()


def test_ids_that_cannot_stand_for_the_caption_are_not_read():
    decoder = _decoder(seq_len=16, max_caption_bytes=12)
    field, bound = decoder.ids_field, tokens.id_bound(PACKAGED_MINILM)
    good = _field("short", [101, 7, 102])
    assert decoder.decode(_sample("short", **{field: good}))[4]["ids"].tolist() == [101, 7, 102]
    long_caption = "a caption over twelve bytes"
    assert decoder.decode(_sample(long_caption[:12], **{field: _field(long_caption[:12], [101, 7,
                                                                                          102])}))[4]["ids"] \
        is not None  # exactly at the byte cap: whole
    for caption, fields in (
            ("short", {"ids.0123456789abcdef": good}),  # another tokenizer's fingerprint
            ("short", {field: _field("shorts", [101, 7, 102])}),  # made from another caption (txt rewritten)
            # 17 ids, longer than seq_len 16: needs cutting
            ("short", {field: _field("short", range(1, 18))}),
            ("short", {field: good[:-1]}),  # not whole uint32 values
            ("short", {field: b""}),
            ("short", {field: good[:4]}),  # the checksum alone, no ids
            ("short", {field: _field("short", [101, bound, 102])}),  # not an id of this tokenizer
            (long_caption, {field: _field(long_caption, [101, 7, 102])})):  # cut by data.max_caption_bytes
        item = decoder.decode(_sample(caption, **fields))
        assert item[4].get("ids") is None, (caption, fields)
        batch = decoder.collate([item], {}, (0, 0))
        assert batch["input_ids"].tolist() == tokenize(PACKAGED_MINILM, 16, [item[2]])[0].tolist()


def test_captions_longer_than_the_tokenizer_files_own_cut_are_stored_whole():
    """The packaged tokenizer.json truncates at 128 tokens; stored ids must not: at seq_len 256 they are
    read."""
    caption = " ".join(["violent scene in the upper left quadrant"] * 30)  # ~210 tokens
    decoder = _decoder(seq_len=256)
    stored = tokens.encode(PACKAGED_MINILM, [caption])[0]
    assert len(stored) // 4 - 1 > 128
    item = decoder.decode(_sample(caption, **{decoder.ids_field: stored}))
    assert item[4]["ids"] is not None
    batch = decoder.collate([item], {}, (0, 0))
    expected = tokenize(PACKAGED_MINILM, 256, [caption])
    np.testing.assert_array_equal(batch["input_ids"], expected[0])
    np.testing.assert_array_equal(batch["attention_mask"], expected[1])


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
    assert len(err) == 1 and err[0].startswith("python -m mgn.shards: error: --tokenizer "
                                               f"{tmp_path / 'no-such'}: ")
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())  # nothing written


def test_padding_matches_the_tokenizers_own_padding():
    captions = ["violent scene in the upper left", "calm", "a much longer caption about a peaceful stream "
                                                           "frame"]
    stored = [np.frombuffer(raw, "<u4")[1:] for raw in tokens.encode(PACKAGED_MINILM, captions)]
    padded = tokens.pad(stored, 24, load_tokenizer(PACKAGED_MINILM).pad_token_id)
    expected = tokenize(PACKAGED_MINILM, 24, captions)
    np.testing.assert_array_equal(padded[0], expected[0])
    np.testing.assert_array_equal(padded[1], expected[1])


def test_stored_ids_that_are_not_the_captions_tokens_stop_the_loader_naming_the_shard():
    # The CRC covers the caption, not the ids: in-vocabulary ids of another text passed every check and the
    # model read "violent" x 20 under a caption about sports. Spot-checked samples (every shard's first three,
    # one in a hundred of the rest) are tokenized and compared.
    decoder = _decoder()
    lying = {decoder.ids_field: _field("a caption", [101, 6355, 6355, 102])}
    assert tokens.spot_checked("k", 0) and tokens.spot_checked("k", 2) and not tokens.spot_checked("k", 10)
    with pytest.raises(tokens.StoredIdsError, match=r"u: sample k's stored token ids .* are not its "
                                                    r"caption's "
                                                    r"tokens .*--tokenizer"):
        decoder.decode(_sample("a caption", index=0, **lying))
    truthful = {decoder.ids_field: tokens.encode(PACKAGED_MINILM, ["a caption"])[0]}
    assert decoder.decode(_sample("a caption", index=0, **truthful))[4]["ids"] is not None
    assert sum(tokens.spot_checked(f"key-{i}", 10 + i) for i in range(10_000)) in range(60, 140)  # about 1%
