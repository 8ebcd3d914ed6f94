"""
Tiny Shakespeare in GPT-2's BPE, as in nanoGPT's data/shakespeare: the first 90% of the characters are
train, the rest val, each encoded as ordinary text (no end-of-text tokens).

    python data/shakespeare/prepare.py                         # finds input.txt, or downloads it
    python data/shakespeare/prepare.py --input=PATH --out_dir=DIR

The text comes from --input, else data/shakespeare/input.txt, else ../shared/data/tinyshakespeare/
input.txt beside the repo, else the char-rnn URL (saved as data/shakespeare/input.txt). Offline, the
GPT-2 BPE files need TIKTOKEN_CACHE_DIR=../shared/assets/tiktoken_cache. Writes train.bin, val.bin and
meta.json (see tokens.py). Expected: 301,966 train and 36,059 val tokens, nanoGPT's numbers.
"""
import argparse
import hashlib
import os
import sys
import urllib.request

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
sys.path.insert(0, repo)  # run from anywhere: the library modules live at the repo root
import runtime  # noqa: E402
import tokens  # noqa: E402
from runtime import UserError  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

runtime.friendly_errors()
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
parser = argparse.ArgumentParser(description="Prepare Tiny Shakespeare in GPT-2 BPE tokens.")
parser.add_argument("--input", help="path of the text (default: input.txt here, the shared copy, or download)")
parser.add_argument("--out_dir", default=here, help="where train.bin, val.bin, meta.json go (default: %(default)s)")
args = parser.parse_args()
tok = load_tokenizer({"kind": "gpt2"})  # first, so a missing BPE cache fails before any download

# ------------------------------------------------------------------------------------------------------
# the text: read as bytes and decoded, so no newline translation happens and decoding gives it back exactly

local = os.path.join(here, "input.txt")
shared = os.path.normpath(os.path.join(repo, "..", "shared", "data", "tinyshakespeare", "input.txt"))
source = args.input or next((p for p in (local, shared) if os.path.exists(p)), URL)
if source == URL:
    print(f"downloading {URL}")
    try:
        with urllib.request.urlopen(URL, timeout=30) as response:
            raw = response.read()
    except OSError as e:  # urllib's URLError and timeouts are OSErrors
        raise UserError(f"could not download {URL} ({e}); offline? pass --input=PATH to a copy of "
                        f"Tiny Shakespeare") from None
    with runtime.atomic_path(local) as tmp, open(tmp, "wb") as f:
        f.write(raw)  # kept, so the next run needs no network
else:
    if not os.path.isfile(source):
        raise UserError(f"input file {source} not found")
    source = os.path.abspath(source)
    with open(source, "rb") as f:
        raw = f.read()
try:
    text = raw.decode("utf-8")
except UnicodeDecodeError as e:
    raise UserError(f"{source} is not UTF-8 text ({e})") from None
if not text:
    raise UserError(f"{source} is empty; pass --input=PATH to a text file")

# ------------------------------------------------------------------------------------------------------
# 90/10 split by character position, GPT-2 BPE, token files

n = int(len(text) * 0.9)
splits = {"train": text[:n], "val": text[n:]}
if not splits["train"] or not splits["val"]:
    raise UserError(f"{source} holds only {len(text)} characters: too little for a train/val split")
os.makedirs(args.out_dir, exist_ok=True)
meta = {"tokenizer": tok.spec, "vocab_size": tok.vocab_size, "source": source,
        "sha256": hashlib.sha256(raw).hexdigest()}
for split, part in splits.items():
    ids = tok.encode(part)
    tokens.write_tokens(tokens.split_path(args.out_dir, split), ids, tok.vocab_size)
    meta[f"{split}_tokens"] = len(ids)
    meta[f"{split}_bytes"] = len(part.encode("utf-8"))
tokens.write_meta(args.out_dir, meta)
print(f"GPT-2 BPE, vocab size {tok.vocab_size:,}")
print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens -> {args.out_dir}")
