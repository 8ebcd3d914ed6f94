"""
finetune.py and lora.py: chat fine-tuning from a nanoforge run, a Hugging Face GPT-2 folder, fully or with
LoRA; adapters that train alone, save in peft's format and merge exactly.
"""
import json
import os

import pytest
import torch

from model import GPT, GPTConfig
from nanoforge import chat_template, errors, lora, parallel
from nanoforge.checkpoint import load_checkpoint, load_model
from conftest import ROOT, SHAKESPEARE, assert_one_line_error, read_log, run, run_fake_clock

CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def shop_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shop")
    run("data/shop_chat/prepare.py", "--n_train=200", "--n_val=20", "--n_facts=100", f"--out_dir={d}")
    return d


@pytest.fixture(scope="module")
def char_base(tmp_path_factory):
    """A tiny untrained character-level nanoforge run with Tiny Shakespeare's vocabulary."""
    from nanoforge.checkpoint import save_checkpoint
    from nanoforge.tokenizer import CharTokenizer
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("base")
    model = GPT(GPTConfig(block_size=256, vocab_size=len(CHARS), n_layer=1, n_head=2, n_embd=32, bias=False))
    save_checkpoint(os.path.join(out, "ckpt.pt"), model, {"tokenizer": CharTokenizer(CHARS).spec, "iter_num": 0})
    return str(out)


@pytest.fixture(scope="module")
def hf_gpt2_full_vocab_dir(tmp_path_factory):
    """A tiny random Hugging Face GPT-2 with GPT-2's real vocabulary, so the BPE's ids fit it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf_full")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(folder)
    return str(folder)


def tiny_gpt(vocab=20):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16))


@pytest.mark.slow
def test_lora_trains_only_adapters_and_merges_exactly(tmp_path):
    model = lora.apply_lora(tiny_gpt(), rank=4, alpha=8, dropout=0.0)
    x = torch.randint(0, 20, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    for n, p in model.named_parameters():  # B starts at 0; give the adapters something to say
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    model.eval()
    logits = model(x, x)[0]
    merged = tiny_gpt()
    merged.load_state_dict(lora.merged_state_dict(model))
    assert torch.allclose(merged.eval()(x, x)[0], logits, atol=1e-5)
    assert not torch.allclose(tiny_gpt().eval()(x, x)[0], logits, atol=1e-3)  # the adapters did change it
    # saved in peft's format and loaded back onto a fresh base: the same logits
    lora.save_adapter(model, str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    again = lora.load_adapter(tiny_gpt(), str(tmp_path / "adapter")).eval()
    assert torch.allclose(again(x, x)[0], logits, atol=1e-6)


def test_lora_composes_with_gradient_checkpointing():
    x = torch.randint(0, 20, (2, 8))
    grads = []
    for ckpt in (False, True):
        base = tiny_gpt()
        if ckpt:
            parallel.gradient_checkpointing(base)
        model = lora.apply_lora(base, rank=4, alpha=8, dropout=0.0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.manual_seed(1)
                p.data.normal_(0, 0.5)
        model(x, x)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_lr_schedule_and_decay_groups():
    from nanoforge import optim
    lrs = [optim.lr_at(it, 1.0, 10, 100, 0.1) for it in range(120)]
    assert 0 < lrs[0] < lrs[9] < 1.0 and lrs[10] == 1.0 and lrs[100] == lrs[119] == 0.1
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after warmup
    assert optim.lr_at(5, 1.0, 10, 100, 0.1, decay_lr=False) == 1.0
    model = lora.apply_lora(tiny_gpt(), rank=4, alpha=8, dropout=0.0)
    decayed, plain = optim.param_groups(model, 0.1)
    assert decayed["params"] and all("lora" in n for n, p in model.named_parameters()
                                     if any(p is q for q in decayed["params"] + plain["params"]))


def test_lora_unknown_target_is_a_clear_error():
    with pytest.raises(errors.UserError, match="c_fcc"):
        lora.apply_lora(tiny_gpt(), rank=4, alpha=8, dropout=0.0, targets="c_attn,c_fcc")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_char_model_lowers_held_out_loss_and_chats(shop_data, char_base, tmp_path, mode):
    out = str(tmp_path / mode)
    extra = ["--lora_rank=8", "--learning_rate=2e-2", "--gradient_checkpointing=True"] if mode == "lora" else []
    run("finetune.py", f"--init_from={char_base}", f"--train_file={shop_data / 'train.jsonl'}",
        f"--val_file={shop_data / 'val.jsonl'}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=15",
        "--batch_size=4", "--learning_rate=3e-3", "--device=cpu", *extra)
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    # a random 1-layer base: full fine-tuning learns fast; rank-8 adapters on frozen embeddings, slower
    assert len(evals) == 3 and evals[-1] < evals[0] - (0.5 if mode == "full" else 0.1)
    state = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert state["meta"]["tokenizer"]["added"] == chat_template.CHAT_TOKENS
    assert state["meta"]["model_args"]["vocab_size"] == len(CHARS) + 4
    if mode == "lora":
        assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
        assert not [k for k in state["model"] if "lora" in k or "base_layer" in k]  # plain merged weights
    # the same template at chat time, through stdin, two turns
    proc = run_chat(out, "Where is my lamp?\nThank you!\n")
    assert proc.stdout.count("assistant> ") == 2


def test_time_budget_ends_the_fine_tune_and_its_learning_rate_follows_the_clock(shop_data, char_base, tmp_path):
    # a clock that moves 1/64 s a read: each step is 1/64 s of training, whatever the machine, so a 0.25 s
    # budget is 16 steps, and the cosine reaches min_lr at the 16th, not at max_iters
    out = str(tmp_path / "out")
    proc = run_fake_clock("finetune.py", f"--init_from={char_base}", f"--train_file={shop_data / 'train.jsonl'}",
                          f"--val_file={shop_data / 'val.jsonl'}", f"--out_dir={out}", "--max_iters=1000",
                          "--eval_interval=100", "--log_interval=1", "--batch_size=2", "--warmup_iters=2",
                          "--learning_rate=1e-3", "--min_lr=1e-4", "--time_budget=0.25", "--device=cpu")
    assert "time_budget of 0.25s spent at iteration 16" in proc.stdout
    log = read_log(out)
    lrs = [r["lr"] for r in log if "lr" in r]
    assert len(lrs) == 16 and lrs[0] < lrs[1] < 1e-3 and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] < 1e-4 + 0.02 * (1e-3 - 1e-4)  # 15/16 of the way down the cosine
    assert [r["iter"] for r in log if "val_loss" in r] == [0, 16]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["meta"]["iter_num"] == 16


def run_chat(out, text):
    import subprocess
    import sys
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out}", "--chat",
                           "--device=cpu", "--max_new_tokens=40"], input=text, capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)


@pytest.mark.slow
def test_finetune_from_hf_gpt2_adds_chat_tokens(hf_gpt2_full_vocab_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hello", "completion": "Hi there."}) + "\n" + "{oops\n")
    out = str(tmp_path / "o")
    proc = run("finetune.py", f"--init_from={hf_gpt2_full_vocab_dir}", f"--train_file={data}", f"--val_file={data}",
               f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--block_size=32", "--device=cpu")
    assert "d.jsonl:2: malformed JSON" in proc.stdout
    model, spec, _ = load_model(out)
    assert spec == {"kind": "gpt2", "added": chat_template.CHAT_TOKENS} and model.config.vocab_size == 50257 + 4


def test_finetune_without_data_is_a_one_line_error(char_base, tmp_path):
    proc = run("finetune.py", f"--init_from={char_base}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_line_error(proc, "no data")
    # data that is not UTF-8 (a file saved as Latin-1): one line naming the file, no traceback
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    proc = run("finetune.py", f"--init_from={char_base}", f"--out_dir={tmp_path / 'o'}", f"--train_file={latin1}",
               f"--val_file={latin1}", check=False)
    assert_one_line_error(proc, f"{latin1} is not UTF-8 text")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.slow
def test_continued_pretraining_from_a_nanoforge_run(char_base, tmp_path):
    """train.py init_from=<out_dir>: another run's weights and tokenizer, the context cropped, then trained."""
    d = tmp_path / "d"
    run("data/shakespeare_char/prepare.py", f"--input={SHAKESPEARE}", f"--out_dir={d}")
    out = str(tmp_path / "cont")
    # one micro-step an iteration and a warmup longer than the run: a small, steady learning rate
    run("train.py", f"--init_from={char_base}", f"--data_dir={d}", "--dataset=shakespeare_char", "--device=cpu",
        "--compile=False", "--gradient_accumulation_steps=1", "--warmup_iters=100", "--beta2=0.99",
        f"--out_dir={out}", "--block_size=32", "--batch_size=4", "--max_iters=20", "--eval_interval=10",
        "--eval_iters=2", "--n_layer=1", "--n_head=2", "--n_embd=32", "--bias=False", "--learning_rate=3e-3",
        "--decay_lr=False", "--plot=False")
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    state = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert state["meta"]["model_args"]["block_size"] == 32 and state["meta"]["tokenizer"]["chars"] == CHARS


@pytest.mark.slow
def test_chat_task_scores_greedy_replies_by_the_facts_they_state(char_base, tmp_path):
    """A model tuned to give one reply to every question is right exactly where that reply states the
    expected facts (case and spacing aside), and evaluate.py shows what it got wrong."""
    data = tmp_path / "d.jsonl"
    questions = ["Are you open on Sunday?", "Where is my lamp?", "Can I return a hat?"]
    data.write_text("".join(json.dumps({"prompt": q, "completion": "On Sunday we are closed."}) + "\n"
                            for q in questions * 10))
    out = tmp_path / "o"
    run("finetune.py", f"--init_from={char_base}", f"--train_file={data}", f"--val_file={data}", f"--out_dir={out}",
        "--max_iters=120", "--eval_interval=120", "--batch_size=4", "--block_size=64", "--learning_rate=1e-2",
        "--warmup_iters=5", "--device=cpu")
    task = tmp_path / "facts.jsonl"
    task.write_text(json.dumps({"messages": [{"role": "user", "content": "Are you open on Sunday?"}],
                                "expect": ["sunday", "we are  CLOSED"]}) + "\n" +
                    json.dumps({"messages": [{"role": "user", "content": "Where is my lamp?"}],
                                "expect": ["lamp", "three days"]}) + "\n")
    proc = run("evaluate.py", f"--out_dir={out}", f"--chat_task={task}", "--device=cpu")
    record = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])["chat_task"]
    assert (record["n"], record["correct"], record["acc"]) == (2, 1, 0.5)
    assert [r["reply"] for r in record["wrong"]] == ["On Sunday we are closed."]
    assert "wrong: 'Where is my lamp?' -> 'On Sunday we are closed.'" in proc.stdout
    assert "0.5000" in proc.stdout
    compared = run("evaluate.py", "--compare", str(out), f"--compare_plot={tmp_path / 'cmp.png'}").stdout
    assert "chat acc" in compared and "0.500" in compared.splitlines()[-2]  # the run's row
    # the batched decoding evaluate.py uses gives the replies of the one-at-a-time reference
    from nanoforge.evaluation import chat_questions
    from nanoforge.tasks import load_chat_task
    from nanoforge.tokenizer import load_tokenizer
    model, spec, _ = load_model(str(out))
    asks = load_chat_task(str(task)) + [{"messages": [{"role": "user", "content": q}], "expect": ["x"]}
                                        for q in questions + ["Hi", "When do you open on Friday?"] * 10]
    batched, alone = (chat_questions(model, load_tokenizer(spec), asks, "cpu", max_new_tokens=30, batched=b)
                      for b in (True, False))
    assert [r["reply"] for r in batched["results"]] == [r["reply"] for r in alone["results"]]
    # a model that was never tuned for chat
    assert_one_line_error(run("evaluate.py", f"--out_dir={char_base}", f"--chat_task={task}", "--dataset=",
                              check=False), "lacks the chat tokens")


def test_shop_chat_fits_its_config_and_its_questions_are_held_out(shop_data):
    import runpy
    from nanoforge.evaluation import normalise
    from nanoforge.tasks import load_chat_task
    from nanoforge.tokenizer import CharTokenizer
    block_size = runpy.run_path(os.path.join(ROOT, "config", "finetune_shop_chat.py"))["block_size"]
    tok = chat_template.chat_tokenizer(CharTokenizer(CHARS))
    train = [chat_template.to_messages(json.loads(line)) for line in open(shop_data / "train.jsonl")]
    val = [chat_template.to_messages(json.loads(line)) for line in open(shop_data / "val.jsonl")]
    facts = load_chat_task(str(shop_data / "facts.jsonl"))
    reworded = load_chat_task(str(shop_data / "facts_reworded.jsonl"))
    # nothing is skipped as too long: every conversation, rendered, fits the fine-tune's rows
    assert max(len(chat_template.render(tok, m)[0]) - 1 for m in train + val) <= block_size
    # a question asked in training got the reply whose facts the questions expect
    replies = {u["content"]: a["content"] for m in train for u, a in zip(m, m[1:]) if u["role"] == "user"}
    seen = [q for q in facts if q["messages"][-1]["content"] in replies]
    assert len(seen) >= len(facts) // 4
    for q in seen:
        assert all(normalise(e) in normalise(replies[q["messages"][-1]["content"]]) for e in q["expect"]), q
    # the reworded questions use wordings training never does; the others are new conversations
    assert not [q for q in reworded if q["messages"][-1]["content"] in replies]
    conversations = {json.dumps(m) for m in train}
    assert not [q for q in facts if json.dumps(q["messages"]) in conversations]
    assert {e for q in facts for e in q["expect"]} >= {"closed", "three days", "thirty days", "free of charge"}


def test_shop_chat_help_lists_every_knob_with_its_default_and_bad_counts_are_one_line():
    import re
    proc = run("data/shop_chat/prepare.py", "--help")
    assert not proc.stderr.strip(), proc.stderr
    options = [" ".join(o.split()) for o in re.split(r"\n  (?=--)", proc.stdout)]  # one entry per option
    for key, value in {"n_train": 2000, "n_val": 100, "n_facts": 200, "block_size": 384, "seed": 1337}.items():
        shown = next(o for o in options if o.startswith(f"--{key} "))
        assert f"({value}" in shown, shown
    assert_one_line_error(run("data/shop_chat/prepare.py", "--n_train=0", check=False), "--n_train", "at least 1")
