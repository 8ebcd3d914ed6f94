"""
The Unigram tokenizer (SentencePiece's model, over bytes; tokenizer.py's "unigram" kind, train_tokenizer.py
--kind=unigram): lossless on any script, special tokens only when asked, scored against GPT-2 the way the
BPE is, through prepare -> train -> sample, exported as a tokenizer.json transformers encodes alike, and
refused for GGUF in one line.
"""
import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from conftest import HARD, assert_one_line_error, corpus_lines, run
from model import GPT, GPTConfig
from nanoforge import chat_template
from nanoforge.checkpoint import load_model, save_checkpoint
from nanoforge.tokenizer import SPECIAL_TOKENS, gpt2_encoding, load_tokenizer, tokenizer_from_arg, with_special_tokens


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    """train_tokenizer.py --kind=unigram on a .jsonl of Shakespeare and the hard texts, as a user runs it."""
    d = tmp_path_factory.mktemp("unigram")
    lines = corpus_lines()
    docs = ["".join(lines[i:i + 20]) for i in range(0, len(lines), 20)] + HARD[:6]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    proc = run("train_tokenizer.py", f"--input={d / 'docs.jsonl'}", "--kind=unigram", "--vocab_size=600",
               f"--out={d / 'tok'}", "--progress=False")
    return tokenizer_from_arg(str(d / "tok")), d, docs, proc.stdout


def test_folder_vocabulary_and_report(unigram):
    tok, d, docs, out = unigram
    assert tok.spec["kind"] == "unigram" and load_tokenizer(tok.spec).vocab_size == tok.vocab_size == 600
    assert list(tok.special_tokens) == SPECIAL_TOKENS and tok.eot_id == tok.special_tokens["<|endoftext|>"]
    assert "byte-level Unigram" in out
    report = json.load(open(d / "tok" / "report.json"))
    held = docs[len(docs) - int(len(docs) * 0.1):]  # the last tenth, held out as for the BPE
    n_bytes = sum(len(t.encode()) for t in held)
    assert report["kind"] == "unigram" and report["heldout_bytes"] == n_bytes
    assert report["bytes_per_token"] == n_bytes / sum(len(tok.encode(t)) for t in held)
    gpt2 = gpt2_encoding()
    assert report["gpt2_bytes_per_token"] == n_bytes / sum(len(gpt2.encode_ordinary(t)) for t in held)
    token_bytes = tok.token_bytes()
    text = "ROMEO: café 🦊"
    assert sum(token_bytes[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_lossless_on_any_text_and_the_hard_ones(unigram, text):
    tok = unigram[0]
    for t in (text, *HARD):
        assert tok.decode(tok.encode(t)) == t


def test_special_tokens_only_when_asked_and_chat_tokens_added(unigram):
    tok = unigram[0]
    text = "end <|endoftext|> here"
    assert tok.eot_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eot_id in tok.encode(text, allow_special=True)
    grown = with_special_tokens(tok, ["<|tool|>"])
    assert grown.vocab_size == 601 and grown.encode("a<|tool|>", allow_special=True)[-1] == 600
    assert load_tokenizer(grown.spec).encode("a<|tool|>", allow_special=True) == grown.encode("a<|tool|>", allow_special=True)


def test_exported_tokenizer_encodes_alike_in_transformers_and_gguf_is_refused(unigram, tmp_path):
    from transformers import AutoTokenizer
    tok = unigram[0]
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, bias=False,
                          pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model, {"tokenizer": tok.spec, "iter_num": 0})
    run("export.py", f"--out_dir={tmp_path}", f"--dest={tmp_path / 'hf'}")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in HARD:  # (transformers reads special tokens written in text as special, as allow_special does)
        assert theirs(text)["input_ids"] == tok.encode(text, allow_special=True), text
        assert theirs.decode(tok.encode(text)) == text
    messages = [{"role": "system", "content": "be terse"}, {"role": "user", "content": HARD[0]},
                {"role": "assistant", "content": HARD[3]}, {"role": "user", "content": HARD[4]}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered["input_ids"] == chat_template.render(tok, messages, add_generation_prompt=True)[0]
    back, spec, _ = load_model(str(tmp_path / "hf"))  # and the folder comes back with its tokenizer
    assert load_tokenizer(spec).encode(HARD[0]) == tok.encode(HARD[0])
    proc = run("export.py", f"--out_dir={tmp_path}", "--to=gguf", f"--dest={tmp_path / 'x.gguf'}", check=False)
    assert_one_line_error(proc, "Unigram tokenizer has no GGUF form")
    assert not os.path.exists(tmp_path / "x.gguf")


@pytest.mark.slow
def test_prepare_train_and_sample_with_a_unigram(unigram, tmp_path):
    tok, d, docs, _ = unigram
    data = tmp_path / "data"
    run("data/your_text/prepare.py", f"--input={d / 'docs.jsonl'}", f"--tokenizer={d / 'tok'}", "--num_proc=1",
        f"--out_dir={data}", env=dict(os.environ, HF_HOME=str(tmp_path / "hf")))
    out = tmp_path / "out"
    run("train.py", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--plot=False", f"--data_dir={data}",
        f"--out_dir={out}")
    sample = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=8")
    assert sample.stdout.startswith("ROMEO:")
    spec = load_model(str(out))[1]
    assert spec == tok.spec  # the checkpoint names the Unigram, and it already has the chat tokens
    assert chat_template.chat_tokenizer(load_tokenizer(spec)).vocab_size == tok.vocab_size
