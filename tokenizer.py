"""
Loading a tokenizer: the one place that turns a tokenizer description (stored in a dataset's meta.json
and in every checkpoint) into something that encodes and decodes.

    {"kind": "char", "chars": "\\n !$&',-.3:;?ABC..."}   a character vocabulary, id = index in chars
    {"kind": "gpt2"}                                     GPT-2's BPE, through tiktoken

Every tokenizer offers: encode(text) -> ids, decode(ids) -> text, vocab_size, eot_id (None if it has
no end-of-text token), and token_bytes() (UTF-8 bytes of each id, for bits-per-byte).
"""
import os

from runtime import UserError


class CharTokenizer:

    def __init__(self, chars):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_id = None
        self.spec = {"kind": "char", "chars": chars}

    @classmethod
    def from_text(cls, text):
        return cls("".join(sorted(set(text))))

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise UserError(f"characters not in this model's vocabulary: {''.join(unknown)!r}; "
                            f"the model knows only: {self.chars!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self):
        return [len(c.encode("utf-8")) for c in self.chars]


class TiktokenTokenizer:

    def __init__(self, encoding, spec):
        self.enc = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token
        self.spec = spec

    def encode(self, text):
        # ordinary text only: a literal "<|endoftext|>" in a document is text, not the special token
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


def load_tokenizer(spec):
    """The tokenizer described by `spec` (from meta.json or a checkpoint)."""
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        return TiktokenTokenizer(gpt2_encoding(), {"kind": "gpt2"})
    raise UserError(f"unknown tokenizer kind {kind!r} (known: char, gpt2); was this data prepared by a newer nanoforge?")
