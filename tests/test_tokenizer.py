"""
tokenizer.py: the character tokenizer, GPT-2's BPE through tiktoken from the shared offline cache, and
the errors when a tokenizer cannot be had.
"""
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from nanoforge.errors import UserError
from nanoforge.tokenizer import CharTokenizer, load_tokenizer


@pytest.fixture
def no_download(monkeypatch):
    """tiktoken with its in-process encoding registry emptied and downloads refused: the GPT-2 files
    must come from TIKTOKEN_CACHE_DIR. Returns the list of URLs tiktoken tried to fetch."""
    fetched = []

    def refuse(blobpath):
        fetched.append(blobpath)
        raise ConnectionError(f"no network in tests: {blobpath}")

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    return fetched


# ------------------------------------------------------------------------------------------------------
# characters

def test_char_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(set(text)) and max(ids) < tok.vocab_size
    assert tok.eot_id is None
    # the spec stored in meta.json and checkpoints rebuilds the same tokenizer
    again = load_tokenizer(tok.spec)
    assert again.encode(text) == ids


def test_char_unknown_character_is_named():
    tok = CharTokenizer("abc ")
    with pytest.raises(UserError, match="'z'"):
        tok.encode("a cz")


def test_char_token_bytes_count_utf8_bytes():
    tok = CharTokenizer("a\u00e9\u20ac\U0001F600")  # 1-, 2-, 3- and 4-byte characters
    assert tok.token_bytes() == [1, 2, 3, 4]
    text = "\u20aca\U0001F600\u00e9"
    assert sum(tok.token_bytes()[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------------
# GPT-2 BPE

def test_gpt2_from_offline_cache(no_download):
    tok = load_tokenizer({"kind": "gpt2"})
    ids = tok.encode("Hello world, I'm learning transformers.")
    assert ids == [15496, 995, 11, 314, 1101, 4673, 6121, 364, 13]
    assert tok.decode(ids) == "Hello world, I'm learning transformers."
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert tok.spec == {"kind": "gpt2"}
    assert no_download == []


def test_gpt2_endoftext_in_text_is_ordinary_text(no_download):
    tok = load_tokenizer({"kind": "gpt2"})
    ids = tok.encode("a story<|endoftext|>another")
    assert 50256 not in ids
    assert tok.decode(ids) == "a story<|endoftext|>another"


def test_gpt2_token_bytes(no_download):
    tok = load_tokenizer({"kind": "gpt2"})
    token_bytes = tok.token_bytes()
    assert len(token_bytes) == 50257
    assert token_bytes[50256] == 0  # the end-of-text token is no text
    text = "Hello world, caf\u00e9 \u20ac5."
    assert sum(token_bytes[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_unknown_tokenizer_kind():
    with pytest.raises(UserError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer({"kind": "sentencepiece"})
    with pytest.raises(UserError, match="unknown tokenizer kind None"):
        load_tokenizer({})


def test_gpt2_without_cache_or_network_is_a_user_error(no_download, tmp_path, monkeypatch):
    empty = tmp_path / "empty_cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    with pytest.raises(UserError, match="could not load the GPT-2 BPE") as e:
        load_tokenizer({"kind": "gpt2"})
    assert str(empty) in str(e.value)  # the message says which folder lacks the files
    assert no_download  # tiktoken did try to fetch (and was refused): the empty cache was used

    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(empty))  # tiktoken's default cache sits in the temp dir
    with pytest.raises(UserError, match="set TIKTOKEN_CACHE_DIR"):
        load_tokenizer({"kind": "gpt2"})
