"""
Your own text as a dataset, in GPT-2's BPE (or a tokenizer you trained): files or folders of .txt, .jsonl,
.jsonl.gz or .parquet, one document each (or one a line, or a row). Each document is encoded as ordinary
text followed by the end-of-text token (50256), so documents stay apart; a random --val_fraction of the
documents (fixed --seed; at least enough for --min_val_tokens, at most a tenth) is val, the rest train.
A Hugging Face hub dataset works the same by --dataset, OpenWebText among them, as in nanoGPT's
data/openwebtext (written to data/openwebtext, which train.py reads by default).

    python data/your_text/prepare.py --input=book.txt        # -> data/book: train.py --dataset=book
    python data/your_text/prepare.py --input=my_code/ --ext=.py,.md   # only these kinds from the folder
    python data/your_text/prepare.py --input=web.jsonl.gz --text_field=text --out_dir=data/web
    python data/your_text/prepare.py --input=stories/ --txt_split=blank --out_dir=data/stories
    python data/your_text/prepare.py --input=web.jsonl.gz --tokenizer=tokenizers/mytok --out_dir=data/web_mytok
    python data/your_text/prepare.py --dataset=openwebtext             # OpenWebText from the hub -> data/openwebtext
    python data/your_text/prepare.py --dataset=HuggingFaceFW/fineweb --name=sample-10BT \
        --shard_tokens=100000000 --out_dir=data/fineweb10B      # shards of 100M tokens, FineWeb-style
    python data/your_text/prepare.py --input=s3://bucket/web/ --engine=ray --ray_address=auto \
        --shard_tokens=100000000 --out_dir=s3://bucket/web_tokens   # on a Ray cluster's workers (docs/scale.md)

--tokenizer is gpt2 (default) or a folder written by train_tokenizer.py; char is refused here, as a
character vocabulary has no end-of-text token to keep documents apart.

--input takes files, or folders searched recursively for them, local or at URLs (s3://, gs://, hf://: fsspec
with the cloud's package installed):
    .txt, .md, .py, ... text, markup and code (corpus.TEXT_SUFFIXES): one document per file, or with
                        --txt_split=blank documents separated by blank lines (the default for one file alone)
    .jsonl, .jsonl.gz   one JSON object a line, the document in its --text_field
    .parquet            the document in column --text_field
Hugging Face `datasets` turns the input into memory-mapped Arrow files on disk and tokenizes them in
--num_proc processes; the token files are then written a batch of documents at a time. Memory stays
flat however large the corpus. Local inputs are cached in a temporary folder inside --out_dir, removed
at the end; the hub download goes to Hugging Face's cache (or --cache_dir), so a rerun reuses it.
Without --out_dir, --input=book.txt writes to data/book and --dataset=NAME to data/<NAME's last part>. The
folder is built beside its place and renamed in when whole (an --out_dir URL: staged beside it there, then
moved in): a failed run leaves none, and an existing dataset is replaced only with --overwrite.
With --shard_tokens=N the splits are written as shards of N tokens (train_000000.bin, ...), which
train.py reads as one split; the single-file layout is the default.
With --engine=ray, the files are read and tokenized on a Ray cluster's workers, which write the token
files at each document's place (a folder every node sees), or each file whole at an --out_dir URL; the same
bytes as the local engine (nanoforge/ray_data.py, docs/scale.md).
OpenWebText takes ~54 GB of cache; nanoGPT got ~9.0B train and ~4.4M val tokens from it.
"""
import argparse
import atexit
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from nanoforge import errors, tokens
from nanoforge.corpus import (builder_of, by_builder, curated_splits, find_files, input_error, load_hub, open_input,
                              parse_ext, reason, text_column)
from nanoforge.errors import UserError
from nanoforge.files import is_url, output_exists, publish_folder, remove_url, replace_folder, staged_url
from nanoforge.tokenizer import load_tokenizer, tokenizer_from_arg

here = os.path.dirname(os.path.abspath(__file__))
_loaded = {}


def tokenize(batch, spec):
    """A batch of documents -> their tokens, each document's followed by end-of-text, and their UTF-8 size.
    Takes the tokenizer's spec, not the tokenizer: datasets hashes the arguments, and a spec hashes fast."""
    key = json.dumps(spec, sort_keys=True)
    if key not in _loaded:  # once per process: a trained BPE is read from its folder
        _loaded[key] = load_tokenizer(spec)
    tok = _loaded[key]
    texts = [t or "" for t in batch["text"]]  # a missing value in a JSON line is an empty document
    return {"ids": [tok.encode(t) + [tok.eot_id] for t in texts],
            "bytes": [len(t.encode("utf-8")) for t in texts]}


def sha256_file(path):
    h = hashlib.sha256()
    with open_input(path) as f:  # a local file or a URL
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(digests):
    """meta.json's sha256 of the input, from its files' own: one file's is its own (what sha256sum prints),
    several files' is the sha256 of theirs, one a line in order (so they can be hashed in parallel)."""
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()


def read_texts(paths, builder, args, cache_dir, num_proc):
    """The documents of files of one kind (builder) as a dataset of one column, 'text'; None if empty."""
    import datasets
    options = {}
    if builder == "text":
        options["sample_by"] = "paragraph" if args.txt_split == "blank" else "document"
    dset = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir,
                                 num_proc=min(num_proc, len(paths)), **options)
    if builder == "text" and args.txt_split == "blank":
        # datasets splits on exactly "\n\n": drop the newlines left around a document, and empty ones
        dset = dset.map(lambda b: {"text": [t.strip("\n") for t in b["text"] if t.strip("\n")]},
                        batched=True, num_proc=min(num_proc, len(dset)) or None)
    if not len(dset):
        return None
    where = paths[0] if len(paths) == 1 else f"the {builder} files ({paths[0]}, ...)"
    return text_column(dset, "text" if builder == "text" else args.text_field, where)


def read_order(files):
    """(group, builder, paths) in the order the documents are numbered: curate.py's shards by their split
    (train, then val), any other input as one group; then by kind of file, in order of first appearance."""
    for group, group_files in (curated_splits(files) or {"all": files}).items():
        for builder, paths in by_builder(group_files):
            yield group, builder, paths


def val_documents(sizes, sample_bytes, sample_tokens, args):
    """Which documents are val (sorted indices): a random --val_fraction of them, or more where needed for
    ~min_val_tokens (bytes a token measured on the first documents: sample_bytes over sample_tokens), but
    no more than a tenth for that: a val split of 2 tokens scores nothing, and a small corpus still needs
    its training text. sizes: every document's UTF-8 bytes."""
    n = len(sizes)
    bytes_per_token = sample_bytes / max(1, sample_tokens)
    order = np.random.default_rng(args.seed).permutation(n)
    enough = int(np.searchsorted(np.cumsum(sizes[order]), args.min_val_tokens * bytes_per_token)) + 1
    n_val = max(1, math.ceil(args.val_fraction * n), min(enough, n // 10))
    if n_val >= n:
        raise UserError(f"only {n} document(s): too few to hold out {n_val} for val and train on the rest")
    return np.sort(order[:n_val])


def prepare_locally(files, args, tok, cache_dir):
    """The local engine: the input read by datasets into Arrow files on disk (--num_proc processes), split,
    tokenized in --num_proc processes and written a batch at a time. Returns meta's sha256 and counts."""
    import datasets
    parts, paths = [], []
    try:
        if files is None:
            sha256 = None
            dset = load_hub(args.dataset, args.name, "train", cache_dir, args.num_proc)
            if len(dset):
                parts.append(("all", text_column(dset, args.text_field, f"dataset {args.dataset}")))
        else:
            for group, builder, paths in read_order(files):
                dset = read_texts(paths, builder, args, cache_dir, args.num_proc)
                if dset is not None:
                    parts.append((group, dset))
            sha256 = sha256_files([sha256_file(f) for f in files])
    except datasets.exceptions.DatasetGenerationError as e:  # a malformed JSON line, a file that is not UTF-8, ...
        raise input_error(reason(e), files or []) from None
    except StopIteration:  # datasets' JSON reader, on a compressed file with nothing inside
        raise UserError(f"could not read the input: no JSON lines in {paths[0]}") from None
    if not parts:
        raise UserError(f"no documents found in {', '.join(args.input) if args.input else args.dataset}")
    dset = datasets.concatenate_datasets([d for _, d in parts])

    # split by document, tokenize in parallel, write the token files a batch at a time
    if {g for g, _ in parts} == {"train", "val"}:  # curated shards: their split, not a random one
        splits = {k: datasets.concatenate_datasets([d for g, d in parts if g == group])
                  for k, group in (("train", "train"), ("test", "val"))}
        print(f"keeping the curated split: {len(splits['train']):,} train, {len(splits['test']):,} val documents")
    else:
        sample = [t or "" for t in dset.select(range(min(100, len(dset))))["text"]]
        sizes = pc.fill_null(pc.binary_length(dset.data.column("text")), 0).to_numpy()
        val = val_documents(sizes, sizes[:len(sample)].sum(), sum(len(tok.encode(t)) for t in sample), args)
        splits = {"train": dset.select(np.setdiff1d(np.arange(len(dset)), val)), "test": dset.select(val)}
    id_type = datasets.Value(np.dtype(tokens.token_dtype(tok.vocab_size)).name)  # uint16 for GPT-2: a small cache
    # Sequence, not List: List is new in datasets 4, pyproject.toml allows 2.19
    features = datasets.Features({"ids": datasets.Sequence(id_type), "bytes": datasets.Value("int64")})
    meta = {"sha256": sha256}
    for split, part in (("train", splits["train"]), ("val", splits["test"])):
        part = part.map(tokenize, fn_kwargs={"spec": tok.spec}, batched=True, remove_columns=["text"],
                        features=features, num_proc=min(args.num_proc, len(part)), desc=f"tokenizing {split}")
        n_bytes = 0
        writer = (tokens.ShardWriter(args.out_dir, split, tok.vocab_size, args.shard_tokens) if args.shard_tokens
                  else tokens.TokenWriter(tokens.split_path(args.out_dir, split), tok.vocab_size))
        with writer, \
                tqdm(total=len(part), unit="docs", desc=f"writing {split}.bin") as bar:
            for batch in part.with_format("arrow").iter(batch_size=1024):  # a pyarrow Table of 1024 documents
                writer.write(pc.list_flatten(batch["ids"]).to_numpy())
                n_bytes += pc.sum(batch["bytes"]).as_py()
                bar.update(batch.num_rows)
        meta.update({f"{split}_tokens": writer.count, f"{split}_bytes": n_bytes, f"{split}_documents": len(part)})
    return meta


def read_files(item, args):
    """The documents of a few input files of one kind, in pyarrow tables of up to 10,000 (the Ray engine's
    reader, on a worker, with a datasets cache of its own): read_texts, as the local engine reads them."""
    import datasets
    _, builder, paths = item
    with tempfile.TemporaryDirectory(prefix="nanoforge_read") as cache:
        try:
            dset = read_texts(paths, builder, args, cache, 1)
        except datasets.exceptions.DatasetGenerationError as e:
            raise input_error(reason(e), paths) from None
        except StopIteration:
            raise UserError(f"could not read the input: no JSON lines in {paths[0]}") from None
        if dset is not None:
            yield from dset.with_format("arrow").iter(batch_size=10_000)


def tokenize_table(table, spec, dtype):
    """tokenize on a table of documents: their tokens (ids), UTF-8 bytes and token counts, as a table. A few
    hundred documents at a time: tokenize's lists hold ~36 bytes a token (10,000 web pages took 600 MB)."""
    import pyarrow as pa
    parts = []
    for start in range(0, max(1, table.num_rows), 256):
        out = tokenize({"text": table.column("text").slice(start, 256).to_pylist()}, spec)
        ids = pa.array(out["ids"], type=pa.list_(pa.from_numpy_dtype(dtype)))
        parts.append(pa.table({"ids": ids, "bytes": pa.array(out["bytes"], pa.int64()),
                               "tokens": pc.list_value_length(ids).cast("int64")}))
    return pa.concat_tables(parts)


def split_runs(table, start, in_val, position):
    """A block of tokenized documents (on a worker) -> (split, place in the split, tokens) for each run of
    documents of one split: such a run is one contiguous run of that split's tokens."""
    index = start[table.column("item").to_numpy()] + table.column("row").to_numpy()  # (n,) in the whole input
    ids = table.column("ids").combine_chunks()
    flat, offsets = ids.flatten().to_numpy(), ids.offsets.to_numpy() - ids.offsets[0].as_py()
    split = in_val[index]
    runs = np.flatnonzero(np.diff(split.astype(np.int8), prepend=-1))  # where a run of one split begins
    for a, b in zip(runs, np.append(runs[1:], len(index))):
        at = int(position[index[a]])
        assert at + offsets[b] - offsets[a] == position[index[b - 1]] + offsets[b] - offsets[b - 1], "not one run"
        yield "val" if split[a] else "train", at, flat[offsets[a]:offsets[b]]


def write_block(table, writers, start, in_val, position):
    """A block of tokenized documents written into the split files at their places (a filesystem every
    worker sees)."""
    for split, at, ids in split_runs(table, start, in_val, position):
        writers[split].write_at(at, ids)


def block_pieces(table, writers, start, in_val, position):
    """A block's tokens cut at the files' edges, a row a piece (split, file, at, ids), to be gathered by file
    (an output at a URL: object storage writes whole objects)."""
    import pyarrow as pa
    dtype = next(iter(writers.values())).dtype
    cols = {"split": [], "file": [], "at": [], "ids": []}
    for split, at, ids in split_runs(table, start, in_val, position):
        for k, offset, piece in writers[split].pieces(at, ids):
            for name, value in zip(cols, (split, k, offset, piece)):
                cols[name].append(value)
    return pa.table({"split": pa.array(cols["split"], pa.string()), "file": pa.array(cols["file"], pa.int64()),
                     "at": pa.array(cols["at"], pa.int64()),
                     "ids": pa.array(cols["ids"], pa.list_(pa.from_numpy_dtype(dtype)))})


def write_whole(group, writers):
    """All the pieces of one file, gathered on a worker: the file written at once."""
    split, k = str(group["split"][0]), int(group["file"][0])
    w = writers[split]
    w.write_file(k, group["at"].tolist(), [np.asarray(ids, w.dtype).tobytes() for ids in group["ids"]])
    return {"tokens": np.array([w.files[k][2]])}


def prepare_on_ray(files, args, tok, cache_dir):
    """The Ray engine (--engine=ray): each file read and its documents tokenized on the cluster's workers;
    here only each document's size and token count, to choose the split (val_documents, as the local
    engine) and each document's place in its split; then the workers write the tokens at their places.
    The same bytes as the local engine. Returns meta's sha256 and counts."""
    from nanoforge import ray_data
    if files is None:
        raise UserError("--engine=ray reads --input files or URLs (a hub dataset's files: --input=hf://datasets/"
                        "OWNER/NAME/...); --dataset is read by the local engine")
    ray_data.connect(args.ray_address)
    keyed = [((group, builder), path) for group, builder, paths in read_order(files) for path in paths]
    runs = ray_data.file_runs(keyed)
    items = [(group, builder, paths) for (group, builder), paths in runs]
    ds = ray_data.documents(items, functools.partial(read_files, args=args), functools.partial(
        tokenize_table, spec=tok.spec, dtype=tokens.token_dtype(tok.vocab_size)))
    cols = ray_data.columns(ds, ["item", "row", "bytes", "tokens"])
    n = len(cols["item"])
    if not n:
        raise UserError(f"no documents found in {', '.join(args.input)}")
    start = np.concatenate([[0], np.cumsum(np.bincount(cols["item"], minlength=len(items)))[:-1]])  # (files,)
    assert (start[cols["item"]] + cols["row"] == np.arange(n)).all(), "Ray returned the documents out of order"
    if {g for g, _, _ in items} == {"train", "val"}:  # curated shards: their split, not a random one
        in_val = np.array([g == "val" for g, _, _ in items])[cols["item"]]  # (n,)
        print(f"keeping the curated split: {n - in_val.sum():,} train, {in_val.sum():,} val documents")
    else:
        sample = slice(0, min(100, n))  # tokens without the end-of-text token, as the local engine counts them
        in_val = np.zeros(n, bool)
        sample_tokens = (cols["tokens"][sample] - 1).sum()
        in_val[val_documents(cols["bytes"], cols["bytes"][sample].sum(), sample_tokens, args)] = True
    # the token files go into the output folder, which every node must see; at a URL (object storage), into
    # its staged folder there (files.staged_url, the one the driver publishes meta.json into and moves in)
    at_url = is_url(args.final_out_dir)
    folder = staged_url(args.final_out_dir) if at_url else args.out_dir
    meta, writers, position = {}, {}, np.zeros(n, np.int64)
    for split, mask in (("train", ~in_val), ("val", in_val)):
        counts = cols["tokens"][mask]
        position[mask] = np.cumsum(counts) - counts  # where each document's tokens begin in its split
        writers[split] = tokens.PlacedWriter(folder, split, tok.vocab_size, int(counts.sum()), args.shard_tokens)
        if not at_url:
            writers[split].create()
        meta.update({f"{split}_tokens": int(counts.sum()), f"{split}_bytes": int(cols["bytes"][mask].sum()),
                     f"{split}_documents": int(mask.sum())})
    places = dict(start=start, in_val=in_val, position=position)
    if at_url:  # each file's pieces gathered on a worker (Ray Data's shuffle), which writes it whole
        pieces = ray_data.map_blocks(ds, functools.partial(block_pieces, writers=writers), **places)
        done = ray_data.columns(ray_data.group_map(pieces, ["split", "file"], functools.partial(
            write_whole, writers=writers)), ["tokens"])
        for split, w in writers.items():  # a split of no tokens has a file of none, which no piece reached
            for k, (_, _, count) in enumerate(w.files):
                if count == 0:
                    w.write_file(k, [], [])
        assert done["tokens"].sum() == meta["train_tokens"] + meta["val_tokens"], "the workers lost tokens"
    else:  # every worker writes its documents' tokens in place
        written = ray_data.each_block(ds, functools.partial(write_block, writers=writers), **places)
        assert written == n, f"the workers wrote {written} documents of {n}"
    print(f"ray: {n:,} documents tokenized and written on {len(ray_data.connect().nodes())} node(s)")
    return dict(sha256=sha256_files(ray_data.map_items(sha256_file, files)), **meta)


# the guard matters: datasets' worker processes may import this file (spawn), and must not rerun the work
if __name__ == "__main__":
    errors.friendly_errors()
    parser = argparse.ArgumentParser(description="Prepare your own text (or a hub dataset such as OpenWebText) in "
                                     "GPT-2 BPE.")
    parser.add_argument("--input", nargs="+", action="extend",
                        help="your .txt/.jsonl/.jsonl.gz/.parquet files or folders")
    parser.add_argument("--dataset", help="instead of --input, a Hugging Face hub dataset: openwebtext (nanoGPT's), "
                        "HuggingFaceFW/fineweb, ...")
    parser.add_argument("--name", help="the hub dataset's configuration (e.g. sample-10BT for fineweb)")
    parser.add_argument("--shard_tokens", type=int, default=0,
                        help="write shards of this many tokens (train_000000.bin, ...); 0: one train.bin (%(default)s)")
    parser.add_argument("--text_field", default="text", help="field holding the document in JSON lines / parquet")
    parser.add_argument("--ext", default="", help="the kinds of file taken from folders, e.g. .py,.md (default: "
                        "every kind: text, code and markup, .jsonl, .jsonl.gz, .parquet)")
    parser.add_argument("--txt_split", choices=["auto", "file", "blank"], default="auto",
                        help="a text file is one document (file), or documents separated by blank lines (blank); "
                        "auto: blank for a single text file (a book, an article), file otherwise")
    parser.add_argument("--val_fraction", type=float, default=0.0005, help="share of documents held out (%(default)s)")
    parser.add_argument("--min_val_tokens", type=int, default=20000,
                        help="hold out more documents than --val_fraction where needed to reach about this many val "
                        "tokens, up to 10%% of the documents (%(default)s)")
    parser.add_argument("--seed", type=int, default=2357, help="seed of the train/val split (nanoGPT's: %(default)s)")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 or a folder written by train_tokenizer.py")
    parser.add_argument("--num_proc", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    parser.add_argument("--out_dir", help="where train.bin, val.bin, meta.json go (default: data/your_text for "
                        "--input, data/<name> for --dataset)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out_dir")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local: this machine's processes; ray: a Ray cluster's workers, the same output "
                        "(%(default)s)")
    parser.add_argument("--ray_address", default="", help="with --engine=ray: auto (the cluster `ray start` joined "
                        "this machine to) or HOST:PORT; empty: Ray on this machine alone")
    parser.add_argument("--cache_dir", help="Hugging Face datasets cache (default: a temporary folder in --out_dir "
                        "for --input, Hugging Face's own cache for the hub)")
    args = parser.parse_args()
    if args.input and args.dataset:
        raise UserError("give your text (--input) or a hub dataset (--dataset), not both")
    if not args.input and not args.dataset:
        raise UserError("nothing to prepare: give your text with --input=FILES_OR_FOLDERS, or a hub dataset with "
                        "--dataset=NAME (OpenWebText: --dataset=openwebtext)")
    if not args.out_dir:  # data/<name>: data/openwebtext is what train.py reads by default, data/book for book.txt
        name = os.path.basename(os.path.normpath(args.input[0] if args.input else args.dataset))
        args.out_dir = os.path.join(os.path.dirname(here), name.split(".")[0] or "your_text")
    if output_exists(f"{args.out_dir.rstrip('/')}/meta.json") and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a prepared dataset; pass --overwrite to replace it (it is "
                        f"replaced only once the new one is whole), or another --out_dir")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if args.shard_tokens < 0:
        raise UserError(f"--shard_tokens must be 0 (one file) or positive, got {args.shard_tokens}")
    if args.num_proc < 1:
        raise UserError(f"--num_proc must be at least 1, got {args.num_proc}")
    if args.tokenizer == "char":
        raise UserError("--tokenizer=char: a character vocabulary has no end-of-text token to keep documents "
                        "apart; use gpt2 or a folder written by train_tokenizer.py")
    tok = tokenizer_from_arg(args.tokenizer)
    files = None
    if args.input:
        files, found = find_files(args.input, parse_ext(args.ext))
        print(found)
        if not files:
            raise UserError(f"no documents found in {', '.join(args.input)}: the files are empty")
        if args.txt_split == "auto":  # one text file: its paragraphs are the documents, so some can be held out
            args.txt_split = "blank" if len(files) == 1 and builder_of(files[0]) == "text" else "file"
    if files:
        os.environ["HF_HUB_OFFLINE"] = "1"  # local files need no network; read by datasets at import
    import datasets  # noqa: F401 -- imported now, after that setting: the functions below import it again

    # --------------------------------------------------------------------------------------------------
    # the documents, as one Arrow-backed dataset with a 'text' column

    # built beside its place and renamed in when whole: a run that fails or is stopped leaves no half a dataset
    # (a URL out_dir: built in a local temporary folder, and the Ray engine's token files in its staged folder
    # at the URL, published there when whole)
    final = args.final_out_dir = args.out_dir
    if is_url(final):
        args.out_dir = os.path.join(tempfile.mkdtemp(prefix="nanoforge-output."), "data")
        atexit.register(remove_url, staged_url(final))  # what the Ray engine's workers wrote there, if not moved in
    else:
        args.out_dir = f"{os.path.normpath(args.out_dir)}.tmp{os.getpid()}"
    atexit.register(shutil.rmtree, args.out_dir, ignore_errors=True)
    os.makedirs(args.out_dir)
    temp_cache = None
    if files and not args.cache_dir:  # a name .gitignore's data/*/*.tmp* covers
        temp_cache = tempfile.TemporaryDirectory(prefix="hf_cache.tmp", dir=args.out_dir)
    cache_dir = args.cache_dir or (temp_cache.name if temp_cache else None)
    source = (f"huggingface:{args.dataset}" if files is None else
              [p if is_url(p) else os.path.abspath(p) for p in args.input])
    meta = {"tokenizer": tok.spec, "vocab_size": tok.vocab_size,
            "source": source[0] if isinstance(source, list) and len(source) == 1 else source}
    meta.update((prepare_on_ray if args.engine == "ray" else prepare_locally)(files, args, tok, cache_dir))
    tokens.write_meta(args.out_dir, meta)
    if meta["val_tokens"] < args.min_val_tokens:
        print(f"warning: val holds only {meta['val_tokens']:,} tokens (wanted {args.min_val_tokens:,}, at most a tenth "
              f"of the {meta['train_documents'] + meta['val_documents']:,} documents): its loss is noisy. A bigger corpus, or --min_val_tokens lower to say it is fine")
    if temp_cache:
        temp_cache.cleanup()
    if is_url(final):
        publish_folder(args.out_dir, final)
        shutil.rmtree(os.path.dirname(args.out_dir), ignore_errors=True)
    else:
        replace_folder(args.out_dir, final)
    args.out_dir = final
    print(f"{'GPT-2 BPE' if tok.spec['kind'] == 'gpt2' else 'trained BPE ' + tok.spec['path']}, vocab size {tok.vocab_size:,}")
    for split in ("train", "val"):
        print(f"{split}: {meta[f'{split}_documents']:,} documents, {meta[f'{split}_tokens']:,} tokens, "
              f"{meta[f'{split}_bytes']:,} bytes")
    print(f"-> {args.out_dir}")
