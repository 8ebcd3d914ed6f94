"""
Tiny Shakespeare at the character level, as in nanoGPT's data/shakespeare_char: the vocabulary is the
sorted set of characters in the text (65 of them), the first 90% of the text is train, the rest val.

    python data/shakespeare_char/prepare.py                    # finds input.txt, or downloads it
    python data/shakespeare_char/prepare.py --input=PATH --out_dir=DIR
    python data/shakespeare_char/prepare.py --tokenizer=tokenizers/mytok --out_dir=DIR   # a trained BPE

--tokenizer is char, gpt2 or a folder written by train_tokenizer.py (default here: char); the rest is
the same for all three (tokens.write_text_dataset).

The text comes from --input, else data/shakespeare_char/input.txt, else ../shared/data/tinyshakespeare/
input.txt beside the repo, else the char-rnn URL (saved as data/shakespeare_char/input.txt). Writes
train.bin, val.bin and meta.json (see tokens.py). Expected: vocab 65, 1,003,854 train and 111,540 val
tokens, nanoGPT's numbers.
"""
import argparse
import hashlib
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
sys.path.insert(0, repo)  # run from anywhere: the library modules live at the repo root
import runtime  # noqa: E402
import tokens  # noqa: E402
from corpus import read_text  # noqa: E402
from tokenizer import CharTokenizer, tokenizer_from_arg  # noqa: E402

runtime.friendly_errors()
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
parser = argparse.ArgumentParser(description="Prepare character-level Tiny Shakespeare.")
parser.add_argument("--input", help="path of the text (default: input.txt here, the shared copy, or download)")
parser.add_argument("--out_dir", default=here, help="where train.bin, val.bin, meta.json go (default: %(default)s)")
parser.add_argument("--tokenizer", default="char",
                    help="char, gpt2, or a folder written by train_tokenizer.py (default: %(default)s)")
args = parser.parse_args()
# first, so a missing BPE cache or tokenizer folder fails before any download
tok = None if args.tokenizer == "char" else tokenizer_from_arg(args.tokenizer)

shared = os.path.normpath(os.path.join(repo, "..", "shared", "data", "tinyshakespeare", "input.txt"))
local = os.path.join(here, "input.txt")
text, raw, source = read_text(args.input, [local, shared], URL, save_to=local)

# ------------------------------------------------------------------------------------------------------
# the tokenizer (a character vocabulary is built from the text), 90/10 split by position, token files

if tok is None:
    tok = CharTokenizer.from_text(text)
meta = tokens.write_text_dataset(args.out_dir, text, tok, source, hashlib.sha256(raw).hexdigest())
if tok.spec["kind"] == "char":
    print(f"characters, vocab size {tok.vocab_size}: {''.join(tok.chars)!r}")
else:
    print(f"{'GPT-2 BPE' if tok.spec['kind'] == 'gpt2' else 'trained BPE ' + tok.spec['path']}, vocab size {tok.vocab_size:,}")
print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens -> {args.out_dir}")
