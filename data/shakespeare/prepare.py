"""
Tiny Shakespeare in GPT-2's BPE, as in nanoGPT's data/shakespeare: the first 90% of the characters are
train, the rest val, each encoded as ordinary text (no end-of-text tokens).

    python data/shakespeare/prepare.py                         # finds input.txt, or downloads it
    python data/shakespeare/prepare.py --input=PATH --out_dir=DIR
    python data/shakespeare/prepare.py --tokenizer=tokenizers/mytok --out_dir=DIR   # a trained BPE

--tokenizer is char, gpt2 or a folder written by train_tokenizer.py (default here: gpt2); the rest is
the same for all three (nanoforge.corpus.prepare_text_dataset).

The text comes from --input, else data/shakespeare/input.txt, else ../shared/data/tinyshakespeare/
input.txt beside the repo, else the char-rnn URL (saved as data/shakespeare/input.txt). Offline, the
GPT-2 BPE files need TIKTOKEN_CACHE_DIR=../shared/assets/tiktoken_cache. Writes train.bin, val.bin and
meta.json (see tokens.py). Expected: 301,966 train and 36,059 val tokens, nanoGPT's numbers.
"""
import os

from nanoforge import errors
from nanoforge.corpus import prepare_text_dataset

errors.friendly_errors()
here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
prepare_text_dataset(here, "Tiny Shakespeare in GPT-2 BPE tokens", "gpt2", URL,
                     os.path.join(repo, "..", "shared", "data", "tinyshakespeare", "input.txt"))
