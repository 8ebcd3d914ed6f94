"""
TinyStories (Eldan & Li, 2023): short English stories in the words a young child knows, the corpus the
tour (docs/TOUR.md) trains its small model on. Each story is encoded as ordinary text and ends with the
end-of-text token, so the model learns where a story stops; the last 10% of the stories are val.

    python train_tokenizer.py --input=data/tinystories/input.txt --vocab_size=2048 --out=tokenizers/tinystories
    python data/tinystories/prepare.py --tokenizer=tokenizers/tinystories
    python data/tinystories/prepare.py --input=PATH --tokenizer=gpt2 --out_dir=DIR

The text comes from --input, else data/tinystories/input.txt, else ../shared/data/tinystories/
tinystories_valid_head.txt beside the repo (the first ~794 KB of the validation split), else the
Hugging Face hub's roneneldan/TinyStories validation file (~19 MB, saved as data/tinystories/input.txt;
its training file, TinyStories-train.txt, 1.9 GB, is the same format: pass it with --input). Stories are
separated by <|endoftext|> lines (the hub's files) or blank lines (the shared head). --tokenizer is
gpt2 or a folder written by train_tokenizer.py (it needs an end-of-text token). Writes train.bin, val.bin
and meta.json (see tokens.py).
"""
import argparse
import hashlib
import os

from nanoforge import errors, tokens
from nanoforge.corpus import read_text, split_stories
from nanoforge.errors import UserError
from nanoforge.tokenizer import tokenizer_from_arg

errors.friendly_errors()
here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"
parser = argparse.ArgumentParser(description="Prepare TinyStories in BPE tokens, one end-of-text after each story.")
parser.add_argument("--input", help="path of the text (default: input.txt here, the shared head, or download)")
parser.add_argument("--out_dir", default=here, help="where train.bin, val.bin, meta.json go (default: %(default)s)")
parser.add_argument("--tokenizer", default="tokenizers/tinystories",
                    help="gpt2, or a folder written by train_tokenizer.py (default: %(default)s)")
parser.add_argument("--val_fraction", type=float, default=0.1, help="share of the stories held out (the last ones)")
args = parser.parse_args()
if args.tokenizer != "gpt2" and not os.path.isdir(args.tokenizer) and not os.path.isabs(args.tokenizer):
    args.tokenizer = os.path.join(repo, args.tokenizer)  # the default names a folder inside the repo
tok = tokenizer_from_arg(args.tokenizer)  # first, so a missing tokenizer fails before any download
if tok.eot_id is None:
    raise UserError(f"the tokenizer {args.tokenizer} has no <|endoftext|> token to end each story with")

shared = os.path.normpath(os.path.join(repo, "..", "shared", "data", "tinystories", "tinystories_valid_head.txt"))
local = os.path.join(here, "input.txt")
text, raw, source = read_text(args.input, [local, shared], URL, save_to=local)

# ------------------------------------------------------------------------------------------------------
# stories, the split by story (a story is never cut in two), token files

stories = split_stories(text)
n_val = max(1, int(len(stories) * args.val_fraction))
if len(stories) < 2:
    raise UserError(f"{source} holds {len(stories)} story: too little for a train/val split")
os.makedirs(args.out_dir, exist_ok=True)
meta = {"tokenizer": tok.spec, "vocab_size": tok.vocab_size, "source": source, "sha256": hashlib.sha256(raw).hexdigest()}
for split, part in (("train", stories[:-n_val]), ("val", stories[-n_val:])):
    ids = [i for story in part for i in tok.encode(story) + [tok.eot_id]]
    tokens.write_tokens(tokens.split_path(args.out_dir, split), ids, tok.vocab_size)
    meta[f"{split}_tokens"], meta[f"{split}_stories"] = len(ids), len(part)
    meta[f"{split}_bytes"] = sum(len(s.encode("utf-8")) for s in part)
tokens.write_meta(args.out_dir, meta)
print(f"{'GPT-2 BPE' if tok.spec['kind'] == 'gpt2' else 'trained BPE ' + tok.spec['path']}, vocab {tok.vocab_size:,}: "
      f"train {meta['train_tokens']:,} tokens ({meta['train_stories']:,} stories), val {meta['val_tokens']:,} tokens "
      f"({meta['val_stories']:,} stories) -> {args.out_dir}")
