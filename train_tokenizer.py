"""
Trains a tokenizer on your own corpus and writes it as a folder (see tokenizer.py for the files): a
byte-level BPE (GPT-2's kind, encoded with tiktoken; the default) or, with --kind=unigram, the Unigram model
SentencePiece uses, over the same bytes, so it too is lossless on any script. The last 10% of the
documents (lines, for .txt) are held out; on them it prints the bytes per token it buys, beside GPT-2's
(and writes them to report.json in the folder).

$ python train_tokenizer.py --input=corpus.txt --vocab_size=8192 --out=tokenizers/mytok
$ python train_tokenizer.py --input=corpus.txt --vocab_size=8192 --kind=unigram --out=tokenizers/myuni
$ python train_tokenizer.py --input=web.jsonl.gz --text_field=text --pattern=gpt2 --out=tokenizers/web
$ python data/shakespeare/prepare.py --tokenizer=tokenizers/mytok --out_dir=data/shakespeare_mytok

--input is a text file (.txt, .md, .py, ...: one unit per line), a .jsonl / .jsonl.gz / .parquet file (one document per
record, in --text_field), or a folder searched recursively for them. Files are streamed, twice (count,
then train), so the corpus is never held in memory whole; the held-out part is. vocab_size counts the
256 single bytes, the merges and the special tokens (tokenizer.SPECIAL_TOKENS). Training is the Hugging
Face `tokenizers` library (deterministic: the same corpus and settings give the same files).
"""
import os
import sys
import time

from configurator import configure, knobs
from nanoforge import errors
from nanoforge.files import write_json
from nanoforge.corpus import builder_of, find_files, jsonl_records, parse_ext
from nanoforge.errors import UserError
from nanoforge.tokenizer import (PATTERNS, SPECIAL_TOKENS, gpt2_encoding, load_bpe, load_unigram, save_bpe, save_unigram,
                                 train_bpe, train_unigram)

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
input = ""  # a file or folder: text, code or markup files (.txt, .md, .py, ...), .jsonl, .jsonl.gz, .parquet
ext = ""  # the kinds of file taken from a folder, e.g. '.py,.md'; '' takes every kind
text_field = "text"  # the field holding the document in JSON lines / parquet
kind = "bpe"  # 'bpe' (byte-level BPE, GPT-2's kind) or 'unigram' (the Unigram model SentencePiece uses, over bytes)
vocab_size = 8192  # single bytes + merges + special tokens (unigram: every piece, the 256 bytes among them)
pattern = "gpt4"  # pre-tokenization split: 'gpt2', 'gpt4' (cl100k's), or a regex of your own
heldout_fraction = 0.1  # the last share of documents/lines, not trained on, for the bytes-per-token report
out = "tokenizers/mytok"
progress = True
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))
if not input:
    raise UserError("no corpus: pass --input=FILE or FOLDER (text, code or markup files, .jsonl, .jsonl.gz, .parquet)")
if not 0 <= heldout_fraction < 1:
    raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
if vocab_size < 256 + len(SPECIAL_TOKENS):
    raise UserError(f"vocab_size {vocab_size} is too small: 256 single bytes + {len(SPECIAL_TOKENS)} special "
                    f"tokens need at least {256 + len(SPECIAL_TOKENS)}")
if kind not in ("bpe", "unigram"):
    raise UserError(f"kind={kind!r}: use bpe (byte-level BPE) or unigram (SentencePiece's model, over bytes)")
if pattern not in PATTERNS and "(" not in pattern and "\\" not in pattern:  # a typo, not a regex
    raise UserError(f"pattern {pattern!r}: use gpt2, gpt4, or a regular expression")

# -----------------------------------------------------------------------------------------------------
# the corpus: files, then their units (a line of a .txt file, a document of the others), streamed


def units(path):
    """The strings of one file, in order."""
    if builder_of(path) == "text":
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": \r\n stays as written
            yield from f
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise UserError(f"{path} has no column {text_field!r}; its columns: {', '.join(pf.schema_arrow.names)}; "
                            f"pass --text_field=NAME")
        if str(pf.schema_arrow.field(text_field).type) not in ("string", "large_string"):
            raise UserError(f"column {text_field!r} of {path} holds {pf.schema_arrow.field(text_field).type}, not text; "
                            f"pass --text_field=NAME")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            yield from (t or "" for t in batch.column(0).to_pylist())
    else:
        for n, record in jsonl_records(path):
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path} line {n} has no field {text_field!r}; pass --text_field=NAME")
            value = record[text_field]
            if value is not None and not isinstance(value, str):
                raise UserError(f"{path} line {n}: field {text_field!r} holds {type(value).__name__}, not text; "
                                f"pass --text_field=NAME")
            yield value or ""


def corpus():
    for path in files:
        try:
            yield from units(path)
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e})") from None


files, found = find_files([input], parse_ext(ext))
print(found)
n_units = sum(1 for _ in corpus())  # a first pass, to know where the held-out tail begins
n_train = n_units - int(n_units * heldout_fraction)
t0 = time.time()
stats = {"train_units": n_train, "heldout_units": n_units - n_train, "train_bytes": 0, "train_chars": 0}
heldout = []


def training_texts(group=1 << 20):
    """The training units in batches of ~1M characters (the trainer's overhead is per item): lines of .txt
    files joined back into text, documents as a list of strings, which the trainer keeps apart (no merge
    is learned across two documents). The held-out tail is kept for the report."""
    piece, size = [], 0
    for i, text in enumerate(corpus()):
        if i >= n_train:
            heldout.append(text)
            continue
        stats["train_bytes"] += len(text.encode("utf-8"))
        stats["train_chars"] += len(text)
        piece.append(text)
        size += len(text)
        if size >= group:
            yield "".join(piece) if input_is_lines else piece
            piece, size = [], 0
    if piece:
        yield "".join(piece) if input_is_lines else piece


input_is_lines = all(builder_of(f) == "text" for f in files)
print(f"training a {vocab_size:,}-token byte-level {'BPE' if kind == 'bpe' else 'Unigram'} ({pattern} split) on "
      f"{n_train:,} of {n_units:,} {'lines' if input_is_lines else 'documents'} in {len(files)} file(s)")
if kind == "bpe":
    ranks, _ = train_bpe(training_texts(), vocab_size, pattern, SPECIAL_TOKENS, progress=progress)
else:
    unigram = train_unigram(training_texts(), vocab_size, pattern, SPECIAL_TOKENS, progress=progress)
seconds = time.time() - t0
if stats["train_bytes"] == 0:
    raise UserError(f"the corpus in {input} is empty: no text to train on")

# -----------------------------------------------------------------------------------------------------
# write the folder, reload it through tiktoken (as every user will), and report on the held-out text

heldout_text = "".join(heldout) if input_is_lines else heldout
info = {"trained_on": {"input": files if len(files) > 1 else files[0], "text_field": text_field,
                       "heldout_fraction": heldout_fraction, **stats},
        "settings": {"vocab_size": vocab_size, "pattern_name": pattern if pattern in PATTERNS else "custom",
                     "trainer": f"huggingface tokenizers {'BpeTrainer' if kind == 'bpe' else 'UnigramTrainer'}, byte-level"}}
if kind == "bpe":
    tok = load_bpe(os.path.abspath(out), save_bpe(out, ranks, pattern, SPECIAL_TOKENS, info)["sha256"])
else:
    tok = load_unigram(os.path.abspath(out), save_unigram(out, unigram, dict(info, pattern=PATTERNS.get(pattern, pattern)))["sha256"])
print(f"trained in {seconds:.1f} s ({stats['train_bytes'] / 1e6 / seconds:.2f} MB/s) -> {out} "
      f"(vocab {tok.vocab_size:,}, specials {tok.special_tokens})")
if tok.vocab_size < vocab_size:
    print(f"note: the corpus gave a vocabulary of {tok.vocab_size:,} tokens, not {vocab_size:,}")
docs = [heldout_text] if isinstance(heldout_text, str) else heldout_text
n_bytes = sum(len(d.encode("utf-8")) for d in docs)
report = {"kind": kind, "vocab_size": tok.vocab_size, "train_bytes": stats["train_bytes"], "train_seconds": round(seconds, 2),
          "heldout_bytes": n_bytes}
if n_bytes:
    mine = sum(len(tok.encode(d)) for d in docs)
    report.update(heldout_tokens=mine, bytes_per_token=n_bytes / mine)
    line = f"held-out {n_bytes:,} bytes: this tokenizer {n_bytes / mine:.3f} bytes/token ({mine:,} tokens)"
    try:
        gpt2 = gpt2_encoding()
        theirs = sum(len(gpt2.encode_ordinary(d)) for d in docs)
        report.update(gpt2_tokens=theirs, gpt2_bytes_per_token=n_bytes / theirs)
        line += f", GPT-2 {n_bytes / theirs:.3f} ({theirs:,} tokens, vocab {gpt2.n_vocab:,}): {theirs / mine:.1%} of GPT-2's compression"
    except UserError as e:
        line += f"; GPT-2 not compared ({e})"
    print(line)
else:
    print("no held-out text (heldout_fraction=0 or too small a corpus): no bytes-per-token report")
write_json(os.path.join(out, "report.json"), report)  # the numbers above, for the speedrun's report card
