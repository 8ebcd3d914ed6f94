"""
Tiny Shakespeare at the character level, as in nanoGPT's data/shakespeare_char: the vocabulary is the
sorted set of characters in the text (65 of them), the first 90% of the text is train, the rest val.

    python data/shakespeare_char/prepare.py                    # finds input.txt, or downloads it
    python data/shakespeare_char/prepare.py --input=PATH --out_dir=DIR
    python data/shakespeare_char/prepare.py --tokenizer=tokenizers/mytok --out_dir=DIR   # a trained BPE

--tokenizer is char, gpt2 or a folder written by train_tokenizer.py (default here: char); the rest is
the same for all three (nanoforge.corpus.prepare_text_dataset).

The text comes from --input, else data/shakespeare_char/input.txt, else ../shared/data/tinyshakespeare/
input.txt beside the repo, else the char-rnn URL (saved as data/shakespeare_char/input.txt). Writes
train.bin, val.bin and meta.json (see tokens.py). Expected: vocab 65, 1,003,854 train and 111,540 val
tokens, nanoGPT's numbers.
"""
import os

from nanoforge import errors
from nanoforge.corpus import prepare_text_dataset

errors.friendly_errors()
here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(os.path.dirname(here))
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
prepare_text_dataset(here, "character-level Tiny Shakespeare", "char", URL,
                     os.path.join(repo, "..", "shared", "data", "tinyshakespeare", "input.txt"))
