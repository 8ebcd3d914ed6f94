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
folder is built beside its place and renamed in when whole: a failed run leaves none, and an existing dataset
is replaced only with --overwrite.
With --shard_tokens=N the splits are written as shards of N tokens (train_000000.bin, ...), which
train.py reads as one split; the single-file layout is the default.
OpenWebText takes ~54 GB of cache; nanoGPT got ~9.0B train and ~4.4M val tokens from it.
"""
import argparse
import atexit
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
from nanoforge.corpus import (builder_of, curated_splits, find_files, input_error, is_url, load_hub, open_input,
                              parse_ext, reason, text_column)
from nanoforge.errors import UserError
from nanoforge.files import replace_folder
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


def sha256_files(paths):
    h = hashlib.sha256()
    for path in paths:
        with open_input(path) as f:  # a local file or a URL
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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
    if os.path.exists(os.path.join(args.out_dir, "meta.json")) and not args.overwrite:
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
    import datasets

    # --------------------------------------------------------------------------------------------------
    # the documents, as one Arrow-backed dataset with a 'text' column

    # built beside its place and renamed in when whole: a run that fails or is stopped leaves no half a dataset
    final, args.out_dir = args.out_dir, f"{os.path.normpath(args.out_dir)}.tmp{os.getpid()}"
    atexit.register(shutil.rmtree, args.out_dir, ignore_errors=True)
    os.makedirs(args.out_dir)
    temp_cache = None
    if files and not args.cache_dir:  # a name .gitignore's data/*/*.tmp* covers
        temp_cache = tempfile.TemporaryDirectory(prefix="hf_cache.tmp", dir=args.out_dir)
    cache_dir = args.cache_dir or (temp_cache.name if temp_cache else None)
    parts = []
    try:
        if files is None:
            source, sha256 = f"huggingface:{args.dataset}", None
            dset = load_hub(args.dataset, args.name, "train", cache_dir, args.num_proc)
            if len(dset):
                parts.append(("all", text_column(dset, args.text_field, f"dataset {args.dataset}")))
        else:
            inputs = [p if is_url(p) else os.path.abspath(p) for p in args.input]
            source, sha256 = inputs[0] if len(inputs) == 1 else inputs, sha256_files(files)
            groups = curated_splits(files) or {"all": files}  # curate.py's output keeps its held-out split
            for group, group_files in groups.items():
                for builder in dict.fromkeys(map(builder_of, group_files)):
                    paths = [f for f in group_files if builder_of(f) == builder]
                    options = {}
                    if builder == "text":
                        options["sample_by"] = "paragraph" if args.txt_split == "blank" else "document"
                    dset = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir,
                                                 num_proc=min(args.num_proc, len(paths)), **options)
                    if builder == "text" and args.txt_split == "blank":
                        # datasets splits on exactly "\n\n": drop the newlines left around a document, and empty ones
                        dset = dset.map(lambda b: {"text": [t.strip("\n") for t in b["text"] if t.strip("\n")]},
                                        batched=True, num_proc=min(args.num_proc, len(dset)) or None)
                    if len(dset):
                        where = paths[0] if len(paths) == 1 else f"the {builder} files ({paths[0]}, ...)"
                        parts.append((group, text_column(dset, "text" if builder == "text" else args.text_field, where)))
    except datasets.exceptions.DatasetGenerationError as e:  # a malformed JSON line, a file that is not UTF-8, ...
        raise input_error(reason(e), files or []) from None
    except StopIteration:  # datasets' JSON reader, on a compressed file with nothing inside
        raise UserError(f"could not read the input: no JSON lines in {paths[0]}") from None
    if not parts:
        raise UserError(f"no documents found in {', '.join(args.input) if args.input else args.dataset}")
    dset = datasets.concatenate_datasets([d for _, d in parts])

    # --------------------------------------------------------------------------------------------------
    # split by document, tokenize in parallel, write the token files a batch at a time

    if {g for g, _ in parts} == {"train", "val"}:  # curated shards: their split, not a random one
        splits = {k: datasets.concatenate_datasets([d for g, d in parts if g == group])
                  for k, group in (("train", "train"), ("test", "val"))}
        print(f"keeping the curated split: {len(splits['train']):,} train, {len(splits['test']):,} val documents")
    else:
        # a random --val_fraction of the documents, or more where needed for ~min_val_tokens (bytes a token
        # measured on the first 100 documents), but no more than a tenth for that: a val split of 2 tokens
        # scores nothing, and a small corpus still needs its training text
        sample = [t or "" for t in dset.select(range(min(100, len(dset))))["text"]]
        bytes_per_token = sum(len(t.encode("utf-8")) for t in sample) / max(1, sum(len(tok.encode(t)) for t in sample))
        sizes = pc.fill_null(pc.binary_length(dset.data.column("text")), 0).to_numpy()
        order = np.random.default_rng(args.seed).permutation(len(dset))
        enough = int(np.searchsorted(np.cumsum(sizes[order]), args.min_val_tokens * bytes_per_token)) + 1
        n_val = max(1, math.ceil(args.val_fraction * len(dset)), min(enough, len(dset) // 10))
        if n_val >= len(dset):
            raise UserError(f"only {len(dset)} document(s): too few to hold out {n_val} for val and train on the rest")
        splits = {"train": dset.select(np.sort(order[n_val:])), "test": dset.select(np.sort(order[:n_val]))}
    id_type = datasets.Value(np.dtype(tokens.token_dtype(tok.vocab_size)).name)  # uint16 for GPT-2: a small cache
    # Sequence, not List: List is new in datasets 4, pyproject.toml allows 2.19
    features = datasets.Features({"ids": datasets.Sequence(id_type), "bytes": datasets.Value("int64")})
    meta = {"tokenizer": tok.spec, "vocab_size": tok.vocab_size, "source": source, "sha256": sha256}
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
    tokens.write_meta(args.out_dir, meta)
    if meta["val_tokens"] < args.min_val_tokens:
        print(f"warning: val holds only {meta['val_tokens']:,} tokens (wanted {args.min_val_tokens:,}, at most a tenth "
              f"of the {len(dset):,} documents): its loss is noisy. A bigger corpus, or --min_val_tokens lower to say it is fine")
    if temp_cache:
        temp_cache.cleanup()
    replace_folder(args.out_dir, final)
    args.out_dir = final
    print(f"{'GPT-2 BPE' if tok.spec['kind'] == 'gpt2' else 'trained BPE ' + tok.spec['path']}, vocab size {tok.vocab_size:,}")
    for split in ("train", "val"):
        print(f"{split}: {meta[f'{split}_documents']:,} documents, {meta[f'{split}_tokens']:,} tokens, "
              f"{meta[f'{split}_bytes']:,} bytes")
    print(f"-> {args.out_dir}")
