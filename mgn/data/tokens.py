"""Captions -> token ids of a fixed length: the tokenizer (loaded once per process), and the ids the shard
writer stores so that loader workers only pad them.

    input_ids, attention_mask = tokenize(name, seq_len, captions)   # int64 [n, seq_len], padded and cut

    field = field_name(tokenizer)                 # "ids.<16 hex digits>", or None (no fast tokenizer)
    sample[field] = encode(tokenizer, [caption])[0]                   # the shard writer
    ids = stored_ids(sample.get(field), sample["txt"], max_caption_bytes=..., seq_len=..., id_bound=...)
    input_ids, attention_mask = pad([ids, ...], seq_len, pad_id)      # a loader worker
    # (rows that are None: tokenize them)

Tokenizing captions is, after the JPEG decode, the biggest cost a loader worker has (figures:
benchmarks/results/README.md, "Loader throughput"). So the shard writer (`python -m mgn.shards --tokenizer
NAME`, on by default) stores each caption's whole token ids, with the tokenizer's own special tokens, in a
field named after the tokenizer's fingerprint, behind a checksum of the caption they were made from:

    <key>.ids.<fingerprint>   little-endian uint32: crc32(txt bytes), then the ids ([CLS] ... [SEP])

The loader (mgn/data/decode.py) reads them only where that gives exactly what tokenizing the caption gives:
- the field carries the run's tokenizer's fingerprint (a hash of everything that decides the ids: vocabulary,
  added tokens, normaliser, pre-tokeniser, special-token template; not its truncation or padding settings), so
  ids of another vocabulary are never read;
- the checksum matches the sample's `txt`: a tool that rewrote the caption but copied the other members leaves
  ids that are not read;
- the caption was not cut by the run's `data.max_caption_bytes`, and its ids fit in `model.seq_len` (cutting
  them would need the tokenizer's own truncation rule: [SEP] stays last);
- the field is well formed (whole uint32 values, each a valid id): the caption is the truth, the ids only a
  cache of it, so damaged ids are tokenized again rather than counted as a bad sample.
Otherwise, or without the field (shards written by other tools, or with `--tokenizer none`), the worker
tokenizes the caption as before: both ways give the same arrays (tests/test_tokens.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from functools import lru_cache

import numpy as np

from mgn.config import resolve_text_model

FIELD_PREFIX = "ids."
# The parts of a `tokenizers` JSON that decide the ids of a single caption (not truncation, padding, decoder).
_DECIDING = ("added_tokens", "normalizer", "pre_tokenizer", "model", "post_processor")


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """Built lazily in each worker process; Rust threads inside forked workers only oversubscribe."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer  # slow import, only where captions are used

    return AutoTokenizer.from_pretrained(resolve_text_model(name))


@lru_cache(maxsize=4)
def _fixed_length_backend(name: str, seq_len: int):
    """The tokenizer's own Rust `tokenizers` object, set to truncate and pad to `seq_len`.

    transformers' Python wrapper around it costs several times the tokenization itself on short
    captions, a large share of a loader worker's time. A copy, so the
    wrapper's own settings are untouched. None for tokenizers without a Rust backend.
    """
    fixed = _backend_copy(name)
    if fixed is None:
        return None
    wrapper = load_tokenizer(name)
    fixed.enable_truncation(max_length=seq_len)
    fixed.enable_padding(length=seq_len, pad_id=wrapper.pad_token_id, pad_token=wrapper.pad_token)
    return fixed


def _backend_copy(name: str):
    """A copy of the tokenizer's Rust `tokenizers` object (None without one), free to take other settings."""
    backend = getattr(load_tokenizer(name), "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer  # installed with transformers

    return Tokenizer.from_str(backend.to_str())


def tokenize(name: str, seq_len: int, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(captions), seq_len]: what the wrapper gives with
    padding="max_length", truncation=True (tests/test_data.py checks they agree). Each caption is cut to fit,
    keeping its closing special token ([SEP])."""
    backend = _fixed_length_backend(name, seq_len)
    if backend is None:
        encoded = load_tokenizer(name)(captions, padding="max_length", truncation=True, max_length=seq_len,
                                       return_tensors="np")
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
    encodings = backend.encode_batch_fast(captions)  # no character offsets: we never use them
    return (np.array([e.ids for e in encodings], dtype=np.int64),
            np.array([e.attention_mask for e in encodings], dtype=np.int64))


def preload_tokenizer(tokenizer_name: str | None, seq_len: int) -> None:
    """Load (never run) the tokenizer here: a bad name fails now, and forked workers inherit it
    instead of loading it again every epoch. Spawned workers still load it lazily."""
    if tokenizer_name is not None:
        _fixed_length_backend(tokenizer_name, seq_len)


@lru_cache(maxsize=4)
def whole_tokenizer(name: str):
    """The tokenizer's Rust `tokenizers` object, copied, with no truncation and no padding (the tokenizer file
    may set its own): whole captions with their special tokens. None for tokenizers without a Rust backend."""
    whole = _backend_copy(name)
    if whole is not None:
        whole.no_truncation()
        whole.no_padding()
    return whole


@lru_cache(maxsize=4)
def field_name(name: str) -> str | None:
    """`ids.<fingerprint>`: the shard field holding this tokenizer's ids; None when it has no fast
    tokenizer."""
    whole = whole_tokenizer(name)
    if whole is None:
        return None
    spec = json.loads(whole.to_str())
    deciding = json.dumps({k: spec.get(k) for k in _DECIDING}, sort_keys=True, separators=(",", ":"))
    return FIELD_PREFIX + hashlib.sha256(deciding.encode()).hexdigest()[:16]


def encode(name: str, captions: list[str]) -> list[bytes]:
    """What a shard stores for each caption: little-endian uint32, the CRC-32 of its UTF-8 bytes (the `txt`
    member), then its whole ids, special tokens included."""
    encodings = whole_tokenizer(name).encode_batch(captions, add_special_tokens=True)
    return [np.asarray([zlib.crc32(caption.encode("utf-8")), *e.ids], dtype="<u4").tobytes()
            for caption, e in zip(captions, encodings)]


def stored_ids(raw: bytes | None, txt: bytes, *, max_caption_bytes: int, seq_len: int,
               id_bound: int) -> np.ndarray | None:
    """The ids in a sample's field (`raw`), when they can stand for tokenizing its caption (`txt`, as stored):
    None when absent, made from another caption, for a caption the loader cuts, too long for `seq_len`, or
    damaged."""
    if raw is None or len(txt) > max_caption_bytes or len(raw) % 4 or not 2 <= len(raw) // 4 <= seq_len + 1:
        return None
    stored = np.frombuffer(raw, dtype="<u4")
    if int(stored[0]) != zlib.crc32(txt):
        return None
    ids = stored[1:]
    return ids if int(ids.max()) < id_bound else None


class StoredIdsError(ValueError):
    """A shard's stored ids pass every structural check yet are not its captions' tokens (a user error: exit
    2)."""


SPOT_CHECKED_FIRST, SPOT_CHECK_ONE_IN = 3, 100


def spot_checked(key: str, index: int) -> bool:
    """Whether the loader checks this sample's stored ids against the tokenizer: the first few samples of
    every shard and one in a hundred of the rest, chosen by the key (the same samples at every read, on any
    machine)."""
    return index < SPOT_CHECKED_FIRST or zlib.crc32(key.encode("utf-8")) % SPOT_CHECK_ONE_IN == 0


def check_ids(name: str, caption: str, ids: np.ndarray, *, shard: str, key: str) -> None:
    """StoredIdsError unless `ids` are what the tokenizer makes of `caption`. The CRC the writer stores covers
    the caption, not the ids: a tool that rewrote the ids (or wrote them with another vocabulary under this
    field) would otherwise feed the model another text than the caption says, silently."""
    made = whole_tokenizer(name).encode(caption, add_special_tokens=True).ids
    if list(ids) != made:
        raise StoredIdsError(
            f"{shard}: sample {key}'s stored token ids (field {field_name(name)}) are not its caption's "
            "tokens "
            f"under {name}: the ids were changed after python -m mgn.shards wrote them; write the shards "
            "again with "
            "python -m mgn.shards ... --tokenizer <the run's model.text_model> (or --tokenizer none: no "
            "ids, "
            f"workers tokenize)")


@lru_cache(maxsize=4)
def id_bound(name: str) -> int:
    """One past the highest id the tokenizer gives (its vocabulary may have gaps: not len(tokenizer)). Cached:
    a Decoder is built every epoch, and reading a 30,000-word vocabulary takes ~10 ms."""
    return max(load_tokenizer(name).get_vocab().values()) + 1


def pad(ids: list[np.ndarray | None], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), int64 [len(ids), seq_len], padded on the right as the tokenizer pads; rows
    whose ids are None stay all padding (the caller tokenizes those captions)."""
    input_ids = np.full((len(ids), seq_len), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), seq_len), dtype=np.int64)
    for row, values in enumerate(ids):
        if values is not None:
            input_ids[row, :len(values)] = values
            mask[row, :len(values)] = 1
    return input_ids, mask
