"""
export.py: a nanoforge model written as a Hugging Face GPT-2 folder gives the same logits in transformers;
GPT-2's tokenizer (with added chat tokens) is written too; what GPT-2 cannot express is refused clearly.
"""
import json
import os

import pytest
import torch

from model import GPT, GPTConfig
from nanoforge import chat_template
from nanoforge.checkpoint import save_checkpoint
from conftest import assert_one_line_error, run
from nanoforge.tokenizer import CharTokenizer, load_tokenizer


def make_run(folder, tok, **kw):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, **kw))
    for p in model.parameters():  # non-zero biases and gains, so a wrong mapping of any of them shows
        torch.nn.init.normal_(p, std=0.1)
    save_checkpoint(os.path.join(folder, "ckpt.pt"), model, {"tokenizer": tok.spec})
    return model.eval()


def hf_logits_match(model, dest, vocab_size):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(dest).eval()
    idx = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx, idx)[0], hf(idx).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.slow
def test_export_gpt2_chat_model_round_trips_logits_and_tokenizer(tmp_path):
    tok = chat_template.chat_tokenizer(load_tokenizer({"kind": "gpt2"}))
    model = make_run(tmp_path, tok, bias=False)  # no biases: written as zeros
    dest = str(tmp_path / "hf")
    run("export.py", f"--out_dir={tmp_path}", "--to=hf", f"--dest={dest}")
    hf_logits_match(model, dest, tok.vocab_size)
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(dest)
    text = "Hello world, I'm learning transformers.<|user|>hi<|end|><|assistant|>"
    assert hf_tok(text)["input_ids"] == tok.encode(text, allow_special=True)


@pytest.mark.slow
def test_export_char_model_writes_weights_and_says_what_of_the_tokenizer(tmp_path):
    tok = CharTokenizer("abc \n")
    model = make_run(tmp_path, tok, bias=True)
    dest = str(tmp_path / "hf")
    proc = run("export.py", f"--out_dir={tmp_path}", f"--dest={dest}")
    assert "nanoforge_tokenizer.json" in proc.stdout and not os.path.exists(os.path.join(dest, "vocab.json"))
    with open(os.path.join(dest, "nanoforge_tokenizer.json")) as f:
        assert load_tokenizer(json.load(f)).encode("cab") == tok.encode("cab")
    hf_logits_match(model, dest, tok.vocab_size)
    # nothing is overwritten
    assert_one_line_error(run("export.py", f"--out_dir={tmp_path}", f"--dest={dest}", check=False), "already exists")


def test_export_refuses_architectures_gpt2_lacks(tmp_path):
    make_run(tmp_path, CharTokenizer("ab"), pos_emb="rope", mlp="relu2", tie_embeddings=False)
    proc = run("export.py", f"--out_dir={tmp_path}", f"--dest={tmp_path / 'hf'}", check=False)
    assert_one_line_error(proc, "pos_emb='rope'", "mlp='relu2'", "tie_embeddings=False", "not GPT-2's architecture")
    assert not os.path.exists(tmp_path / "hf")
