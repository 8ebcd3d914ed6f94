"""
Trained byte-level BPE (tokenizer.py's "bpe" kind, train_tokenizer.py): lossless on any text, tiktoken
giving the same ids as the Hugging Face trainer's own encoder, special tokens only when asked,
deterministic training, one-line errors, uint32 token files past 65,535 ids, and a checkpoint that
decodes with its tokenizer untold. Hermetic: a tiny tokenizer is trained inside the tests.
"""
import gzip
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import HARD, assert_one_line_error, corpus_lines, run
from nanoforge import tokens
from nanoforge.errors import UserError
from nanoforge.tokenizer import (SPECIAL_TOKENS, _bytes_to_unicode, bpe_spec, load_bpe, load_tokenizer, save_bpe,
                       train_bpe)

from conftest import ROOT, SHAKESPEARE  # noqa: E402
ENV = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1")

def train_and_save(folder, vocab_size=400, pattern="gpt4"):
    ranks, hf = train_bpe(iter(corpus_lines()), vocab_size, pattern, progress=False)
    desc = save_bpe(str(folder), ranks, pattern)
    return load_bpe(str(folder), desc["sha256"]), hf, ranks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_and_save(tmp_path_factory.mktemp("bpe") / "tok")


def test_vocabulary_layout(trained):
    tok, _, ranks = trained
    assert tok.vocab_size == 400
    assert all(ranks[bytes([b])] == b for b in range(256))  # every byte is a token: nothing is unknown
    assert list(tok.special_tokens) == SPECIAL_TOKENS
    assert sorted(tok.special_tokens.values()) == list(range(400 - len(SPECIAL_TOKENS), 400))
    assert tok.eot_id == tok.special_tokens["<|endoftext|>"]
    token_bytes = tok.token_bytes()
    assert len(token_bytes) == 400 and all(token_bytes[i] == 0 for i in tok.special_tokens.values())
    text = "ROMEO: café 🦊"
    assert sum(token_bytes[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


@pytest.mark.parametrize("text", HARD)
def test_lossless_on_hard_text(trained, text):
    tok = trained[0]
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_lossless_on_any_text(trained, text):
    tok = trained[0]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_tiktoken_gives_the_trainers_ids(tmp_path, pattern):
    """The conversion to tiktoken ranks keeps the merge order: both encoders cut the same tokens."""
    tok, hf, ranks = train_and_save(tmp_path / pattern, 600, pattern)
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    with open(SHAKESPEARE, encoding="utf-8") as f:
        unseen = f.read()[-30_000:]  # held-out text, plus the hard cases
    for text in [unseen] + [t for t in HARD if "<|" not in t]:  # HF's encoder always matches specials
        theirs = [ranks[bytes(to_byte[c] for c in t)] for t in hf.encode(text).tokens]
        assert tok.encode(text) == theirs


def test_special_tokens_only_when_asked(trained):
    tok = trained[0]
    text = "end<|endoftext|>then <|user|>hi<|end|>"
    ordinary = tok.encode(text)
    assert not set(ordinary) & set(tok.special_tokens.values())
    asked = tok.encode(text, allow_special=True)
    assert [i for i in asked if i in tok.special_tokens.values()] == \
        [tok.special_tokens[s] for s in ("<|endoftext|>", "<|user|>", "<|end|>")]
    assert tok.decode(asked) == text


def test_one_interface_for_all_kinds():
    """The same attributes on the three kinds; GPT-2's end-of-text also only when asked."""
    gpt2 = load_tokenizer({"kind": "gpt2"})
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.encode("a<|endoftext|>", allow_special=True)[-1] == 50256
    assert 50256 not in gpt2.encode("a<|endoftext|>")
    char = load_tokenizer({"kind": "char", "chars": "ab"})
    assert char.special_tokens == {} and char.eot_id is None and char.encode("ab", allow_special=True) == [0, 1]


def test_training_is_deterministic(tmp_path, trained):
    again, _, _ = train_and_save(tmp_path / "again")
    a, b = trained[0].spec, again.spec
    assert a["sha256"] == b["sha256"]
    for name in ("ranks.tiktoken", "tokenizer.json"):
        with open(os.path.join(a["path"], name), "rb") as f, open(os.path.join(b["path"], name), "rb") as g:
            assert f.read() == g.read(), name


def test_vocab_size_too_small():
    with pytest.raises(UserError, match="at least 261"):
        train_bpe(iter(["some text"]), 260, progress=False)


def test_spec_records_folder_and_fingerprint(trained, tmp_path):
    tok = trained[0]
    again = load_tokenizer(tok.spec)
    assert again.spec == tok.spec and again.encode("ROMEO: hi") == tok.encode("ROMEO: hi")
    assert bpe_spec(os.path.join(ROOT, "tokenizers", "x"), "h")["path"] == os.path.join("tokenizers", "x")
    # moved away: a clear error naming the folder
    moved = shutil.copytree(tok.spec["path"], tmp_path / "moved")
    gone = dict(tok.spec, path=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="missing.*not found"):
        load_tokenizer(gone)
    # edited: its fingerprint no longer matches what the data and checkpoint were made with
    with open(moved / "ranks.tiktoken", "ab") as f:
        f.write(b"IUA= 400\n")
    with pytest.raises(UserError, match="has changed"):
        load_tokenizer(dict(tok.spec, path=str(moved)))


# ------------------------------------------------------------------------------------------------------
# the scripts, run as a user runs them

def run_script(script, *args):
    return run(script, *args, check=False, env=ENV)


def test_train_tokenizer_script_on_jsonl_gz(tmp_path):
    docs = [line for line in corpus_lines()[:3000]]
    docs = ["".join(docs[i:i + 30]) for i in range(0, len(docs), 30)] + HARD[:6]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    out = tmp_path / "tok"
    proc = run_script("train_tokenizer.py", f"--input={path}", "--text_field=body", "--vocab_size=512", f"--out={out}",
               "--progress=False")
    assert proc.returncode == 0, proc.stderr
    assert "bytes/token" in proc.stdout and "GPT-2" in proc.stdout
    with open(out / "tokenizer.json") as f:
        info = json.load(f)
    n_held = int(len(docs) * 0.1)
    assert info["trained_on"]["heldout_units"] == n_held and info["trained_on"]["train_units"] == len(docs) - n_held
    assert info["vocab_size"] == 512 and info["special_tokens"]["<|endoftext|>"] == 512 - len(SPECIAL_TOKENS)
    tok = load_bpe(str(out))
    assert all(tok.decode(tok.encode(d)) == d for d in docs)


def test_train_tokenizer_script_on_a_folder_with_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": HARD * 3}), folder / "sub" / "docs.parquet")
    (folder / "lines.txt").write_text("".join(corpus_lines()[:200]), encoding="utf-8")
    (folder / "logo.png").write_bytes(b"\x89PNG\0")  # not a kind of text: skipped
    proc = run_script("train_tokenizer.py", f"--input={folder}", "--vocab_size=300", f"--out={tmp_path / 'tok'}",
               "--progress=False")
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "tok" / "tokenizer.json") as f:
        stats = json.load(f)["trained_on"]
    assert stats["train_units"] + stats["heldout_units"] == 200 + 3 * len(HARD)


def test_train_tokenizer_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_one_line_error(run_script("train_tokenizer.py", f"--input={empty}", f"--out={tmp_path / 'a'}"), "empty")
    assert_one_line_error(run_script("train_tokenizer.py", f"--input={SHAKESPEARE}", "--vocab_size=100",
                              f"--out={tmp_path / 'b'}"), "at least 261")
    assert_one_line_error(run_script("train_tokenizer.py", f"--input={tmp_path / 'nope'}", f"--out={tmp_path / 'c'}"),
                          "not found")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": "fine"}\n{"text": 42}\n')
    assert_one_line_error(run_script("train_tokenizer.py", f"--input={numbers}", f"--out={tmp_path / 'd'}"),
                          "line 2", "not text")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_documents_corpus_with_trained_tokenizer(trained, tmp_path):
    """data/your_text/prepare.py: documents end in the trained vocabulary's end-of-text token."""
    tok = trained[0]
    docs = ["First document.", "سلام دنیا", "a literal <|endoftext|> stays text", "🦊\tcode  here\n"] * 3
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    env_args = (f"--input={path}", f"--tokenizer={tok.spec['path']}", "--num_proc=1", f"--out_dir={tmp_path / 'out'}")
    run("data/your_text/prepare.py", *env_args,
        env=dict(ENV, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf")))
    meta = tokens.read_meta(str(tmp_path / "out"))
    assert meta["tokenizer"] == tok.spec
    found = []
    for split in ("train", "val"):
        ids = np.asarray(tokens.open_tokens(tokens.split_path(str(tmp_path / "out"), split)), dtype=np.int64)
        ends = np.flatnonzero(ids == tok.eot_id)
        assert ends[-1] == len(ids) - 1
        found += [tok.decode(d[:-1].tolist()) for d in np.split(ids, ends + 1)[:-1]]
    assert sorted(found) == sorted(docs)
    proc = run_script("data/your_text/prepare.py", f"--input={path}", "--tokenizer=char", f"--out_dir={tmp_path / 'x'}")
    assert_one_line_error(proc, "end-of-text")


def test_uint32_tokens_end_to_end(tmp_path):
    """A vocabulary past 65,535 ids writes 4-byte tokens that read back to the text. The vocabulary is
    fake (70,000 tokens that never occur, then letter pairs), so ids above 65,535 are certain."""
    letters = b"abcdefghijklmnopqrstuvwxyz "
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(70_000):
        ranks[b"\xff\xff" + i.to_bytes(3, "big")] = len(ranks)  # 0xff never occurs in UTF-8
    for a in letters:
        for b in letters:
            ranks[bytes([a, b])] = len(ranks)
    folder = tmp_path / "big"
    save_bpe(str(folder), ranks, "gpt2")
    text = "to be or not to be, that is the question: ünïcödé 🦊\n" * 50
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    proc = run_script("data/shakespeare/prepare.py", f"--input={tmp_path / 'input.txt'}", f"--tokenizer={folder}",
               f"--out_dir={tmp_path / 'data'}")
    assert proc.returncode == 0, proc.stderr
    meta = tokens.read_meta(str(tmp_path / "data"))
    assert meta["vocab_size"] == len(ranks) + len(SPECIAL_TOKENS) and meta["tokenizer"]["kind"] == "bpe"
    tok = load_tokenizer(meta["tokenizer"])
    ids = [np.asarray(tokens.open_tokens(tokens.split_path(str(tmp_path / "data"), s))) for s in ("train", "val")]
    assert all(i.dtype == np.uint32 for i in ids) and max(i.max() for i in ids) > 65_535
    assert tok.decode(np.concatenate(ids).tolist()) == text


@pytest.mark.slow
def test_checkpoint_decodes_with_its_trained_tokenizer(tmp_path):
    """prepare with a trained BPE -> train -> sample: sample.py finds the tokenizer from the checkpoint."""
    tok, _, _ = train_and_save(tmp_path / "tok", 300)
    (tmp_path / "input.txt").write_text("".join(corpus_lines()[:2000]), encoding="utf-8")
    data = tmp_path / "data"
    proc = run_script("data/shakespeare_char/prepare.py", f"--input={tmp_path / 'input.txt'}",
               f"--tokenizer={tmp_path / 'tok'}", f"--out_dir={data}")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    proc = run_script("train.py", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32",
               "--block_size=32", "--batch_size=4", "--eval_iters=2", "--max_iters=4", "--eval_interval=4",
               "--warmup_iters=1", "--lr_decay_iters=4", "--plot=False", f"--data_dir={data}", f"--out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [json.loads(line) for line in open(out / "log.jsonl") if "val_bpb" in line]
    assert evals and all(r["val_bpb"] > 0 for r in evals)
    proc = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO: سلام", "--num_samples=1", "--max_new_tokens=20",
               "--device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ROMEO: سلام")
    shutil.rmtree(tmp_path / "tok")  # the tokenizer folder is gone: one line saying which
    assert_one_line_error(run_script("sample.py", f"--out_dir={out}", "--device=cpu"), str(tmp_path / "tok"), "not found")
