"""Do the captions reach the model whole? Truncated captions and lost tokens, per split, counted from the
shards.

Training tokenizes every caption to exactly `model.seq_len` tokens (mgn/data/decode.py): a longer caption
loses its end without a word, and whatever it said there (the quadrant the synthetic captions' `focus` names
starts at token 21-29) never reaches the text encoder. So each run counts, before it trains, with the same
tokenizer, the same special tokens and the same byte cap as the loader:

    counts = count_split(shards, tokenizer, seq_len)   # captions, truncated, share, tokens lost, longest
    # train.py: log (a warning past WARN_SHARE), TensorBoard, <run>/captions.json (summary.json carries it)
    report_run(cfg, tensorboard)

Big shard sets are sampled: at most `max_captions` captions per split, whole shards in a fixed shuffled order
(the same shards every time), and the counts say so. The comparison runner refuses guided arms on data whose
captions are cut (mgn/compare/runner.py, `--allow-truncated-captions`).
"""
from __future__ import annotations

import json
import logging
import math
import random
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from mgn.config import Config, resolve_text_model
from mgn.io.images import cap_caption
from mgn.io.sample_fields import SampleFields
from mgn.io.shard_sets import expand_shards, read_sizes, sample_fields
from mgn.io.tar import tar_samples
from mgn.data.tokens import field_name, id_bound, load_tokenizer, stored_ids, whole_tokenizer

log = logging.getLogger("mgn")

MAX_CAPTIONS = 5000  # per split; more than this is a sample of whole shards
WARN_SHARE = 0.01  # a run warns loudly when more than this share of a split's captions is cut
def token_ids(tokenizer_name: str, captions: list[str]) -> list[list[int]]:
    """Each caption's token ids, untruncated, with the tokenizer's own special tokens (what `tokens.tokenize`
    cuts to `seq_len`: the caption fits whole when it has at most `seq_len`)."""
    whole = whole_tokenizer(tokenizer_name)
    if whole is None:
        return load_tokenizer(tokenizer_name)(captions, add_special_tokens=True, truncation=False,
                                              padding=False)["input_ids"]
    return [e.ids for e in whole.encode_batch(captions, add_special_tokens=True)]


def token_lengths(tokenizer_name: str, captions: list[str]) -> list[int]:
    """Tokens of each caption, untruncated (see token_ids)."""
    return [len(ids) for ids in token_ids(tokenizer_name, captions)]


def fitting_square(tokens: int) -> int:
    """The smallest perfect square (what model.seq_len must be) that holds `tokens`."""
    return (math.isqrt(max(tokens, 1) - 1) + 1) ** 2


def count_lengths(lengths: list[int], seq_len: int) -> dict:
    """Truncated captions and lost tokens among captions of these token lengths, cut to `seq_len`."""
    lost = [max(0, n - seq_len) for n in lengths]
    truncated = sum(1 for x in lost if x)
    longest = max(lengths, default=0)
    return {"captions": len(lengths), "truncated": truncated,
            "share": round(truncated / len(lengths), 4) if lengths else 0.0,
            "tokens_lost": sum(lost), "max_tokens_lost": max(lost, default=0), "longest_tokens": longest,
            "seq_len": seq_len, "seq_len_to_fit": fitting_square(longest)}


def sample_captions(spec: str, *, max_captions: int = MAX_CAPTIONS, max_caption_bytes: int = 4096,
                    seed: int = 0, ids_field: str | None = None) -> tuple[list[tuple[str, bytes,
                                                                                     bytes | None]], dict]:
    """Captions of a shard set, as the loader reads them (cut to `max_caption_bytes`): all of them, or whole
    shards in a seeded order until `max_captions`. Returns ((caption, its `txt` bytes, its field `ids_field`
    or None: token ids the loader can read instead of tokenizing, mgn/data/tokens.py) per sample, and how they
    were drawn)."""
    shards = expand_shards(spec)
    try:
        total = sum(read_sizes(shards).values())
    except (OSError, ValueError):
        total = None  # the loader will say what is wrong with sizes.json
    order = list(shards)
    if total is None or total > max_captions:
        random.Random(seed).shuffle(order)
    captions, read, fields = [], 0, sample_fields(spec)
    for shard in order:
        if len(captions) >= max_captions:
            break
        read += 1
        captions += islice(_shard_captions(shard, fields, max_caption_bytes, ids_field),
                           max_captions - len(captions))
    sampled = (total is None or total > max_captions) and len(captions) >= max_captions
    return captions, {"sampled": sampled, "samples": total, "shards_read": read, "shards": len(shards)}


def _shard_captions(shard: str, fields: SampleFields, max_caption_bytes: int,
                    ids_field: str | None) -> Iterator[tuple[str, bytes, bytes | None]]:
    """(caption, its bytes, its field `ids_field` or None) for the decodable captions of one shard, found
    where the card says (`fields`); a damaged shard gives what it holds before the damage (as the loader)."""
    try:
        with open(shard, "rb") as f:
            for sample in tar_samples(f):
                try:
                    raw = fields.caption(sample)
                    yield cap_caption(raw, max_caption_bytes), raw, sample.get(ids_field)
                except ValueError:
                    continue  # no caption, or bad UTF-8: the loader skips the sample too
    except (OSError, tarfile.TarError):
        return


def count_split(spec: str, tokenizer_name: str, seq_len: int, *, max_captions: int = MAX_CAPTIONS,
                max_caption_bytes: int = 4096) -> dict:
    """Counts of one split (`count_lengths`), plus whether they come from a sample of it and for how many the
    loader uses the token ids stored in the shards (present, whole, fitting seq_len: tokens.stored_ids)
    instead of tokenizing; stored ids the loader would use that are not the tokenizer's are counted apart (its
    spot check refuses their shards)."""
    field = field_name(tokenizer_name)
    samples, drawn = sample_captions(spec, max_captions=max_captions, max_caption_bytes=max_caption_bytes,
                                     ids_field=field)
    made = token_ids(tokenizer_name, [caption for caption, _, _ in samples])
    used = wrong = 0
    for (_, txt, raw), ids in zip(samples, made):
        stored = stored_ids(raw, txt, max_caption_bytes=max_caption_bytes, seq_len=seq_len,
                            id_bound=id_bound(tokenizer_name)) if field else None
        if stored is not None:
            used += list(stored) == ids
            wrong += list(stored) != ids
    return {**count_lengths([len(ids) for ids in made], seq_len), **drawn, "token_ids_used": used,
            "token_ids_wrong": wrong}


def count_run(cfg: Config, max_captions: int = MAX_CAPTIONS) -> dict:
    """{split: counts} for the run's train and test shards, with its tokenizer, seq_len and caption byte
    cap."""
    name = resolve_text_model(cfg.model.text_model)
    return {split: count_split(spec, name, cfg.model.seq_len, max_captions=max_captions,
                               max_caption_bytes=cfg.data.max_caption_bytes)
            for split, spec in (("train", cfg.data.train_shards), ("test", cfg.data.test_shards)) if spec}


def describe(split: str, c: dict) -> str:
    """`train 0 of 2040 cut at seq_len 36 (0.0%; 0 tokens lost, at most 0 of one; longest 33 tokens; the
    shards' stored token ids used for 2040)`."""
    of = f"a sample of {c['captions']} (from {c['shards_read']} of {c['shards']} shards)" if c["sampled"] \
        else str(c["captions"])
    wrong = (f"; {c['token_ids_wrong']} stored ids are not their captions' tokens: the loader refuses their "
             "shards" if c.get("token_ids_wrong") else "")
    tokenize = ("" if c["token_ids_used"]
                else ": workers tokenize (python -m mgn.shards --tokenizer <text model>)")
    return (f"{split} {c['truncated']} of {of} cut at seq_len {c['seq_len']} ({100 * c['share']:.1f}%; "
            f"{c['tokens_lost']} tokens lost, at most {c['max_tokens_lost']} of one; "
            f"longest {c['longest_tokens']} tokens; the shards' stored token ids used for "
            f"{c['token_ids_used']}{tokenize}{wrong})")


def warnings(counts: dict, threshold: float = WARN_SHARE) -> list[str]:
    """One sentence per split with more than `threshold` of its captions cut."""
    return [f"{100 * c['share']:.1f}% of the {split} captions{' (sampled)' if c['sampled'] else ''} are cut "
            "at "
            f"model.seq_len {c['seq_len']}: the longest has {c['longest_tokens']} tokens, "
            f"{c['max_tokens_lost']} "
            f"of them never reach the text encoder; model.seq_len {c['seq_len_to_fit']} (a perfect square) "
            "would "
            f"fit them all" for split, c in counts.items() if c["share"] > threshold]


def report_run(cfg: Config, tensorboard, step: int = 0) -> dict | None:
    """train.py, rank 0, before training: count, log (a warning past WARN_SHARE), TensorBoard scalars at
    `step` (where the run starts or resumes: one point per start) and a text entry, `<run>/captions.json`
    (summary.json's `captions`). None, and nothing written, when the objective reads no captions."""
    if not cfg.uses_captions:
        return None
    counts = count_run(cfg)
    log.info("MGN: captions: %s", "; ".join(describe(split, c) for split, c in counts.items()))
    for line in warnings(counts):
        log.warning("MGN: WARNING: %s", line)
    cfg.paths.captions.write_text(json.dumps(counts, indent=2) + "\n")
    tensorboard.text("captions", "\n\n".join(describe(split, c) for split, c in counts.items()))
    for split, c in counts.items():
        tensorboard.scalars({f"captions/{split}_truncated_share": c["share"],
                             f"captions/{split}_max_tokens_lost": c["max_tokens_lost"]}, step)
    return counts


def read_report(path: Path) -> dict | None:
    """What `report_run` wrote for a run (its RunPaths.captions), or None (an image-only run, or one started
    before it existed)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# --- the comparison runner ----------------------------------------------------------------------------------

# compare.py refuses guided arms when more than this share of a split's captions is cut
COMPARE_MAX_SHARE = 0.02


def check_comparison(configs: dict[str, Config], allow: bool) -> list[str]:
    """compare.py, before anything runs: {label: a guided arm's config} -> the lines to print. Raises
    ValueError when more than COMPARE_MAX_SHARE of a split's captions is cut, unless `allow`
    (--allow-truncated-captions): guided arms that never see the end of their captions do not test the
    method."""
    lines, cut = [], []
    for label, cfg in configs.items():
        counts = count_run(cfg)
        lines += [f"MGN compare: captions: {label}: {describe(split, c)}" for split, c in counts.items()]
        cut += [f"{label}: {line}" for line in warnings(counts, COMPARE_MAX_SHARE)]
    if cut and not allow:
        raise ValueError("guided arms would train on cut captions, so they would not test what the captions "
                         "say:\n  "
                         + "\n  ".join(cut) + "\nraise --model.seq_len, or pass --allow-truncated-captions "
                                              "to "
                                              "compare them anyway")
    return lines + [f"MGN compare: WARNING (--allow-truncated-captions): {line}" for line in cut]
