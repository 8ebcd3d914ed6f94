"""
export.py and the formats behind it: every architecture train.py builds opens in a stock transformers class
with the same logits and comes back unchanged; every tokenizer is written as a tokenizer.json that encodes,
decodes and renders chats as ours does; the GGUF holds the same weights (q8_0 within its rounding) and all
llama.cpp needs; what no stock class computes is refused in one line. Where llama.cpp's llama-completion is
on PATH (or in $LLAMA_CPP_BIN), its greedy text equals sample.py's.
"""
import json
import os
import socket
import subprocess

import numpy as np
import pytest
import torch

from conftest import SHAKESPEARE, assert_one_line_error, run
from model import GPT, GPTConfig
from nanoforge import chat_template, gguf_format, hf_format
from nanoforge.checkpoint import load_model, save_checkpoint
from nanoforge.errors import UserError
from nanoforge.tokenizer import CharTokenizer, load_bpe, load_tokenizer, save_bpe, train_bpe

MODERN = dict(pos_emb="rope", norm="rmsnorm", bias=False)
FAMILIES = {  # each stock class, and the settings that choose it
    "gpt2": dict(bias=True),
    "apertus": dict(MODERN, mlp="relu2", qk_norm=True),  # the quick start's block
    "arcee": dict(MODERN, mlp="relu2", tie_embeddings=False),
    "qwen3": dict(MODERN, mlp="swiglu", qk_norm=True),
    "llama": dict(MODERN, mlp="swiglu", tie_embeddings=False),
}
TEXTS = ["Hello world, I'm learning transformers. It's 2026: 1234567 items\n\n\n  x   \t y",
         "سلام دنیا! این یک آزمایش است.", "emoji 🤖🎉 and ünïcödé", "def f(x):\n    return x ** 2  # square\n\n",
         "   leading and trailing runs   ", "WE'LL SEE THEY'RE 'll"]


def tiny(vocab_size, std=0.1, **kw):
    """A small model with every weight drawn at random (gains too), so a wrong mapping of any of them shows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64, **kw))
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=std)
    return model.eval()


def make_run(folder, tok, std=0.1, **kw):
    model = tiny(tok.vocab_size, std, **kw)
    save_checkpoint(os.path.join(folder, "ckpt.pt"), model, {"tokenizer": tok.spec})
    return model


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_architecture_is_a_stock_class_with_our_logits_and_comes_back(kind, tmp_path):
    from transformers import AutoModelForCausalLM
    model = tiny(80, **FAMILIES[kind])
    hf, got = hf_format.to_hf(model, [0])
    assert got == kind and type(hf).__name__ == hf_format.HF_CLASS[kind]
    hf.save_pretrained(tmp_path)
    with open(tmp_path / hf_format.SPEC_FILE, "w") as f:
        json.dump({"kind": "char", "chars": "x"}, f)
    idx = torch.randint(0, 80, (2, 32), generator=torch.Generator().manual_seed(0))
    back, spec, _ = load_model(str(tmp_path))  # as sample.py, serve.py and finetune.py --init_from read it
    with torch.no_grad():
        ours = model(idx, idx)[0]
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(idx).logits
        again = back(idx, idx)[0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert torch.equal(ours, again) and back.config == model.config and spec == {"kind": "char", "chars": "x"}


@pytest.mark.parametrize("settings, named", [
    (dict(MODERN, mlp="gelu"), "mlp='gelu'"),  # the modern block with GPT-2's MLP
    (dict(MODERN, mlp="relu2", bias=True), "bias=True"),
    (dict(MODERN, mlp="relu2", logit_softcap=15.0), "logit_softcap=15.0"),
    (dict(qk_norm=True), "qk_norm=True"),  # GPT-2's block with one modern setting
    (dict(norm="layernorm", pos_emb="rope", mlp="relu2"), "norm='layernorm'"),
])
def test_what_no_stock_class_computes_is_refused_naming_the_setting_and_nearest_value(settings, named):
    with pytest.raises(UserError, match="nearest exportable value") as e:
        hf_format.family(GPTConfig(**settings))
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Every tokenizer kind, with the chat tokens fine-tuning adds: characters (of TEXTS), GPT-2's BPE, a trained BPE."""
    folder = tmp_path_factory.mktemp("bpe")
    ranks, _ = train_bpe(TEXTS * 20, 400, progress=False)
    save_bpe(str(folder), ranks, "gpt4")
    base = {"char": CharTokenizer.from_text("".join(TEXTS) + "it is terse"), "gpt2": load_tokenizer({"kind": "gpt2"}),
            "bpe": load_bpe(str(folder))}
    return {k: chat_template.chat_tokenizer(t) for k, t in base.items()}


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_every_tokenizer_travels_encoding_decoding_and_chatting_as_ours(kind, tokenizers, tmp_path):
    from transformers import AutoTokenizer
    tok = tokenizers[kind]
    hf_format.write_tokenizer(tok, str(tmp_path))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text) and hf.decode(ids) == text
    messages = [{"role": "system", "content": "it is terse."}, {"role": "user", "content": TEXTS[1]},
                {"role": "assistant", "content": TEXTS[2]}, {"role": "user", "content": TEXTS[3]}]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert rendered["input_ids"] == chat_template.render(tok, messages, add_generation_prompt=True)[0]
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == chat_template.JINJA  # as a string, where tools look for it
    with open(tmp_path / hf_format.SPEC_FILE) as f:  # and ours, for coming back
        spec = json.load(f)
    if kind == "bpe":
        spec["path"] = str(tmp_path / spec["path"])
    assert load_tokenizer(spec).encode(TEXTS[1]) == tok.encode(TEXTS[1])


@pytest.mark.slow
def test_quick_start_model_exports_greedy_as_sample_py_and_comes_back(tmp_path):
    """The README's promise: the folder loads with AutoModelForCausalLM + AutoTokenizer and continues greedily
    exactly as sample.py does; sample.py --init_from=folder reads it back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with open(SHAKESPEARE) as f:
        tok = CharTokenizer.from_text(f.read())
    model = make_run(tmp_path, tok, std=0.3, **FAMILIES["apertus"])
    dest = tmp_path / "hf"
    proc = run("export.py", f"--out_dir={tmp_path}", f"--dest={dest}")
    assert "ApertusForCausalLM" in proc.stdout
    hf, hf_tok = AutoModelForCausalLM.from_pretrained(dest), AutoTokenizer.from_pretrained(dest)
    prompt = "ROMEO:"
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)[0].tolist()
    ours = model.generate(torch.tensor([tok.encode(prompt)]), 24, temperature=0.0)[0].tolist()
    assert theirs == ours
    sampled = run("sample.py", f"--init_from={dest}", f"--start={prompt}", "--max_new_tokens=24", "--num_samples=1",
                  "--temperature=0", "--device=cpu", "--compile=False")
    assert tok.decode(ours) in sampled.stdout
    # nothing is overwritten
    assert_one_line_error(run("export.py", f"--out_dir={tmp_path}", f"--dest={dest}", check=False), "already exists")


def test_refusal_reaches_the_user_in_one_line_and_writes_nothing(tmp_path):
    make_run(tmp_path, CharTokenizer("ab"), **dict(MODERN, mlp="gelu"))
    proc = run("export.py", f"--out_dir={tmp_path}", f"--dest={tmp_path / 'hf'}", check=False)
    assert_one_line_error(proc, "mlp='gelu'", "nearest exportable value is mlp='relu2'")
    assert not os.path.exists(tmp_path / "hf")


# -----------------------------------------------------------------------------------------------------
# GGUF

def read_gguf(path):
    import gguf
    r = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in r.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_holds_the_weights_tokenizer_and_template_llama_cpp_reads(kind, tokenizers, tmp_path):
    import gguf
    tok = tokenizers["gpt2" if kind == "gpt2" else "bpe"]
    model = tiny(tok.vocab_size, **FAMILIES[kind])
    path = str(tmp_path / "m.gguf")
    arch = gguf_format.write(model, tok, path, "f32")
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == arch == gguf_format.ARCH[kind]
    assert fields[f"{arch}.context_length"] == 32 and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.feed_forward_length"] == hf_format.model_hidden(model.config)
    assert fields["tokenizer.ggml.pre"] == ("gpt-2" if kind == "gpt2" else "llama-bpe")
    assert fields["tokenizer.ggml.tokens"][tok.special_tokens["<|end|>"]] == "<|end|>"
    assert len(fields["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tok.special_tokens["<|end|>"]
    assert fields["tokenizer.chat_template"] == chat_template.JINJA
    if kind == "apertus":  # ggml's xIELU takes softplus of these; relu(x)^2 needs alpha_p = 1 and alpha_n = 0
        softplus = lambda a: np.log1p(np.exp(np.float32(a)))  # noqa: E731
        assert [softplus(fields[f"xielu.alpha_{s}"][0]) for s in "pn"] == [1.0, 0.0]
        assert fields["xielu.beta"][0] == 0.0
    expected = gguf_format.tensors(model)
    assert set(tensors) == set(expected)
    for name, t in tensors.items():  # gguf stores numpy's shape reversed
        assert np.array_equal(np.asarray(t.data).reshape(expected[name].shape), expected[name]), name
    # the token embedding is our wte, row for row (the layouts above are not all identity maps)
    assert np.array_equal(expected["token_embd.weight"], model.transformer.wte.weight.detach().numpy())
    assert gguf.GGMLQuantizationType(tensors["token_embd.weight"].tensor_type) == gguf.GGMLQuantizationType.F32


def test_gguf_q8_0_is_within_its_rounding_and_a_quarter_of_f32(tokenizers, tmp_path):
    import gguf
    tok = tokenizers["char"]
    model = tiny(tok.vocab_size, **FAMILIES["apertus"])
    sizes = {}
    for t in ("f32", "q8_0"):
        gguf_format.write(model, tok, str(tmp_path / f"{t}.gguf"), t)
        sizes[t] = os.path.getsize(tmp_path / f"{t}.gguf")
    _, tensors = read_gguf(str(tmp_path / "q8_0.gguf"))
    expected = gguf_format.tensors(model)
    for name, t in tensors.items():
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[name].shape)
            step = np.abs(expected[name]).reshape(-1, 32).max(1) / 127  # each block of 32: scale = max / 127
            # half a step, plus the f16 rounding of the stored scale (up to 127 x 2^-11 of a step)
            assert np.all(np.abs(got - expected[name]).reshape(-1, 32) <= step[:, None] * 0.57), name
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q8_0 for t in tensors.values())
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert sizes["q8_0"] - (sizes["f32"] - weights) < 0.35 * weights  # 34 bytes per 32 weights, plus f32 norms


@pytest.mark.slow
def test_export_to_gguf_writes_the_file_and_an_ollama_modelfile_beside_it(tokenizers, tmp_path):
    tok = tokenizers["char"]
    make_run(tmp_path, tok, **FAMILIES["apertus"])
    dest = tmp_path / "shop.gguf"
    assert_one_line_error(run("export.py", f"--out_dir={tmp_path}", "--to=gguf", f"--dest={dest}", "--gguf_type=q4",
                              check=False), "--gguf_type=q4", "q8_0")
    proc = run("export.py", f"--out_dir={tmp_path}", "--to=gguf", f"--dest={dest}", "--gguf_type=q8_0")
    assert "apertus" in proc.stdout and read_gguf(str(dest))[0]["general.architecture"] == "apertus"
    modelfile = (tmp_path / "shop.Modelfile").read_text()
    assert modelfile.startswith("FROM ./shop.gguf\n") and "<|{{ .Role }}|>{{ .Content }}<|end|>" in modelfile
    assert 'PARAMETER stop "<|end|>"' in modelfile
    dest.unlink()  # the Modelfile alone is still not overwritten
    assert_one_line_error(run("export.py", f"--out_dir={tmp_path}", "--to=gguf", f"--dest={dest}", check=False),
                          "shop.Modelfile already exists")


def test_gguf_character_vocabulary_joins_multi_byte_characters(tokenizers):
    tok = tokenizers["char"]
    tokens, types, merges, pre = gguf_format.vocabulary(tok, tok.vocab_size + 3)
    assert len(tokens) == tok.vocab_size + 3 and tokens[-1] == "[UNUSED2]"
    # 'ü' is two bytes (C3 BC): one merge joins them into its token; '🤖' is four: three merges, left to right
    assert tokens[tok.encode("ü")[0]] == "Ã¼" and "Ã ¼" in merges
    assert [m for m in merges if m.startswith("ðŁ¤")] == ["ðŁ¤ ĸ"]


def llama_completion():
    return gguf_format.llama_cpp_program("llama-completion")


def run_llama(args, **kw):
    """llama.cpp's tool run with args; once more if it printed nothing: llama-completion (0.3.36's vendor/)
    sometimes exits 0 while loading the model, with nothing on stdout (1 in 15 runs of the same command on an
    AMD Zen 4), which is not what these tests check."""
    proc = subprocess.run(args, capture_output=True, text=True, **kw)
    return proc if proc.stdout or proc.returncode else subprocess.run(args, capture_output=True, text=True, **kw)


@pytest.mark.slow
@pytest.mark.skipif(not llama_completion(), reason="llama.cpp's llama-completion is not on PATH or in $LLAMA_CPP_BIN")
@pytest.mark.parametrize("kind", FAMILIES)
def test_llama_cpp_continues_the_gguf_greedily_as_sample_py(kind, tmp_path):
    with open(SHAKESPEARE) as f:
        tok = CharTokenizer.from_text(f.read())
    model = tiny(tok.vocab_size, std=0.3, **FAMILIES[kind])
    path = str(tmp_path / "m.gguf")
    gguf_format.write(model, tok, path, "f32")
    prompt = "ROMEO:"
    ours = tok.decode(model.generate(torch.tensor([tok.encode(prompt)]), 20, temperature=0.0)[0].tolist())
    # --ignore-eos masks the end token a character vocabulary lacks and the GGUF adds (gguf_format.py)
    proc = run_llama([llama_completion(), "-m", path, "-p", prompt, "-n", "20", "--temp", "0", "-no-cnv",
                      "--no-warmup", "-t", "1", "-c", "32", "--ignore-eos"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(ours), (proc.stdout, ours)


@pytest.mark.slow
@pytest.mark.skipif(not gguf_format.llama_cpp_program("llama-server"),
                    reason="llama.cpp's llama-server is not on PATH or in $LLAMA_CPP_BIN")
@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_llama_cpp_splits_and_tokenizes_text_as_we_do(kind, tokenizers, tmp_path):
    """llama-server's /tokenize on the GGUF (its named pre-tokenizer, our merges) gives our ids."""
    import time
    import urllib.request
    tok = tokenizers[kind]
    path = str(tmp_path / "m.gguf")
    gguf_format.write(tiny(tok.vocab_size, **FAMILIES["llama"]), tok, path, "f32")
    with socket.socket() as s:  # a free port: the test workers run side by side
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([gguf_format.llama_cpp_program("llama-server"), "-m", path,
                               "--port", str(port), "-t", "1", "-c", "32"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                time.sleep(0.1)
        for text in TEXTS + ["tabs\t\tand\r\nwindows\r\n", "a\n \n b", "x  y   z    ", "数字123abc don't I'LL"]:
            if kind == "char" and set(text) - set(tok.chars):
                continue
            body = json.dumps({"content": text}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/tokenize", body, {"Content-Type": "application/json"})
            assert json.load(urllib.request.urlopen(req))["tokens"] == tok.encode(text), text
    finally:
        server.terminate()
        server.wait()
