"""Shards from anywhere cannot crash a run: seeded fuzzing of the tar reader, the training loader and
evaluate.py.

Every case is a damaged copy of one small valid shard written by the project's own writer (32 px synthetic
images): byte flips, truncations, headers with valid checksums claiming huge, negative or malformed sizes,
names that are not UTF-8, pax records with stray bytes or absurd lengths, GNU long names. The reader may
yield samples or raise `ShardError` naming the shard, nothing else, and never asks for more than the member
cap in one read; the training loader skips and counts, or stops with one line naming the shard;
`evaluate.py` completes or prints one `evaluate.py: error:` line.
"""
from __future__ import annotations

import io
import random
import re
import shutil
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from mgn.config import DataConfig, preset_config
from mgn.data.loader import build_loader
from mgn.data.writer import write_synthetic
from mgn.io.tar import MAX_MEMBER_BYTES, ShardError, tar_files, tar_samples

SEED = 27
FUZZ_CASES = 1000
CAP = 1 << 20  # the reader's member cap in the fuzz loop: far above the shard's ~1 KB members
TIB, GIB = 1 << 40, 1 << 30
SHARD = "fuzz/train-000000.tar"


# --- a valid shard and the pieces to break it with ----------------------------------------------------------

@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """Synthetic shards of 6-7 samples (cls, jpg, json, txt each: no stored token ids), written by
    mgn.shards."""
    out = tmp_path_factory.mktemp("valid")
    write_synthetic(out, samples=24, image_size=32, seed=0, max_samples=8, tokenizer=None)
    return out


@pytest.fixture(scope="module")
def members(written) -> list[tuple[bytes, bytes]]:
    """(raw name, data) of the first training shard's files, in order."""
    with tarfile.open(written / "train-000000.tar") as tar:
        return [(m.name.encode(), tar.extractfile(m).read()) for m in tar]


def header(name: bytes, size: int | bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with a valid checksum; `size` is written in octal, or given as the raw 12-byte field."""
    block = bytearray(512)
    block[:len(name[:100])] = name[:100]
    block[100:108] = b"0000644\0"
    block[124:136] = size.ljust(12, b"\0")[:12] if isinstance(size, bytes) else b"%011o\0" % size
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(data), kind) + data + bytes(-len(data) % 512)


def archive(parts: list[bytes]) -> bytes:
    return b"".join(parts) + bytes(1024)


def base256(n: int) -> bytes:
    """GNU base-256 size field: 0x80 then 11 bytes for n >= 0; two's complement over 12 bytes (0xff...)
    below."""
    return b"\x80" + n.to_bytes(11, "big") if n >= 0 else (n % (1 << 96)).to_bytes(12, "big")


def pax(*records: bytes) -> bytes:
    """Well-formed pax records (`LEN key=value\\n`, LEN counting itself) unless a record is given whole."""
    out = b""
    for record in records:
        if record[:1].isdigit():
            out += record
            continue
        length = len(record) + 3
        length += len(str(length)) - 1
        out += b"%d %s\n" % (length, record)
    return member(b"PaxHeader/x", out, b"x")


def crafted(members: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """The reviewer's cases and their relatives, each a copy of the valid shard with one thing changed."""
    plain = [member(n, d) for n, d in members]
    jpg = 5  # the second sample's image: damage after one good sample
    renamed = [member(n.replace(b"syn0000001", b"caf\xe9_1"), d) for n, d in members]

    def at(index: int, *parts: bytes, drop: int = 0) -> bytes:
        return archive(plain[:index] + list(parts) + plain[index + drop:])

    name, data = members[jpg]
    return {
        "latin-1 name": archive(renamed),
        "pax path with a stray byte": at(jpg, pax(b"path=syn\xff0000001.jpg")),
        "size 1 TiB (base-256)": at(jpg, header(name, base256(TIB)) + data, drop=1),
        "size 4 GiB (octal)": at(jpg, header(name, 4 * GIB) + data, drop=1),
        "size past the end of the file": at(jpg, header(name, 900 << 10) + data, drop=1),
        "negative size (base-256)": at(jpg, header(name, base256(-1)) + data, drop=1),
        "negative size (octal '-1')": at(jpg, header(name, b"-1") + data, drop=1),
        "pax header of 1 TiB": at(jpg, header(b"PaxHeader/x", base256(TIB), b"x")),
        "pax record of absurd length": at(jpg, pax(b"99999999999999999999999 path=x.jpg\n")),
        "GNU long name, not UTF-8": at(jpg, member(b"././@LongLink", b"syn0000001/\xff" * 30 + b".jpg\0",
                                                   b"L")),
        "GNU long name of 1 TiB": at(jpg, header(b"././@LongLink", base256(TIB), b"L")),
        "a file named x.__key__": at(jpg, member(b"syn0000001.__key__", b"\xff")),
        "cut mid-member": archive(plain)[: 512 * 6 + 700],
    }


# --- the reader alone ---------------------------------------------------------------------------------------

class Recorder(io.BytesIO):
    """A shard in memory that fails the test on any read asking for more than the cap (or for everything)."""

    def __init__(self, data: bytes, *, seekable: bool = True):
        super().__init__(data)
        self.name, self._seekable = SHARD, seekable

    def seekable(self) -> bool:
        return self._seekable

    def read(self, n=-1):
        assert n is not None and 0 <= n <= CAP, f"read({n}) beyond the cap of {CAP}"
        return super().read(n)


def read_all(data: bytes, *, seekable: bool = True) -> list[dict] | ShardError:
    """The samples of a shard, or the ShardError it ends with; any other exception fails the test."""
    try:
        return list(tar_samples(Recorder(data, seekable=seekable), max_member_bytes=CAP))
    except ShardError as error:
        assert str(error).startswith(f"{SHARD}, header at byte ") and "\n" not in str(error), error
        return error


def test_the_crafted_cases_end_as_documented(members):
    cases = crafted(members)
    outcome = {name: read_all(data) for name, data in cases.items()}
    keys = {name: [s["__key__"] for s in got] for name, got in outcome.items() if isinstance(got, list)}
    errors = {name: str(got).split(": ", 1)[1] for name, got in outcome.items() if isinstance(got,
                                                                                              ShardError)}
    assert keys["latin-1 name"][1] == "caf\\xe9_1" and len(keys["latin-1 name"]) == 7
    assert "syn\\xff0000001" in keys["pax path with a stray byte"]
    assert "syn0000001/\\xff" * 30 in keys["GNU long name, not UTF-8"]
    assert "x" in keys["pax record of absurd length"]  # its length is not checked: the path is read
    assert keys["a file named x.__key__"] == [f"syn000000{i}" for i in range(7)]  # the file is left out
    over = "more than data.max_member_bytes (1,048,576)"
    assert errors == {
        "size 1 TiB (base-256)": f"size field claims 1,099,511,627,776 bytes, {over}",
        "size 4 GiB (octal)": f"size field claims 4,294,967,296 bytes, {over}",
        "size past the end of the file": "size field claims 921,600 bytes, only 28,702 are left in the file",
        "negative size (base-256)": "bad size field b'" + "\\xff" * 12 + "'",
        "negative size (octal '-1')": "bad size field b'-1'",
        "pax header of 1 TiB": f"size field claims 1,099,511,627,776 bytes, {over}",
        "GNU long name of 1 TiB": f"size field claims 1,099,511,627,776 bytes, {over}",
        "cut mid-member": "size field claims 271 bytes, only 188 are left in the file",
    }
    assert str(outcome["size 1 TiB (base-256)"]).startswith(f"{SHARD}, header at byte 6,144 (member "
                                                            "'syn0000001.jpg')")
    stream = read_all(cases["cut mid-member"], seekable=False)  # a pipe: the short read is the error
    assert str(stream).endswith("(member 'syn0000000.json'): cut short: 188 of the member's 271 bytes")


def test_a_huge_size_costs_no_memory_in_a_real_file(members, tmp_path):
    """With the default cap and an ordinary buffered file: claims of 1 TiB, 4 GiB and 900 KiB (under the cap,
    beyond the end of the file) are refused before anything of that size is allocated."""
    cases = crafted(members)
    tracemalloc.start()
    try:
        for name in ("size 1 TiB (base-256)", "size 4 GiB (octal)", "size past the end of the file"):
            path = tmp_path / "shard.tar"
            path.write_bytes(cases[name])
            with open(path, "rb") as f, pytest.raises(ShardError, match=re.escape(str(path))):
                list(tar_files(f))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"peak {peak:,} bytes"
    assert DataConfig().max_member_bytes == MAX_MEMBER_BYTES  # the config's default is the reader's


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random kind of damage at a random place (member boundaries for the crafted ones)."""
    boundaries = range(0, max(len(data) - 1024, 1), 512)
    where = rng.choice(boundaries)
    kind = rng.choice(["flip", "digit", "truncate", "header", "insert", "junk"])
    if kind in ("flip", "digit"):  # digit: a number field of a header (size, checksum) rewritten in place
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            if kind == "flip":
                out[rng.randrange(len(out))] ^= rng.randint(1, 255)
            else:
                out[where + rng.randrange(124, 156)] = rng.choice(b"0123456789 \0+-_x")
        return bytes(out)
    if kind == "truncate":
        return data[:rng.randrange(len(data))]
    if kind == "junk":
        return data[:where] + rng.randbytes(rng.choice([1, 100, 512, 1500])) + data[where:]
    name = rng.choice([b"a.jpg", b"\xff\xfe.cls", b"x/y.txt", b"noext", b"a.__key__", b"caf\xe9.jpg", b"",
                       b"a\nb.jpg"])
    size = rng.choice([0, 1, 511, 512, 5000, CAP, CAP + 1, 10 * CAP, TIB, GIB, -1, -TIB])
    field = base256(size) if size < 0 or size > 1 << 33 or rng.random() < 0.3 else size
    if rng.random() < 0.1:
        field = rng.choice([b"-1", b"+7", b"1_0", b"89", b"0o7", b" 12 ", rng.randbytes(12)])
    block = header(name, field, rng.choice([b"0", b"\0", b"7", b"x", b"L", b"g", b"5", b"K", b"S"]))
    if kind == "header":  # replaces a header: what follows is read as that member's data
        return data[:where] + block + data[where + 512:]
    extra = rng.choice([
        block,
        pax(b"path=" + rng.randbytes(rng.randint(1, 40))),
        pax(b"%d path=x.jpg\n" % rng.choice([0, 1, 10 ** 30, -5])),
        pax(rng.randbytes(rng.randint(1, 200))),
        member(b"././@LongLink", rng.randbytes(rng.randint(1, 700)), b"L"),
    ])
    return data[:where] + extra + data[where:]


def test_fuzzed_shards_yield_or_raise_shard_error_within_the_cap(members):
    rng = random.Random(SEED)
    valid = archive([member(n, d) for n, d in members])
    start = time.perf_counter()
    outcomes = {"read": 0, "error": 0}
    for case in range(FUZZ_CASES):
        data = mutate(valid, rng)
        if rng.random() < 0.3:
            data = mutate(data, rng)
        got = read_all(data, seekable=case % 4 != 0)  # every fourth as a pipe: only the cap holds there
        outcomes["read" if isinstance(got, list) else "error"] += 1
    assert min(outcomes.values()) > FUZZ_CASES // 10, outcomes  # both outcomes well exercised
    assert time.perf_counter() - start < 10


# --- the training loader and evaluate.py ------------------------------------------------------------------

def shard_folder(folder: Path, written: Path, data: bytes, prefix: str) -> str:
    """The crafted shard as <prefix>-000000.tar beside a valid one, with the sizes.json of the valid set."""
    folder.mkdir()
    (folder / f"{prefix}-000000.tar").write_bytes(data)
    shutil.copy(written / "train-000001.tar", folder / f"{prefix}-000001.tar")
    (folder / "sizes.json").write_text(f'{{"{prefix}-000000.tar": 7, "{prefix}-000001.tar": 7}}')
    return str(folder / f"{prefix}-*.tar")


def train_outcome(pattern: str, max_skip_fraction: float) -> dict[str, int] | str:
    cfg = preset_config("tiny", {"objective": {"name": "baseline"},
                                 "data": {"train_shards": pattern, "num_workers": 0, "shuffle_buffer": 4,
                                          "max_skip_fraction": max_skip_fraction}})
    loader = build_loader(cfg, "train")
    try:
        assert sum(len(batch["key"]) for batch in loader) == len(loader) * cfg.train.micro_batch
    except RuntimeError as error:
        return str(error)
    return loader.skipped()


def test_the_training_loader_skips_and_counts_or_stops_with_one_line(members, written, tmp_path):
    cases = crafted(members)
    rng = random.Random(SEED)
    valid = archive([member(n, d) for n, d in members])
    cases.update({f"fuzz {i}": mutate(valid, rng) for i in range(10)})
    for index, (name, data) in enumerate(cases.items()):
        pattern = shard_folder(tmp_path / str(index), written, data, "train")
        crafted_shard = pattern.replace("*", "000000")
        outcome = train_outcome(pattern, max_skip_fraction=0.9)
        assert isinstance(outcome, dict), (name, outcome)
        assert set(outcome) <= {crafted_shard}, (name, outcome)
        if name.startswith(("size", "negative", "pax header", "GNU long name of", "cut")):
            assert outcome[crafted_shard] >= 6, (name, outcome)  # the rest of the shard after one good sample
        strict = train_outcome(pattern, max_skip_fraction=0.0)
        if outcome:
            assert isinstance(strict, str) and crafted_shard in strict and "\n" not in strict, (name, strict)
        else:
            assert strict == {}, (name, strict)


def test_a_worker_left_with_no_readable_sample_stops_with_the_reason(members, tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(crafted(members)["cut mid-member"])
    (tmp_path / "sizes.json").write_text('{"train-000000.tar": 7}')
    error = train_outcome(str(tmp_path / "train-*.tar"), max_skip_fraction=0.9)
    assert (error.startswith(f"no readable samples in ['{tmp_path / 'train-000000.tar'}']")
            and "\n" not in error)
    assert error.endswith("(member 'syn0000000.json'): size field claims 271 bytes, only 188 are left in the "
                          "file)")


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """An exported tiny student (no training): enough for evaluate.py to read shards with."""
    from mgn.model.export import export_student
    from tests.test_security import _student

    out = tmp_path_factory.mktemp("student")
    model, cfg = _student(out)
    return export_student(model, cfg, out, formats=("safetensors",))


@pytest.mark.slow
def test_evaluate_completes_or_prints_one_error_line(members, written, student, tmp_path, capsys):
    import evaluate

    for index, (name, data) in enumerate(crafted(members).items()):
        pattern = shard_folder(tmp_path / str(index), written, data, "test")
        code = evaluate.main(["--ckpt", str(student), "--shards", pattern, "--num-workers", "0", "--device",
                              "cpu",
                              "--out", str(tmp_path / f"out{index}")])
        out, err = capsys.readouterr()
        if code == 0:
            assert not err and "14 samples" in out, (name, out, err)
        else:
            assert code == 2 and err.startswith("evaluate.py: error: ") and err.count("\n") == 1, (name, err)
            assert pattern.replace("*", "000000") in err, (name, err)
