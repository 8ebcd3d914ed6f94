"""
explain.py and inspection.py: the numbers on the page are the model's own (attention recomputed by hand
from the weights, and by transformers for GPT-2; the logit lens's last layer is the model's logits; the
per-token losses average to evaluation.py's loss), the budget adds up to flops_per_token, and the page
renders in a real headless chromium, offline, without errors, right-to-left prompts included.
"""
import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import ROOT, open_page, run
from model import GPT, GPTConfig
from nanoforge import inspection, tokens
from nanoforge.checkpoint import ckpt_path, keep_checkpoint, kept_checkpoints, load_model, save_checkpoint
from nanoforge.evaluation import evaluate
from nanoforge.tokenizer import SPECIAL_TOKENS, CharTokenizer, load_bpe, load_tokenizer, save_bpe, train_bpe

ARCHS = {
    "gpt2": dict(),
    "rope_rmsnorm_qknorm": dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", bias=False,
                                tie_embeddings=False, logit_softcap=15.0),
    "learned_rmsnorm_swiglu": dict(norm="rmsnorm", mlp="swiglu", qk_norm=True),
}


def make_run(folder, tok, data_dir="", snapshots=(), seed=0, **arch):
    """A run folder with a tiny random model whose attention is sharpened (random 0.02 weights attend
    almost uniformly, which would hide a wrong mask or scale), kept checkpoints and a log.jsonl."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, **arch))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8.0)
    meta = dict(tokenizer=tok.spec, iter_num=30, config={"data_dir": data_dir} if data_dir else {})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        for it in range(0, 31, 10):
            f.write(json.dumps({"iter": it, "loss": 4.0 - it / 20}) + "\n")
            f.write(json.dumps({"iter": it, "val_loss": 4.1 - it / 20}) + "\n")
        f.write(json.dumps({"iter": 31, "loss": float("nan")}) + "\n")  # a diverged step: JSON has no nan
    for it in snapshots:
        with torch.no_grad():
            model.transformer.wte.weight.mul_(1.1)
        keep_checkpoint(folder, model, dict(meta, val_loss=4.1 - it / 20), it, keep=len(snapshots))
    save_checkpoint(ckpt_path(folder), model, meta)
    return model


def run_explain(*args):
    return run("explain.py", *args)


def read_json(folder):
    with open(os.path.join(folder, "explain.json"), encoding="utf-8") as f:
        return json.load(f)


def hand_attention(model, ids):
    """Each layer's attention weights recomputed from the weights with no model code but the blocks that
    make the next layer's input: norm, q and k, QK-norm, rotary (as complex rotations), the scaled,
    masked softmax. (L, nh, T, T)."""
    cfg = model.config
    T, C, nh = len(ids), cfg.n_embd, cfg.n_head
    hs = C // nh
    x = model.transformer.wte.weight[ids]  # (T, C)
    if cfg.pos_emb == "learned":
        x = x + model.transformer.wpe.weight[:T]
    out = []
    for block in model.transformer.h:
        w, b = block.ln_1.weight, getattr(block.ln_1, "bias", None)
        if cfg.norm == "layernorm":
            h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w
            h = h + (b if b is not None else 0)
        else:
            h = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        Wq, Wk, _ = block.attn.c_attn.weight.split(C, dim=0)  # (C, C) each
        bias = block.attn.c_attn.bias
        bq, bk = (bias[:C], bias[C:2 * C]) if bias is not None else (0, 0)
        q = (h @ Wq.T + bq).view(T, nh, hs).transpose(0, 1)  # (nh, T, hs)
        k = (h @ Wk.T + bk).view(T, nh, hs).transpose(0, 1)
        if cfg.qk_norm:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + 1e-5)
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + 1e-5)
        if cfg.pos_emb == "rope":  # channel pairs (2i, 2i+1) turned by angle pos * 10000^(-2i/hs)
            angle = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)  # (T, hs/2)
            turn = torch.polar(torch.ones_like(angle), angle)
            q = torch.view_as_real(torch.view_as_complex(q.reshape(nh, T, hs // 2, 2).contiguous()) * turn).flatten(-2)
            k = torch.view_as_real(torch.view_as_complex(k.reshape(nh, T, hs // 2, 2).contiguous()) * turn).flatten(-2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (nh, T, T)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        out.append(torch.softmax(scores, dim=-1))
        x = block(x[None])[0]
    return torch.stack(out)


# -----------------------------------------------------------------------------------------------------
# the numbers

@pytest.fixture(scope="module")
def char_tok(char_data):
    return load_tokenizer(tokens.read_meta(char_data)["tokenizer"])


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_and_lens_are_the_models(tmp_path, char_tok, arch):
    model = make_run(tmp_path, char_tok, **ARCHS[arch]).eval()
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
    run_explain(f"--out_dir={tmp_path}", f"--prompt={prompt}")
    data = read_json(tmp_path / "explain")
    ids = char_tok.encode(prompt)
    assert [t["id"] for t in data["views"]["tokens"]["tokens"]] == ids
    att = torch.tensor(data["views"]["attention"]["weights"], dtype=torch.float64)  # (L, nh, T, T)
    T = len(ids)
    assert att.shape == (2, 2, T, T)
    with torch.no_grad():
        expected = hand_attention(model, ids)
        assert torch.allclose(att, expected.double(), atol=2e-5), (att - expected).abs().max()
        assert torch.allclose(att.sum(-1), torch.ones(2, 2, T, dtype=torch.float64), atol=1e-4)
        assert (att.triu(1) == 0).all(), "weight on a later position"
        assert att[0].max() > 0.5, "the sharpened model should attend sharply somewhere"
        # the weights are what the fast path mixes values with: weights @ v through c_proj = the block's attention
        block = model.transformer.h[0]
        x = model.transformer.wte.weight[ids][None]
        if model.config.pos_emb == "learned":
            x = x + model.transformer.wpe.weight[:T]
        h = block.ln_1(x)
        _, _, v = block.attn.heads(h)  # (1, nh, T, hs)
        y = (att[0].float()[None] @ v).transpose(1, 2).reshape(1, T, -1)
        assert torch.allclose(block.attn.c_proj(y), block.attn(h), atol=1e-4)
        # the logit lens at the last layer is the model's own output
        logits, _ = model(torch.tensor([ids]), torch.tensor([ids]))  # (1, T, V): every position
        p, i = F.softmax(logits[0].float(), -1).max(-1)
    lens = data["views"]["lens"]
    assert len(lens["ids"]) == model.config.n_layer + 1
    assert lens["ids"][-1] == i.tolist()
    assert np.allclose(lens["probs"][-1], p.numpy(), atol=1e-4)
    assert np.allclose(data["views"]["next"]["logits"], logits[0, -1].numpy(), atol=1e-3)
    assert data["views"]["next"]["ids"][0] == int(logits[0, -1].argmax())


@pytest.mark.slow
def test_gpt2_attention_matches_transformers(tmp_path, hf_gpt2_dir):
    from transformers import GPT2LMHeadModel
    folder, _ = hf_gpt2_dir
    prompt = "a,b;c.d!e?f"  # GPT-2 ids all under the tiny model's vocabulary of 100
    run_explain(f"--init_from={folder}", f"--prompt={prompt}", f"--out={tmp_path}")
    data = read_json(tmp_path)
    ids = [t["id"] for t in data["views"]["tokens"]["tokens"]]
    assert max(ids) < 100
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True)
    theirs = torch.stack([a[0] for a in out.attentions]).double()  # (L, nh, T, T)
    ours = torch.tensor(data["views"]["attention"]["weights"], dtype=torch.float64)
    assert torch.allclose(ours, theirs, atol=2e-5), (ours - theirs).abs().max()
    p, i = F.softmax(out.logits[0].float(), -1).max(-1)
    assert data["views"]["lens"]["ids"][-1] == i.tolist()
    assert np.allclose(data["views"]["lens"]["probs"][-1], p.numpy(), atol=1e-4)
    assert data["views"]["tokens"]["tokens"][1]["merges"] == []  # "," is a single byte: nothing merged


@pytest.mark.slow
def test_surprise_averages_to_evaluation_loss(tmp_path, char_tok, char_data):
    model = make_run(tmp_path / "run", char_tok, data_dir=char_data).eval()
    with open(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        text = f.read()[200_000:200_400]
    (tmp_path / "held.txt").write_text(text, encoding="utf-8")
    run_explain(f"--out_dir={tmp_path / 'run'}", "--prompt=To be", f"--text=FILE:{tmp_path / 'held.txt'}",
                "--surprise_tokens=48")
    s = read_json(tmp_path / "run" / "explain")["views"]["surprise"]
    ids = [s["first_id"]] + s["ids"]
    assert ids == char_tok.encode(text)[:49]
    path = str(tmp_path / "held.bin")
    tokens.write_tokens(path, ids, char_tok.vocab_size)
    ref = evaluate(model, [path], np.array([0]), len(ids) - 1, 1, torch.ones(char_tok.vocab_size, dtype=torch.float64),
                   "cpu", contextlib.nullcontext())
    assert ref["tokens"] == len(s["loss"]) == 48
    assert abs(s["mean_loss"] - ref["loss"]) < 1e-5
    assert abs(np.mean(s["loss"]) - ref["loss"]) < 1e-4  # the shown, rounded losses too
    # without --text the run's val split is scored
    run_explain(f"--out_dir={tmp_path / 'run'}", "--prompt=To be", "--surprise_tokens=32")
    s = read_json(tmp_path / "run" / "explain")["views"]["surprise"]
    val = np.asarray(tokens.open_tokens(tokens.split_files(char_data, "val")[0])[:33]).tolist()
    assert [s["first_id"]] + s["ids"] == val and "val split" in s["source"]


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_adds_up_to_flops_per_token(arch):
    model = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=3, n_head=2, n_embd=32, **ARCHS[arch]))
    b = inspection.budget_view(model)
    assert b["total_flops"] == sum(b["flops"].values()) == model.flops_per_token()
    assert b["total_params"] == sum(p.numel() for p in model.parameters())
    assert b["flops"]["embeddings"] == 0 and b["flops"]["head"] == 6 * 97 * 32
    assert b["params"]["head"] == (0 if model.config.tie_embeddings else 97 * 32)


def test_bpe_merges_rebuild_each_token():
    tok = load_tokenizer({"kind": "gpt2"})
    ranks = tok.enc._mergeable_ranks
    for i in tok.encode(" the internationalization of tokenizers"):
        b = tok.enc.decode_single_token_bytes(i)
        steps = inspection.merge_steps(ranks, b)
        assert len(steps) == len(b) - 1 and steps[-1][0] + steps[-1][1] == b
        assert all(ranks[a + c] <= ranks[b] for a, c in steps)  # built from tokens learned before it
    view = inspection.tokens_view(tok, tok.encode("Hello world"), np.zeros(tok.vocab_size, dtype=np.int64), 10)
    assert [t["text"] for t in view["tokens"]] == ["Hello", " world"]
    assert "".join(view["tokens"][1]["merges"][-1]) == " world" and all(t["rare"] for t in view["tokens"])


@pytest.mark.slow
def test_train_keeps_the_last_checkpoints(tmp_path, char_data):
    out = tmp_path / "run"
    run("train.py", f"--data_dir={char_data}", f"--out_dir={out}", "--n_layer=1", "--n_head=2", "--n_embd=16",
        "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=1", "--max_iters=20", "--eval_interval=5",
        "--eval_iters=1", "--keep_checkpoints=2", "--device=cpu", "--compile=False", "--dtype=float32", "--plot=False",
        "--warmup_iters=2", "--lr_decay_iters=20")
    kept = kept_checkpoints(out)
    assert [it for it, _ in kept] == [15, 20]
    model, _, meta = load_model(kept[-1][1])
    assert meta["iter_num"] == 20 and "val_loss" in meta
    final, _, _ = load_model(str(out))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), final.state_dict().values()))


# -----------------------------------------------------------------------------------------------------
# the page in a real browser

@pytest.mark.slow
def test_page_renders_every_view_offline(tmp_path, chrome, char_tok, char_data):
    from selenium.webdriver.common.by import By
    make_run(tmp_path, char_tok, data_dir=char_data, snapshots=(10, 20, 30), **ARCHS["rope_rmsnorm_qknorm"])
    prompt = "First Citizen: hear me"
    run_explain(f"--out_dir={tmp_path}", f"--prompt={prompt}")
    open_page(chrome, tmp_path / "explain" / "index.html")
    T = len(prompt)
    for view in ("tokens", "embeddings", "attention", "lens", "next", "surprise", "learned", "budget"):
        section = chrome.find_element(By.ID, view)
        assert section.is_displayed() and section.size["height"] > 100, view
    chips = chrome.find_elements(By.CSS_SELECTOR, "#tok-chips .tok")
    assert "".join(c.get_attribute("data-text") for c in chips) == prompt
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#emb-map text")) > 20
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#emb-near tr")) == 11
    assert chrome.find_element(By.ID, "att-canvas").size["width"] > 100
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#att-thumbs canvas")) == 4
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#lens-table tr")) == 1 + 3
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#lens-table tr:nth-child(2) td")) == T
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#nx-table tr")) == 21
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#sp-strip span")) > 30
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#bg-table tr")) == 7
    assert "val loss" in chrome.find_element(By.ID, "ln-info").text
    # the slider moves through the kept checkpoints
    chrome.execute_script("const s = document.getElementById('ln-slider'); s.value = 0; s.dispatchEvent(new Event('input'))")
    assert chrome.find_element(By.ID, "ln-info").text.startswith("iteration 10")
    # the sampling sliders reshape the table: top-k 1 leaves all probability on the best token
    chrome.execute_script("const s = document.getElementById('nx-k'); s.value = 1; s.dispatchEvent(new Event('input'))")
    first = chrome.find_element(By.CSS_SELECTOR, "#nx-table tr:nth-child(2) td:nth-child(3)").text
    assert first.strip() == "100.0%"
    # hovering a heatmap cell shows its weight
    from selenium.webdriver.common.action_chains import ActionChains
    canvas = chrome.find_element(By.ID, "att-canvas")
    ActionChains(chrome).move_to_element_with_offset(canvas, -canvas.size["width"] // 2 + 3,
                                                     -canvas.size["height"] // 2 + 3).perform()
    assert "reads" in chrome.find_element(By.ID, "tip").text
    errors = [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


PERSIAN = "سلام دنیا، این یک آزمایش است"


def persian_tokenizer(kind, folder):
    """A character vocabulary, or a byte-level BPE trained here on Persian text (its pieces are whole
    letters and words, each several UTF-8 bytes)."""
    if kind == "char":
        return CharTokenizer.from_text(PERSIAN + " abc")
    text = " ".join([PERSIAN, "دنیا بزرگ است", "این یک کتاب است", "سلام بر شما"] * 30)
    ranks, _ = train_bpe([text], 400, progress=False)
    return load_bpe(str(folder), save_bpe(folder, ranks, "gpt4", SPECIAL_TOKENS)["sha256"])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_page_shows_a_right_to_left_prompt(tmp_path, chrome, kind):
    from selenium.webdriver.common.by import By
    prompt = PERSIAN
    tok = persian_tokenizer(kind, tmp_path / "tok")
    make_run(tmp_path, tok)
    run_explain(f"--out_dir={tmp_path}", f"--prompt={prompt}")
    open_page(chrome, tmp_path / "explain" / "index.html")
    assert chrome.find_element(By.ID, "prompt").text == prompt
    assert chrome.execute_script("return getComputedStyle(document.getElementById('tok-chips')).direction") == "rtl"
    chips = chrome.find_elements(By.CSS_SELECTOR, "#tok-chips .tok")
    pieces = [tok.decode([i]) for i in tok.encode(prompt)]
    assert "".join(pieces) == prompt  # every piece whole characters: nothing shown as \xNN
    assert [c.get_attribute("data-text") for c in chips] == pieces
    assert [c.text for c in chips] == [p.replace(" ", "\u00b7") for p in pieces]
    if kind == "bpe":
        assert max(len(p) for p in pieces) > 2  # merged into words, not letter by letter
        rows = chrome.find_elements(By.CSS_SELECTOR, "#tok-table tr")
        assert "+" in rows[1 + pieces.index(max(pieces, key=len))].text  # the merges that built it
    # the first token, the prompt's first letter, is drawn rightmost: the row reads right to left
    xs = [c.location["x"] for c in chips[:4]]
    assert xs == sorted(xs, reverse=True)
    assert chrome.find_element(By.CSS_SELECTOR, "#lens-table tr th:nth-child(2) .tok").get_attribute("data-text") == pieces[0]


def test_tinystories_prepare_ends_each_story(tmp_path):
    sample = os.path.join(ROOT, "..", "shared", "data", "tinystories", "tinystories_sample_eot.txt")
    with open(sample, encoding="utf-8") as f:
        text = f.read()
    ranks, _ = train_bpe([text], 300, progress=False)  # a tiny BPE trained here: the test needs no files
    save_bpe(tmp_path / "tok", ranks, "gpt4", SPECIAL_TOKENS)
    run("data/tinystories/prepare.py", f"--input={sample}", f"--tokenizer={tmp_path / 'tok'}",
        f"--out_dir={tmp_path / 'data'}", "--val_fraction=0.2")
    meta = tokens.read_meta(tmp_path / "data")
    tok = load_tokenizer(meta["tokenizer"])
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    assert (meta["train_stories"], meta["val_stories"]) == (len(stories) - 1, 1)
    val = np.asarray(tokens.open_tokens(tokens.split_files(tmp_path / "data", "val")[0])).tolist()
    assert val == tok.encode(stories[-1]) + [tok.eot_id]


@pytest.mark.slow
def test_bad_prompts_fail_in_one_line(tmp_path, char_tok):
    make_run(tmp_path, char_tok)
    for prompt, said in (("x" * 65, "at most 64"), ("", "empty"), ("\u00e9t\u00e9", "not in this model's vocabulary")):
        out = run("explain.py", f"--out_dir={tmp_path}", f"--prompt={prompt}", check=False)
        assert out.returncode != 0 and said in out.stderr and "Traceback" not in out.stderr, out.stderr
