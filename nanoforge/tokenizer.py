"""
Loading a tokenizer: the one place that turns a tokenizer description (stored in a dataset's meta.json
and in every checkpoint) into something that encodes and decodes.

    {"kind": "char", "chars": "\\n !$&',-.3:;?ABC..."}   a character vocabulary, id = index in chars
    {"kind": "gpt2"}                                     GPT-2's BPE, through tiktoken
    {"kind": "bpe", "path": "tokenizers/mytok",          a byte-level BPE trained by train_tokenizer.py,
     "sha256": "..."}                                    through tiktoken (path repo-relative or absolute)
    {"kind": "unigram", "path": ..., "sha256": ...}      a byte-level Unigram (SentencePiece's model) trained by
                                                         train_tokenizer.py --kind=unigram, through `tokenizers`
    any of these + "added": ["<|system|>", ...]          special tokens appended after the base vocabulary,
                                                         in order (chat fine-tuning adds its turn markers)

Every tokenizer offers: encode(text, allow_special=False) -> ids, decode(ids) -> text, vocab_size,
eot_id (None if it has no end-of-text token), special_tokens ({text: id}), and token_bytes() (UTF-8
bytes of each id, for bits-per-byte). Special tokens written in ordinary text stay ordinary text unless
encode is given allow_special=True: a document that quotes "<|endoftext|>" must not end itself.

A trained BPE folder holds two files, written by save_bpe:
    ranks.tiktoken   tiktoken's format: one line per token, base64 of its bytes, a space, its rank (= id);
                     ranks 0..255 are the single bytes, then merged tokens in the order they were learned
    tokenizer.json   pattern (the pre-tokenization regex), special_tokens {text: id}, vocab_size, the
                     training settings and corpus statistics, sha256 (of what encoding depends on)
Training uses the Hugging Face `tokenizers` library (imported only by train_bpe); using a trained
BPE needs tiktoken only. A Unigram folder holds unigram.json (the `tokenizers` file it encodes with)
instead of ranks.tiktoken, beside the same tokenizer.json.
"""
import base64
import hashlib
import json
import os
import re

from nanoforge.errors import UserError
from nanoforge.files import REPO, atomic_path, write_json



class CharTokenizer:
    """id = index in chars; special tokens (none, unless added for chat) take the ids after them."""

    def __init__(self, chars, added=()):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.special_tokens = {t: len(chars) + i for i, t in enumerate(added)}
        self.itos = list(chars) + list(added)
        self.vocab_size = len(self.itos)
        self.eot_id = self.special_tokens.get("<|endoftext|>")
        self.spec = {"kind": "char", "chars": chars}

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    def encode(self, text, allow_special=False):
        if allow_special and self.special_tokens:  # split out the special tokens, encode the text between
            pieces = re.split("(" + "|".join(map(re.escape, self.special_tokens)) + ")", text)
            return [i for p in pieces for i in ([self.special_tokens[p]] if p in self.special_tokens else self.encode(p))]
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UserError(f"characters not in this model's vocabulary: {''.join(unknown)!r}; "
                            f"the model knows only: {self.chars!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def token_bytes(self):
        return [len(c.encode("utf-8")) for c in self.chars] + [0] * len(self.special_tokens)


class TiktokenTokenizer:

    def __init__(self, encoding, spec):
        self.enc = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding._special_tokens.get("<|endoftext|>")
        self.special_tokens = dict(sorted(encoding._special_tokens.items(), key=lambda kv: kv[1]))  # by id
        self.spec = spec

    def encode(self, text, allow_special=False):
        # ordinary text by default: a literal "<|endoftext|>" in a document is text, not the special token
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self):
        special = set(self.enc._special_tokens.values())
        return [0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]


def gpt2_encoding():
    """tiktoken's GPT-2 encoding. tiktoken downloads the BPE files once and caches them; offline, point
    TIKTOKEN_CACHE_DIR at a folder that holds the cached files."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors of several kinds when offline
        where = os.environ.get("TIKTOKEN_CACHE_DIR")
        hint = (f"TIKTOKEN_CACHE_DIR={where} does not hold the GPT-2 files" if where else
                "offline? set TIKTOKEN_CACHE_DIR to a folder with tiktoken's cached GPT-2 files "
                "(here: ../shared/assets/tiktoken_cache)")
        raise UserError(f"could not load the GPT-2 BPE ({type(e).__name__}); {hint}") from None


# ------------------------------------------------------------------------------------------------------
# trained byte-level BPE

# The pre-tokenization split: BPE merges never cross these pieces. GPT-2's, and GPT-4's (cl100k), which
# keeps runs of digits to 3 and newlines apart from words. Both are understood alike by Hugging Face
# (Oniguruma) and tiktoken (fancy-regex); the tests hold the two encoders to the same ids.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
# End of text, then the turn markers the chat fine-tuning will need: <|system|>/<|user|>/<|assistant|>
# open a turn, <|end|> closes it. They take the ids after the merged tokens, in this order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
RANKS_FILE, INFO_FILE = "ranks.tiktoken", "tokenizer.json"


def _bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, which Hugging Face's byte-level BPE writes its
    tokens in: printable latin-1 bytes map to themselves, the other 68 to U+0100, U+0101, ... in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_bpe(texts, vocab_size, pattern="gpt4", special_tokens=SPECIAL_TOKENS, length=None, progress=True):
    """Trains a byte-level BPE on an iterator of strings with Hugging Face `tokenizers` and returns its
    merge ranks {token bytes: rank} in tiktoken's form. vocab_size counts the special tokens too."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 256 + len(special_tokens):
        raise UserError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs the 256 single bytes "
                        f"plus {len(special_tokens)} special tokens, so at least {256 + len(special_tokens)}")
    hf = Tokenizer(models.BPE())  # no unk token: every byte is in the vocabulary, so nothing is unknown
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS.get(pattern, pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # bytes -> GPT-2's characters
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    hf.train_from_iterator(texts, trainer, length=length)
    return hf_to_ranks(hf), hf


def hf_to_ranks(hf):
    """A Hugging Face byte-level BPE's merges as tiktoken ranks. tiktoken merges, in each piece, the adjacent
    pair whose concatenation has the lowest rank; Hugging Face, the pair learned first. The two agree when
    the single bytes come first and each merge's result takes the next rank in the order learned."""
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    model = json.loads(hf.to_str())["model"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in model["merges"]:  # ["a", "b"] pairs (older versions: "a b" strings)
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(decode[c] for c in left + right)
        if token in ranks:
            raise AssertionError(f"merge {merge} gives a token learned before: {token!r}")
        ranks[token] = len(ranks)
    n_special = sum(1 for t in hf.get_added_tokens_decoder().values() if t.special)
    assert len(ranks) + n_special == hf.get_vocab_size(), "Hugging Face vocabulary and merges disagree"
    return ranks


def _fingerprint(ranks_blob, pattern, special_tokens):
    """sha256 of all that encoding depends on: a checkpoint records it, so a changed folder is noticed."""
    h = hashlib.sha256(ranks_blob)
    h.update(json.dumps({"pattern": pattern, "special_tokens": special_tokens}, sort_keys=True).encode())
    return h.hexdigest()


def save_bpe(folder, ranks, pattern, special_tokens=SPECIAL_TOKENS, info=None):
    """Writes a trained BPE folder (ranks.tiktoken + tokenizer.json), each file atomically. Returns the
    description written to tokenizer.json."""
    pattern = PATTERNS.get(pattern, pattern)
    specials = {t: len(ranks) + i for i, t in enumerate(special_tokens)}  # after the merged tokens
    blob = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1])).encode()
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, RANKS_FILE)) as tmp, open(tmp, "wb") as f:
        f.write(blob)
    desc = dict(info or {}, pattern=pattern, special_tokens=specials, vocab_size=len(ranks) + len(specials),
                sha256=_fingerprint(blob, pattern, specials), format="nanoforge-bpe-1")
    write_json(os.path.join(folder, INFO_FILE), desc)
    return desc


def bpe_spec(folder, sha256, kind="bpe"):
    """The spec that meta.json and checkpoints record: the folder (relative to the repo when inside it, so
    the repo can move; absolute otherwise) and its fingerprint."""
    folder = os.path.abspath(folder)
    inside = os.path.commonpath([folder, REPO]) == REPO
    return {"kind": kind, "path": os.path.relpath(folder, REPO) if inside else folder, "sha256": sha256}


def load_bpe(folder, expected_sha256=None):
    """A trained BPE folder as a tokenizer, through tiktoken. A relative folder is relative to the repo."""
    import tiktoken
    where = folder if os.path.isabs(folder) else os.path.join(REPO, folder)
    info_path, ranks_path = os.path.join(where, INFO_FILE), os.path.join(where, RANKS_FILE)
    if not os.path.isfile(info_path) or not os.path.isfile(ranks_path):
        raise UserError(f"tokenizer folder {where} not found or incomplete (needs {INFO_FILE} and {RANKS_FILE}); "
                        f"train it with: python train_tokenizer.py --out={folder} ..., or put it back where it was")
    with open(info_path) as f:
        info = json.load(f)
    with open(ranks_path, "rb") as f:
        blob = f.read()
    sha256 = _fingerprint(blob, info["pattern"], info["special_tokens"])
    if sha256 != (expected_sha256 or info.get("sha256")):
        raise UserError(f"tokenizer folder {where} has changed since it was recorded (sha256 {sha256[:12]}, "
                        f"expected {(expected_sha256 or info.get('sha256'))[:12]}): retrain the data and model with "
                        f"it, or restore the original folder")
    ranks = {}
    for line in blob.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    enc = tiktoken.Encoding(f"nanoforge-bpe-{sha256[:12]}", pat_str=info["pattern"], mergeable_ranks=ranks,
                            special_tokens=info["special_tokens"])
    return TiktokenTokenizer(enc, bpe_spec(where, sha256))


# ------------------------------------------------------------------------------------------------------
# trained byte-level Unigram: the model SentencePiece uses (Kudo, 2018), over the same byte-level pieces as
# the BPE, so any text in any script encodes (nothing is unknown) and decodes back exactly

UNIGRAM_FILE = "unigram.json"


def byte_level_pipeline(hf, pattern):
    """The split by `pattern`, then each byte as a character of GPT-2's byte alphabet, and back."""
    from tokenizers import Regex, decoders, pre_tokenizers
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS.get(pattern, pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def train_unigram(texts, vocab_size, pattern="gpt4", special_tokens=SPECIAL_TOKENS, length=None, progress=True):
    """Trains a Unigram language model with Hugging Face `tokenizers`: from a large set of candidate pieces it
    prunes, by EM, those whose loss hurts the corpus likelihood least, down to vocab_size (special tokens
    included). All 256 bytes stay in, so nothing is unknown. Returns the `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    hf = byte_level_pipeline(Tokenizer(models.Unigram()), pattern)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress,
                                      max_piece_length=16)
    hf.train_from_iterator(texts, trainer, length=length)
    return hf


class UnigramTokenizer:
    """A `tokenizers` Unigram with our interface. Two copies: one that knows the special tokens (encode with
    allow_special=True, decode) and one without them, so ordinary text that quotes "<|endoftext|>" stays text."""

    def __init__(self, hf, spec):
        from tokenizers import Tokenizer
        self.hf = hf
        plain = json.loads(hf.to_str())
        plain["added_tokens"] = []
        self.plain = Tokenizer.from_str(json.dumps(plain))
        self.vocab_size = hf.get_vocab_size()
        self.special_tokens = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
        self.eot_id = self.special_tokens.get("<|endoftext|>")
        self.spec = spec
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        vocab = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
        self._bytes = [b"" if t in self.special_tokens else bytes(to_byte[c] for c in t) for t, _ in vocab]

    def encode(self, text, allow_special=False):
        return (self.hf if allow_special else self.plain).encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids):
        return b"".join(self.piece_bytes(i) for i in ids)

    def piece_bytes(self, i):
        """The bytes token i stands for (a special token: its text)."""
        return self._bytes[i] or next(t for t, j in self.special_tokens.items() if j == i).encode()

    def token_bytes(self):
        return [len(b) for b in self._bytes]


def save_unigram(folder, hf, info=None):
    """Writes a Unigram folder (unigram.json + tokenizer.json), each file atomically; returns the description."""
    blob = hf.to_str().encode()
    specials = {t.content: i for i, t in sorted(hf.get_added_tokens_decoder().items()) if t.special}
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, UNIGRAM_FILE)) as tmp, open(tmp, "wb") as f:
        f.write(blob)
    desc = dict(info or {}, special_tokens=specials, vocab_size=hf.get_vocab_size(),
                sha256=hashlib.sha256(blob).hexdigest(), format="nanoforge-unigram-1")
    write_json(os.path.join(folder, INFO_FILE), desc)
    return desc


def load_unigram(folder, expected_sha256=None):
    from tokenizers import Tokenizer
    where = folder if os.path.isabs(folder) else os.path.join(REPO, folder)
    path = os.path.join(where, UNIGRAM_FILE)
    if not os.path.isfile(path):
        raise UserError(f"tokenizer folder {where} not found or incomplete (needs {UNIGRAM_FILE}); train it with: "
                        f"python train_tokenizer.py --kind=unigram --out={folder} ..., or put it back where it was")
    with open(path, "rb") as f:
        blob = f.read()
    sha256 = hashlib.sha256(blob).hexdigest()
    if expected_sha256 and sha256 != expected_sha256:
        raise UserError(f"tokenizer folder {where} has changed since it was recorded (sha256 {sha256[:12]}, "
                        f"expected {expected_sha256[:12]}): retrain the data and model with it, or restore the "
                        f"original folder")
    return UnigramTokenizer(Tokenizer.from_str(blob.decode()), bpe_spec(where, sha256, kind="unigram"))


def load_folder(folder, expected_sha256=None):
    """A folder train_tokenizer.py wrote, of either kind."""
    where = folder if os.path.isabs(folder) else os.path.join(REPO, folder)
    if os.path.isfile(os.path.join(where, UNIGRAM_FILE)):
        return load_unigram(folder, expected_sha256)
    return load_bpe(folder, expected_sha256)


def load_tokenizer(spec):
    """The tokenizer described by `spec` (from meta.json or a checkpoint)."""
    kind = spec.get("kind")
    if spec.get("added"):
        return with_special_tokens(load_tokenizer({k: v for k, v in spec.items() if k != "added"}), spec["added"])
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        return TiktokenTokenizer(gpt2_encoding(), {"kind": "gpt2"})
    if kind in ("bpe", "unigram"):
        tok = (load_bpe if kind == "bpe" else load_unigram)(spec["path"], spec["sha256"])
        tok.spec = dict(spec)  # as recorded, so a spec compares equal to the one it came from
        return tok
    raise UserError(f"unknown tokenizer kind {kind!r} (known: char, gpt2, bpe, unigram); was this data prepared by "
                    f"a newer nanoforge?")


def with_special_tokens(tok, tokens):
    """`tok` with those of `tokens` it lacks appended as special tokens, ids after its vocabulary, in order
    (a model using it needs as many new embedding rows: training.grow_vocab). Its spec records the additions,
    so a checkpoint reloads the same tokenizer. Returns tok itself when nothing is missing."""
    missing = [t for t in tokens if t not in tok.special_tokens]
    if not missing:
        return tok
    added = [*tok.spec.get("added", []), *missing]
    base = {k: v for k, v in tok.spec.items() if k != "added"}
    if isinstance(tok, CharTokenizer):
        out = CharTokenizer(tok.chars, [*tok.special_tokens, *missing])
    elif isinstance(tok, UnigramTokenizer):
        from tokenizers import AddedToken, Tokenizer
        hf = Tokenizer.from_str(tok.hf.to_str())
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])  # ids after the vocabulary
        out = UnigramTokenizer(hf, base)
    else:
        import tiktoken
        e = tok.enc
        specials = dict(e._special_tokens, **{t: tok.vocab_size + i for i, t in enumerate(missing)})
        out = TiktokenTokenizer(tiktoken.Encoding(f"{e.name}+{len(specials)}", pat_str=e._pat_str,
                                                  mergeable_ranks=e._mergeable_ranks, special_tokens=specials), base)
    out.spec = dict(base, added=added)
    return out


def token_bytes_of(tok, i):
    """The bytes token i stands for (a special token: its text)."""
    if hasattr(tok, "piece_bytes"):  # a Unigram
        return tok.piece_bytes(i)
    if hasattr(tok, "enc"):
        if i in tok.special_tokens.values():
            return next(t for t, j in tok.special_tokens.items() if j == i).encode()
        return tok.enc.decode_single_token_bytes(i)
    return tok.itos[i].encode("utf-8")


def tokenizer_from_arg(arg):
    """What a prepare script's --tokenizer names: 'gpt2', or a trained BPE or Unigram folder ('char' is the
    character vocabulary, which the script builds from its text)."""
    if arg == "gpt2":
        return load_tokenizer({"kind": "gpt2"})
    if os.path.isdir(arg):
        return load_folder(os.path.abspath(arg))
    raise UserError(f"--tokenizer={arg}: use char, gpt2, or a folder written by train_tokenizer.py (not found)")
