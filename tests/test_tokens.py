"""
tokens.py: the .bin token format (header, uint16/uint32), its checks and their hints, atomic writes,
meta.json, and the batch reader with its deterministic start offsets.
"""
import os

import numpy as np
import pytest
import torch

from nanoforge import tokens
from nanoforge.errors import UserError


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "shakespeare_char"  # errors must point at data/shakespeare_char/prepare.py
    d.mkdir()
    return d


def test_round_trip(data_dir):
    path = str(data_dir / "train.bin")
    ids = np.random.default_rng(0).integers(0, 65, size=1000)
    tokens.write_tokens(path, ids, vocab_size=65)
    data = tokens.open_tokens(path)
    assert data.dtype == np.uint16 and len(data) == 1000
    assert np.array_equal(data, ids)
    assert os.path.getsize(path) == tokens.HEADER_BYTES + 2 * 1000
    assert os.listdir(data_dir) == ["train.bin"]  # no temporary file left beside it


def test_writer_in_several_chunks(data_dir):
    path = str(data_dir / "train.bin")
    chunks = [np.arange(10), [], list(range(10, 15)), np.arange(15, 100)]
    with tokens.TokenWriter(path, vocab_size=100) as w:
        for chunk in chunks:
            w.write(chunk)
    assert w.count == 100
    assert np.array_equal(tokens.open_tokens(path), np.arange(100))


def test_token_width_follows_vocab_size(data_dir):
    assert tokens.token_dtype(50257) == np.uint16
    assert tokens.token_dtype(65536) == np.uint16  # ids up to 65535 still fit
    assert tokens.token_dtype(65537) == np.uint32
    small, large = str(data_dir / "small.bin"), str(data_dir / "large.bin")
    tokens.write_tokens(small, [0, 65535], vocab_size=65536)
    tokens.write_tokens(large, [0, 70000, 99999], vocab_size=100000)
    assert tokens.open_tokens(small).tolist() == [0, 65535]
    data = tokens.open_tokens(large)
    assert data.dtype == np.uint32
    assert data.tolist() == [0, 70000, 99999]  # 70000 would wrap to 4464 in uint16


def assert_error_with_hint(path, match):
    with pytest.raises(UserError, match=match) as e:
        tokens.open_tokens(str(path))
    assert "data/shakespeare_char/prepare.py" in str(e.value)


def test_missing_file(data_dir):
    assert_error_with_hint(data_dir / "train.bin", "not found")


def test_headerless_nanogpt_file(data_dir):
    path = data_dir / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)  # what nanoGPT's prepare.py writes
    assert_error_with_hint(path, "not a nanoforge token file")


def test_file_shorter_than_a_header(data_dir):
    path = data_dir / "train.bin"
    path.write_bytes(tokens.MAGIC)
    assert_error_with_hint(path, "not a nanoforge token file")


def test_wrong_version(data_dir):
    path = data_dir / "train.bin"
    tokens.write_tokens(str(path), np.arange(50), vocab_size=50)
    raw = bytearray(path.read_bytes())
    raw[8:12] = (2).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    assert_error_with_hint(path, "version 2")


def test_truncated_file(data_dir):
    path = data_dir / "train.bin"
    tokens.write_tokens(str(path), np.arange(50), vocab_size=50)
    path.write_bytes(path.read_bytes()[:-10])
    assert_error_with_hint(path, "truncated or corrupt")


def test_failed_write_leaves_no_file(data_dir):
    path = str(data_dir / "train.bin")
    with pytest.raises(RuntimeError, match="tokenizer crashed"):
        with tokens.TokenWriter(path, vocab_size=100) as w:
            w.write(np.arange(50))
            raise RuntimeError("tokenizer crashed")
    assert os.listdir(data_dir) == []


def test_failed_write_keeps_the_previous_file(data_dir):
    path = str(data_dir / "train.bin")
    tokens.write_tokens(path, np.arange(20), vocab_size=100)
    with pytest.raises(KeyboardInterrupt):
        with tokens.TokenWriter(path, vocab_size=100) as w:
            w.write(np.arange(50))
            raise KeyboardInterrupt
    assert np.array_equal(tokens.open_tokens(path), np.arange(20))
    assert os.listdir(data_dir) == ["train.bin"]


@pytest.mark.parametrize("bad", [[0, 100], [-1, 5]])
def test_out_of_range_ids_are_rejected(data_dir, bad):
    path = str(data_dir / "train.bin")
    with pytest.raises(ValueError, match="out of range"):
        tokens.write_tokens(path, np.array(bad), vocab_size=100)
    assert os.listdir(data_dir) == []


def test_split_length_needs_more_than_one_block(data_dir):
    tokens.write_tokens(tokens.split_path(str(data_dir), "val"), np.arange(64), vocab_size=100)
    with pytest.raises(UserError, match="block_size"):
        tokens.split_length(str(data_dir), "val", block_size=64)  # 64 tokens give no (x, y) pair of 64
    assert tokens.split_length(str(data_dir), "val", block_size=63) == 64


@pytest.mark.parametrize("shard_tokens", [0, 100, 1000, 1003])  # one file; shards cut mid-run; one full shard
@pytest.mark.parametrize("vocab_size", [50257, 70000])  # uint16 and uint32 tokens
def test_placed_writer_writes_the_bytes_of_the_sequential_writers(tmp_path, shard_tokens, vocab_size):
    """Runs of tokens written at their places, in any order (as Ray's workers do), give the files the
    sequential writers give, shard edges and headers included."""
    ids = np.random.default_rng(0).integers(0, vocab_size, 1003)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (tokens.ShardWriter(str(tmp_path / "a"), "train", vocab_size, shard_tokens) if shard_tokens
          else tokens.TokenWriter(tokens.split_path(str(tmp_path / "a"), "train"), vocab_size)) as w:
        w.write(ids)
    placed = tokens.PlacedWriter(str(tmp_path / "b"), "train", vocab_size, len(ids), shard_tokens)
    placed.create()
    cuts = [0, 7, 250, 251, 999, 1003]
    for lo, hi in reversed(list(zip(cuts, cuts[1:]))):
        placed.write_at(lo, ids[lo:hi])
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b")) and len(names) == (-(-1003 // shard_tokens) if shard_tokens else 1)
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with pytest.raises(ValueError, match="out of range"):
        placed.write_at(0, [vocab_size])


def test_train_starts_deterministic_per_step_and_in_range():
    count, block_size = 1000, 64
    a = tokens.train_starts(seed=1337, step=5, n_rows=32, count=count, block_size=block_size)
    b = tokens.train_starts(seed=1337, step=5, n_rows=32, count=count, block_size=block_size)
    assert np.array_equal(a, b)  # a resumed run (or another rank) sees the same rows
    assert not np.array_equal(a, tokens.train_starts(1337, 6, 32, count, block_size))
    assert not np.array_equal(a, tokens.train_starts(1338, 5, 32, count, block_size))
    many = tokens.train_starts(0, 0, 20000, count, block_size)
    # x = data[s:s + block_size], y = data[s + 1:s + 1 + block_size]: the last start is count - block_size - 1
    assert many.min() == 0 and many.max() == count - block_size - 1


def test_eval_starts_fixed_and_in_range():
    count, block_size = 1000, 64
    a = tokens.eval_starts(count, block_size, 10)
    assert np.array_equal(a, tokens.eval_starts(count, block_size, 10))
    assert len(a) == 10 and a[0] == 0 and a[-1] == count - block_size - 1
    assert np.all(np.diff(a) > 0)


def test_read_batch_targets_are_inputs_shifted_by_one(data_dir):
    path = str(data_dir / "train.bin")
    count, block_size = 300, 16
    tokens.write_tokens(path, np.arange(count) % 257, vocab_size=257)
    starts = [0, 5, count - block_size - 1]  # includes the last start train_starts can give
    x, y = tokens.read_batch(path, starts, block_size)
    assert x.shape == y.shape == (3, block_size) and x.dtype == y.dtype == torch.int64
    for row, s in enumerate(starts):
        assert x[row].tolist() == [(s + i) % 257 for i in range(block_size)]
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert y[-1, -1].item() == (count - 1) % 257


def test_batched_read_matches_window_by_window_across_shards_and_sees_rewrites(data_dir, monkeypatch):
    # three shards; windows inside one shard, straddling one boundary, and spanning a whole short shard
    paths = [str(data_dir / f"train_{i:06d}.bin") for i in range(3)]
    sizes = [40, 7, 50]
    offset = 0
    for path, n in zip(paths, sizes):
        tokens.write_tokens(path, (np.arange(offset, offset + n) * 7) % 1000, vocab_size=1000)
        offset += n
    starts = [0, 3, 30, 38, 40, 45, 47, 80, 96 - 10]
    fast = tokens.read_batch(paths, starts, 10)
    slow = tokens.read_batch(paths, starts, 10, reference=True)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert fast[0][3].tolist() == [(s * 7) % 1000 for s in range(38, 48)]  # runs through the 7-token shard
    # the same with big files (memmapped on every call, never kept in memory)
    monkeypatch.setattr(tokens, "_RESIDENT_MAX_BYTES", 0)
    assert all(torch.equal(a, b) for a, b in zip(tokens.read_batch(paths, starts, 10), fast))
    monkeypatch.undo()
    # a small file kept in memory is read again once it is rewritten (a new prepare run)
    tokens.write_tokens(paths[0], np.full(41, 5), vocab_size=1000)
    assert tokens.read_batch(paths, [0], 10)[0].tolist() == [[5] * 10]


def test_meta_round_trip(data_dir):
    meta = {"tokenizer": {"kind": "char", "chars": "\n !ab\u00e9"}, "vocab_size": 6,
            "train": {"tokens": 100, "bytes": 101}, "source": "input.txt"}
    tokens.write_meta(str(data_dir), meta)
    assert tokens.read_meta(str(data_dir)) == meta


def test_read_meta_missing(data_dir):
    with pytest.raises(UserError, match="meta.json not found.*prepare.py"):
        tokens.read_meta(str(data_dir))


def test_prepare_hint_names_the_script_that_makes_the_folder(tmp_path):
    """A repo dataset names its own prepare.py; OpenWebText (train.py's default dataset) names the generic
    script with the flag that fetches it, as data/openwebtext holds no script of its own."""
    assert tokens.prepare_hint(tokens.dataset_dir("shakespeare_char")).endswith("data/shakespeare_char/prepare.py")
    assert tokens.prepare_hint(tokens.dataset_dir("openwebtext")).endswith(
        "data/your_text/prepare.py --dataset=openwebtext")
    assert "--out_dir=" in tokens.prepare_hint(str(tmp_path / "mine"))
