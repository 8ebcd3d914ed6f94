"""
The token file format, its metadata, and the batch reader: the one place these rules live.

A dataset is a folder data/<name>/ holding train.bin, val.bin and meta.json; or, for corpora too big
for one file, shards train_000000.bin, train_000001.bin, ... (and val_000000.bin, ...) that read as
one split: their tokens in order, as if concatenated. Each .bin file is a 64-byte little-endian header, then the tokens:

    offset 0   8 bytes  magic b"NFTOKENS"
    offset 8   uint32   format version (1)
    offset 12  uint32   bytes per token: 2 (uint16) or 4 (uint32, when ids pass 65,535)
    offset 16  uint64   number of tokens
    offset 24  zeros up to 64 (room to grow, as llm.c's header let its format grow)

meta.json (JSON, never a pickle) records the tokenizer, vocab_size, per-split token and byte counts, and
where the text came from.
"""
import glob
import json
import os
import struct

import numpy as np
import torch

from nanoforge.errors import UserError
from nanoforge.files import REPO, atomic_path, open_output, write_json

MAGIC = b"NFTOKENS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQ")


def token_dtype(vocab_size):
    """uint16 holds ids 0..65535; a larger vocabulary needs uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def dataset_dir(dataset, data_dir=""):
    """Where a dataset's files are: `data_dir` when given, else data/<dataset> in the repository."""
    return data_dir or os.path.join(REPO, "data", dataset)


def prepare_hint(data_dir):
    """What to run to (re)make a data folder's token files, naming only scripts that exist: the folder's
    own prepare.py, else data/<name>/prepare.py of the repo, else the generic way."""
    data_dir = os.path.abspath(data_dir)
    name = os.path.basename(data_dir)
    candidates = [(os.path.join(data_dir, "prepare.py"), ""), (os.path.join(dataset_dir(name), "prepare.py"), "")]
    if name == "openwebtext":  # train.py's default dataset, fetched from the hub by the generic script
        candidates.append((os.path.join(dataset_dir("your_text"), "prepare.py"), " --dataset=openwebtext"))
    for script, args in candidates:
        if os.path.exists(script):
            shown = os.path.relpath(script)
            return f"run: python {script if shown.startswith('..') else shown}{args}"
    return (f"prepare it again with the prepare.py that made it (e.g. python data/shakespeare_char/prepare.py "
            f"--input=YOUR.txt --out_dir={data_dir})")


def _prepare_hint(path):
    return prepare_hint(os.path.dirname(os.path.abspath(path)))


class TokenWriter:
    """Writes a .bin file in chunks, so memory stays flat however large the corpus:

        with TokenWriter("data/x/train.bin", vocab_size) as w:
            for ids in chunks: w.write(ids)

    The file appears under its name only once complete (temporary file, then rename)."""

    def __init__(self, path, vocab_size):
        self.path, self.dtype, self.count = path, token_dtype(vocab_size), 0
        self.vocab_size = vocab_size

    def __enter__(self):
        self._atomic = atomic_path(self.path)
        self._f = open(self._atomic.__enter__(), "wb")
        self._f.write(b"\0" * HEADER_BYTES)  # the header is written last, when the count is known
        return self

    def write(self, ids):
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}: {ids.min()}..{ids.max()}")
        self._f.write(ids.astype(self.dtype).tobytes())
        self.count += ids.size

    def __exit__(self, kind, value, tb):
        if kind is None:
            self._f.seek(0)
            self._f.write(_HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, self.count))
        self._f.close()
        return self._atomic.__exit__(kind, value, tb)


def write_tokens(path, ids, vocab_size):
    with TokenWriter(path, vocab_size) as w:
        w.write(ids)


def read_header(path):
    """(numpy dtype, token count), after checking the file is whole. Errors say what to rerun."""
    if not os.path.exists(path):
        raise UserError(f"token file {path} not found; {_prepare_hint(path)}")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise UserError(f"{path} is not a nanoforge token file (no header; an old nanoGPT file?); {_prepare_hint(path)}")
    _, version, itemsize, count = _HEADER.unpack(head[:_HEADER.size])
    if version != VERSION or itemsize not in (2, 4):
        raise UserError(f"{path} has token format version {version}, width {itemsize}; this code reads "
                        f"version {VERSION}; {_prepare_hint(path)}")
    expected = HEADER_BYTES + count * itemsize
    if os.path.getsize(path) != expected:
        raise UserError(f"{path} is truncated or corrupt ({os.path.getsize(path)} bytes, header says "
                        f"{expected}); {_prepare_hint(path)}")
    return (np.uint16 if itemsize == 2 else np.uint32), count


def open_tokens(path):
    """The tokens of a .bin file as a read-only memmap (nothing is read into memory)."""
    dtype, count = read_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


# ------------------------------------------------------------------------------------------------------
# meta.json

def write_meta(data_dir, meta):
    write_json(os.path.join(data_dir, "meta.json"), meta)


def write_text_dataset(out_dir, text, tok, source, sha256, val_fraction=0.1):
    """One text as a dataset, as nanoGPT's shakespeare scripts do it: the first 90% of the characters
    are train, the rest val, each encoded as ordinary text (no end-of-text tokens); writes train.bin,
    val.bin and meta.json. `tok` is any tokenizer of tokenizer.py. Returns meta."""
    n = int(len(text) * (1 - val_fraction))
    splits = {"train": text[:n], "val": text[n:]}
    if not splits["train"] or not splits["val"]:
        raise UserError(f"{source} holds only {len(text)} characters: too little for a train/val split")
    os.makedirs(out_dir, exist_ok=True)
    meta = {"tokenizer": tok.spec, "vocab_size": tok.vocab_size, "source": source, "sha256": sha256}
    for split, part in splits.items():
        ids = tok.encode(part)
        write_tokens(split_path(out_dir, split), ids, tok.vocab_size)
        meta[f"{split}_tokens"] = len(ids)
        meta[f"{split}_bytes"] = len(part.encode("utf-8"))
    write_meta(out_dir, meta)
    return meta


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found; {prepare_hint(data_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); {prepare_hint(data_dir)}") from None
    if not isinstance(meta, dict) or not {"vocab_size", "tokenizer"} <= meta.keys():
        raise UserError(f"{path} lacks vocab_size or tokenizer; {prepare_hint(data_dir)}")
    return meta


def split_path(data_dir, split):
    return os.path.join(data_dir, f"{split}.bin")


def shard_path(data_dir, split, index):
    return os.path.join(data_dir, f"{split}_{index:06d}.bin")


def split_files(data_dir, split):
    """The files of a split: [<split>.bin], or its shards in order."""
    if os.path.exists(split_path(data_dir, split)):
        return [split_path(data_dir, split)]
    shards = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}_" + "[0-9]" * 6 + ".bin")))
    return shards or [split_path(data_dir, split)]  # missing: read_header says which script to run


def split_length(data_dir, split, block_size):
    """Token count of a split (all its shards), checked to hold at least one block of block_size + 1."""
    count = sum(read_header(path)[1] for path in split_files(data_dir, split))
    if count <= block_size:
        raise UserError(f"the {split} split in {data_dir} holds {count} tokens, fewer than block_size + 1 = "
                        f"{block_size + 1}; use a smaller --block_size or more text")
    return count


TRUSTED_TOKENS = 10_000  # a held-out split smaller than this gives a loss too noisy to compare runs by


def small_split_warning(count, split, data_dir):
    """A warning line when a split is too small for its loss to be trusted, else None."""
    if count >= TRUSTED_TOKENS:
        return None
    return (f"warning: the {split} split of {data_dir} holds only {count:,} tokens (under {TRUSTED_TOKENS:,}): its "
            f"loss is noisy, and one below train's says nothing; prepare more held-out text")


class ShardWriter:
    """Writes a split as shards of shard_tokens tokens each (the last one shorter), FineWeb-style, a
    chunk at a time: with ShardWriter(dir, "train", vocab_size, 100_000_000) as w: w.write(ids).
    Each shard appears complete or not at all (TokenWriter)."""

    def __init__(self, data_dir, split, vocab_size, shard_tokens):
        self.data_dir, self.split, self.vocab_size, self.shard_tokens = data_dir, split, vocab_size, shard_tokens
        self.count, self.paths, self._writer = 0, [], None

    def __enter__(self):
        return self

    def write(self, ids):
        ids = np.asarray(ids)
        while ids.size:
            if self._writer is None:
                self.paths.append(shard_path(self.data_dir, self.split, len(self.paths)))
                self._writer = TokenWriter(self.paths[-1], self.vocab_size).__enter__()
            take = min(ids.size, self.shard_tokens - self._writer.count)
            self._writer.write(ids[:take])
            self.count, ids = self.count + take, ids[take:]
            if self._writer.count == self.shard_tokens:
                self._writer.__exit__(None, None, None)
                self._writer = None

    def __exit__(self, kind, value, tb):
        if self._writer is not None:
            self._writer.__exit__(kind, value, tb)


class PlacedWriter:
    """A split of `count` tokens known in advance, in the files TokenWriter (shard_tokens 0) or ShardWriter
    would write, created whole (header and size) by create(); then any process that can see the folder
    writes any run of tokens at its place in the split with write_at, in any order, so many workers
    write one split at once. The same tokens give the same bytes as the sequential writers.
    Object storage writes whole objects only: there each file's runs (pieces) are gathered and written
    at once by write_file."""

    def __init__(self, data_dir, split, vocab_size, count, shard_tokens=0):
        self.vocab_size, self.dtype = vocab_size, token_dtype(vocab_size)
        if shard_tokens:  # shard i holds tokens [i * shard_tokens, (i + 1) * shard_tokens), the last one fewer
            self.files = [(shard_path(data_dir, split, i), start, min(shard_tokens, count - start))
                          for i, start in enumerate(range(0, count, shard_tokens))]
        else:
            self.files = [(split_path(data_dir, split), 0, count)]

    def header(self, n):
        return _HEADER.pack(MAGIC, VERSION, np.dtype(self.dtype).itemsize, n).ljust(HEADER_BYTES, b"\0")

    def create(self):
        for path, _, n in self.files:
            with open(path, "wb") as f:
                f.write(self.header(n))
                f.truncate(HEADER_BYTES + n * np.dtype(self.dtype).itemsize)  # the tokens' bytes, zeros until written

    def pieces(self, position, ids):
        """ids, the split's tokens from `position` on -> (file number, position in that file, tokens as the
        file's dtype) for each file they fall in."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}: {ids.min()}..{ids.max()}")
        data = ids.astype(self.dtype)
        for k, (_, start, n) in enumerate(self.files):
            lo, hi = max(position, start), min(position + data.size, start + n)
            if lo < hi:
                yield k, lo - start, data[lo - position:hi - position]

    def write_at(self, position, ids):
        """ids, the split's tokens from `position` on, into the file(s) that hold them."""
        for k, at, data in self.pieces(position, ids):
            fd = os.open(self.files[k][0], os.O_WRONLY)
            try:
                os.pwrite(fd, data.tobytes(), HEADER_BYTES + at * data.itemsize)
            finally:
                os.close(fd)

    def write_file(self, k, at, parts):
        """File k whole, from all its pieces: `parts` (bytes) beginning at token positions `at`, in any order,
        covering it exactly once. Written through open_output (a local path or a URL)."""
        path, _, n = self.files[k]
        itemsize = np.dtype(self.dtype).itemsize
        order = sorted(range(len(parts)), key=lambda j: at[j])
        covered = 0
        for j in order:
            assert at[j] == covered, f"the pieces of {path} do not cover its tokens once"
            covered += len(parts[j]) // itemsize
        assert covered == n, f"the pieces of {path} hold {covered} of its {n} tokens"
        with open_output(path) as f:
            f.write(self.header(n))
            for j in order:
                f.write(parts[j])


# ------------------------------------------------------------------------------------------------------
# batches

def train_starts(seed, step, n_rows, count, block_size):
    """Start offsets of the n_rows sequences of one whole (global) training step, drawn from a generator
    keyed by (seed, step). Every rank computes the same array and takes its own slice, so 1 process and
    N processes see the same examples, and a resumed run sees what it would have seen."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, count - block_size, size=n_rows)


def eval_starts(count, block_size, n_rows):
    """A fixed set of n_rows windows spread evenly over a split: every evaluation (and every run with
    the same eval size) scores the same text, so numbers compare."""
    return np.linspace(0, count - block_size - 1, n_rows).round().astype(np.int64)


_RESIDENT_MAX_BYTES = 64 * 2**20  # token files up to this size are read into memory once per process
_resident = {}  # path -> ((size, mtime), tokens)


def _batch_source(path):
    """A token file for read_batch: a small file is read once and kept in memory (a fresh memmap costs
    page faults on every call, ~0.3 ms a batch: a tenth of a small model's step); a big one is memmapped
    anew each call, so resident memory does not grow with the pages a long run touches."""
    if not os.path.exists(path) or os.path.getsize(path) > _RESIDENT_MAX_BYTES:
        return open_tokens(path)
    stamp = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    if path not in _resident or _resident[path][0] != stamp:  # new, or rewritten since
        _resident[path] = (stamp, np.array(open_tokens(path)))
    return _resident[path][1]


def read_batch(paths, starts, block_size, reference=False):
    """Inputs x and next-token targets y, both (len(starts), block_size) int64, from a token file or a
    list of shards (split_files), where `starts` count from the first token of the first shard and a
    window may run on into the next shard. reference=True: the plain window-by-window path, which the
    batched one is tested against."""
    shards = [_batch_source(p) for p in ([paths] if isinstance(paths, str) else paths)]
    ends = np.cumsum([len(s) for s in shards])  # offset just past each shard

    def window(i):  # block_size + 1 tokens from offset i
        k, parts, need = int(np.searchsorted(ends, i, side="right")), [], block_size + 1
        while need:
            part = shards[k][i - (ends[k] - len(shards[k])):][:need]
            parts.append(part.astype(np.int64))
            i, need, k = i + len(part), need - len(part), k + 1
        return np.concatenate(parts)

    # the windows that lie inside one shard are gathered in one indexing per shard (a small model's step
    # is a few ms, and window() per row cost ~25 us each); the few that run on into the next shard, and
    # every window when reference=True, go through window()
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    rows = np.empty((len(starts), block_size + 1), dtype=np.int64)
    lengths = np.array([len(s) for s in shards])
    k = np.searchsorted(ends, starts, side="right").clip(max=len(shards) - 1)  # the shard each window starts in
    local = starts - (ends[k] - lengths[k])
    inside = (local + block_size + 1 <= lengths[k]) & (starts >= 0) & (not reference)
    span = np.arange(block_size + 1)
    for j in np.unique(k[inside]):
        mine = inside & (k == j)
        rows[mine] = shards[j][local[mine, None] + span]
    for i in np.flatnonzero(~inside):
        rows[i] = window(int(starts[i]))
    rows = torch.from_numpy(rows)  # (B, block_size + 1)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
