"""
The held-out metrics and multiple-choice scoring of evaluation.py against direct computations, the task
file formats of tasks.py, and evaluate.py run as a user runs it.
"""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run
from nanoforge import lm_head_loss, tokens
from nanoforge.evaluation import (choice_logprobs, evaluate, generalisation, join_choice, multiple_choice, score_batch,
                        split_windows, wilson_interval)
from model import GPT, GPTConfig
from nanoforge.errors import UserError
from nanoforge.tasks import load_chat_task, load_task, parse_example
from nanoforge.tokenizer import CharTokenizer



def tiny_gpt(vocab_size=20, block_size=16, seed=0, **options):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab_size, dropout=0.0,
                         bias=True, **options)).eval()


def test_split_windows_score_every_target_once():
    count, T = 103, 10
    starts = split_windows(count, T)
    targets = np.concatenate([np.arange(s + 1, s + 1 + T) for s in starts])
    assert len(set(targets)) == len(targets)  # no target twice
    assert targets.min() == 1 and targets.max() <= count - 1
    assert len(targets) == count - 1 - (count - 1) % T  # all but the tail that fills no window
    assert len(split_windows(count, T, max_tokens=35)) == 3


def test_metrics_equal_a_direct_computation(tmp_path):
    vocab, T = 20, 16
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=300)
    path = str(tmp_path / "val.bin")
    tokens.write_tokens(path, ids, vocab)
    byte_len = torch.tensor(rng.integers(1, 4, size=vocab), dtype=torch.float64)  # bytes per token id
    model = tiny_gpt(vocab, T)
    starts = split_windows(len(ids), T)
    got = evaluate(model, path, starts, T, 5, byte_len, "cpu", torch.no_grad())
    # directly: one window at a time, -log p(next token) summed by hand
    nll, n, nbytes = 0.0, 0, 0.0
    with torch.no_grad():
        for s in starts:
            x = torch.tensor(ids[s:s + T]).unsqueeze(0)
            y = ids[s + 1:s + 1 + T]
            logits, _ = model(x, torch.tensor(y).unsqueeze(0))
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            nll -= sum(logp[t, y[t]].item() for t in range(T))
            n += T
            nbytes += sum(byte_len[v].item() for v in y)
    assert got["tokens"] == n == 288
    assert got["loss"] == pytest.approx(nll / n, rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert got["bpb"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-6)
    assert got["bytes"] == nbytes
    # the batch size changes nothing but the rounding of the chunked head's fp32 mean (~1e-7), and a second
    # run gives the same numbers
    assert evaluate(model, path, starts, T, 1, byte_len, "cpu", torch.no_grad())["loss"] == pytest.approx(got["loss"], rel=1e-6)
    assert evaluate(model, path, starts, T, 5, byte_len, "cpu", torch.no_grad()) == got


@pytest.mark.parametrize("autocast", ["fp32", "bf16"])
@pytest.mark.parametrize("options", [{}, {"tie_embeddings": False}, {"logit_softcap": 5.0}],
                         ids=["tied", "untied", "softcap"])
def test_chunked_evaluation_equals_the_plain_path(tmp_path, monkeypatch, options, autocast):
    """evaluate()'s default, the chunked LM head, against the whole-logits reference: loss, bpb, tokens and
    bytes, in fp32 and under bf16 autocast; chunks of 7 rows divide neither a batch's 5 x 16 rows nor the
    last batch's 3 x 16. A soft-capped model takes the plain head inside the model, as in training."""
    monkeypatch.setattr(lm_head_loss, "LOSS_CHUNK_ROWS", 7)
    vocab, T = 50, 16
    rng = np.random.default_rng(1)
    ids = rng.integers(0, vocab, size=18 * T + 1)
    path = str(tmp_path / "val.bin")
    tokens.write_tokens(path, ids, vocab)
    byte_len = torch.tensor(rng.integers(1, 4, size=vocab), dtype=torch.float64)
    model = tiny_gpt(vocab, T, **options)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # logits of a few nats' spread, where a soft cap of 5 bends them
    head_calls = []
    model.lm_head.register_forward_hook(lambda m, i, o: head_calls.append(tuple(o.shape)))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast == "bf16" else torch.no_grad
    starts = split_windows(len(ids), T)
    assert len(starts) == 18  # batches of 5, 5, 5, 3 windows
    plain = evaluate(model, path, starts, T, 5, byte_len, "cpu", ctx(), chunked=False)
    assert head_calls and head_calls[0] == (5, T, vocab)  # the reference makes the (B, T, V) logits
    head_calls.clear()
    chunked = evaluate(model, path, starts, T, 5, byte_len, "cpu", ctx())
    # the point: without a soft cap the lm_head module never runs, so (B, T, V) logits never exist
    assert bool(head_calls) == bool(options.get("logit_softcap"))
    assert chunked["tokens"] == plain["tokens"] == 18 * T and chunked["bytes"] == plain["bytes"]
    rel = 1e-3 if autocast == "bf16" else 1e-6  # bf16: the same bf16 matmuls, summed in another order
    for key in ("loss", "bpb", "perplexity"):
        assert chunked[key] == pytest.approx(plain[key], rel=rel), key
    if options.get("logit_softcap"):  # the cap changes the numbers: the test would see a head without it
        uncapped = tiny_gpt(vocab, T)
        uncapped.load_state_dict(model.state_dict())
        assert abs(evaluate(uncapped, path, starts, T, 5, byte_len, "cpu", ctx())["loss"] - plain["loss"]) > 0.01


def test_score_batch_skips_ignored_targets_in_both_paths(monkeypatch):
    """Targets of -1 count in neither the loss, the tokens nor the bytes, chunked or plain; a batch with
    no targets at all scores zeros (the chunked mean alone would be 0/0)."""
    monkeypatch.setattr(lm_head_loss, "LOSS_CHUNK_ROWS", 7)
    vocab, T = 20, 16
    model = tiny_gpt(vocab, T)
    byte_len = torch.arange(1, vocab + 1, dtype=torch.float64)
    x = torch.randint(0, vocab, (3, T))
    y = torch.randint(0, vocab, (3, T))
    y[0, :5], y[2, 9] = -1, -1
    keep = y != -1
    plain = score_batch(model, x, y, byte_len, torch.no_grad(), chunked=False)
    chunked = score_batch(model, x, y, byte_len, torch.no_grad())
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert chunked.dtype == torch.float64
    assert chunked[1].item() == 3 * T - 6 and chunked[2].item() == byte_len[y[keep]].sum().item()
    with torch.no_grad():  # directly: the kept positions' -log p
        logits, _ = model(x, y)
        direct = -torch.log_softmax(logits.double(), -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum()
    assert chunked[0].item() == pytest.approx(direct.item(), rel=1e-6)
    none = torch.full_like(y, -1)
    for chunked_path in (True, False):
        assert score_batch(model, x, none, byte_len, torch.no_grad(), chunked_path).tolist() == [0.0, 0.0, 0.0]


def test_generalisation_gap_warns_only_past_tolerance():
    assert generalisation(1.60, 1.62, 0.1) == (pytest.approx(0.02), False)
    gap, memorising = generalisation(1.0, 1.5, 0.1)
    assert gap == pytest.approx(0.5) and memorising


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.96 ** 2 / (10 + 1.96 ** 2))  # the closed form at p = 0
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and 0.40 < low < 0.41  # symmetric about 0.5
    low, high = wilson_interval(900, 1000)
    assert low < 0.9 < high and high - low < 0.04


def test_choice_logprobs_equal_one_sequence_at_a_time():
    """Batched, padded, truncated scoring against scoring each sequence alone."""
    T = 16
    model = tiny_gpt(20, T)
    context = list(range(1, 15))
    choices = [[3], [4, 5, 6], [7, 8, 9, 10, 11, 12]]  # the last one overflows the context: truncated
    total, n = choice_logprobs(model, context, choices, "cpu", torch.no_grad())
    assert n.tolist() == [1, 3, 6]
    for k, ids in enumerate(choices):
        seq = (context + ids)[-(T + 1):]
        logits, _ = model(torch.tensor([seq[:-1]]), torch.tensor([seq[1:]]))
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        direct = sum(logp[len(seq) - 1 - len(ids) + j, ids[j]].item() for j in range(len(ids)))
        assert total[k].item() == pytest.approx(direct, abs=1e-5)


class Bigram(nn.Module):
    """A model whose next-token log-probabilities are a fixed table: logits[b, t] = log P[x[b, t]]."""

    def __init__(self, probs):
        super().__init__()
        self.table = torch.log(torch.tensor(probs, dtype=torch.float32))
        self.config = GPTConfig(block_size=32, vocab_size=len(probs))

    def forward(self, idx, targets=None):
        return self.table[idx], None  # (B, T, V)


def test_multiple_choice_picks_the_planted_answer_and_normalises_length():
    tok = CharTokenizer("abcd ")
    a, b, c, d, sp = range(5)
    P = np.full((5, 5), 0.05)
    P[sp, b] = 0.8  # after the space, 'b' is likely: the planted answers start with it
    P[b, b] = 0.6  # and another 'b' after a 'b'
    P /= P.sum(axis=1, keepdims=True)
    assert join_choice("aa", "b") == " b" and join_choice("aa ", "b") == "b"
    examples = [{"context": "ca", "choices": ["cccc", "dd", "bbb"], "label": 2},  # joined by a space
                {"context": "dd ", "choices": ["d", "bbb"], "label": 1}]
    scores = multiple_choice(Bigram(P), examples, tok, "cpu", torch.no_grad())
    assert scores["n"] == 2 and scores["acc"] == 1.0 and scores["acc_norm"] == 1.0
    examples[0]["label"] = 0  # the same questions with a wrong label are scored wrong
    assert multiple_choice(Bigram(P), examples, tok, "cpu", torch.no_grad())["acc"] == 0.5
    # a long choice of likely tokens loses on the sum but wins per token
    Q = np.full((5, 5), 0.1)
    Q[sp, d], Q[sp, b], Q[b, b] = 0.3, 0.25, 0.6
    Q /= Q.sum(axis=1, keepdims=True)
    long = [{"context": "a ", "choices": ["d", "bbbb"], "label": 1}]
    scores = multiple_choice(Bigram(Q), long, tok, "cpu", torch.no_grad())
    assert scores["acc"] == 0.0 and scores["acc_norm"] == 1.0


def test_task_formats_and_errors(tmp_path):
    hella = {"ctx": "A man sits. he", "endings": ["a", "b", "c", "d"], "label": "2"}
    assert parse_example(hella, "x")["label"] == 2
    simple = {"prompt": "2+2=", "choices": ["3", "4"], "answer": "4"}
    assert parse_example(simple, "x") == {"context": "2+2=", "choices": ["3", "4"], "label": 1}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(simple) + "\n\n" + json.dumps(hella) + "\n")
    assert len(load_task(str(path))) == 2
    bad = [("{not json\n", "t.jsonl line 2 is not JSON"),
           (json.dumps(dict(simple, answer=2)) + "\n", "t.jsonl line 2: 'answer' is 2"),
           (json.dumps(dict(hella, label=7)) + "\n", "t.jsonl line 2: 'label' is 7"),
           (json.dumps({"question": "?"}) + "\n", "t.jsonl line 2: a task line needs"),
           (json.dumps(dict(simple, choices=["only"])) + "\n", "t.jsonl line 2: 'choices' must be a list")]
    for line, message in bad:
        path.write_text(json.dumps(simple) + "\n" + line)
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
            load_task(str(path))
    with pytest.raises(UserError, match="neither a file nor a hub dataset"):
        load_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="offline, pass a local JSONL file"):  # HF_HUB_OFFLINE=1 in conftest
        load_task("hellaswag", max_examples=2)


def test_chat_task_format_and_errors(tmp_path):
    path = tmp_path / "facts.jsonl"
    ask = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hours?"}]}
    path.write_text("\ufeff" + json.dumps(dict(ask, expect="nine")) + "\n\n" + json.dumps(dict(ask, expect=["a", "b"])) + "\n")
    assert [q["expect"] for q in load_chat_task(str(path))] == [["nine"], ["a", "b"]]
    assert load_chat_task(str(path))[0]["messages"] == ask["messages"]
    bad = [(ask, "line 2: a chat task line needs 'messages'"),
           (dict(ask, expect=[]), "line 2: 'expect' must be a non-empty string"),
           (dict(ask, expect=["ok", " "]), "line 2: 'expect' must be a non-empty string"),
           ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "expect": "x"},
            "line 2: the last message must be the user's question, not assistant's"),
           ({"messages": [{"role": "clerk", "content": "Hi"}], "expect": "x"}, "line 2: 'messages' must be a list")]
    for record, message in bad:
        path.write_text(json.dumps(dict(ask, expect="x")) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(UserError, match=message):
            load_chat_task(str(path))
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no questions"):
        load_chat_task(str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_chat_task(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------------------------------
# evaluate.py as a user runs it

@pytest.fixture(scope="module")
def trained(tmp_path_factory, char_data):
    """A tiny character model trained for 40 iterations on the first 100k characters of Shakespeare."""
    d = tmp_path_factory.mktemp("evalrun")
    out = str(d / "out")
    run("train.py", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=8", "--eval_iters=3", "--eval_interval=20", "--max_iters=40", "--lr_decay_iters=40",
        "--warmup_iters=5", "--learning_rate=3e-3", "--plot=False", f"--data_dir={char_data}", f"--out_dir={out}")
    return char_data, out


@pytest.mark.slow
def test_evaluate_script_agrees_with_training_and_is_deterministic(trained, tmp_path):
    data_dir, out = trained
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": "ROMEO:", "choices": ["\nI will", "\nzzqq"], "answer": 0})
                              for _ in range(3)) + "\n")
    for _ in range(2):
        proc = run("evaluate.py", f"--out_dir={out}", "--device=cpu", f"--task={task}")
    assert "val (held out)" in proc.stdout and "gap (held out - train)" in proc.stdout
    with open(os.path.join(out, "eval.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 2
    first, second = records
    assert first["loss"] == second["loss"] and first["train_loss"] == second["train_loss"]  # deterministic
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    assert first["tokens"] == len(split_windows(tokens.split_length(data_dir, "val", 32), 32)) * 32
    assert first["task"]["n"] == 3 and 0 <= first["task"]["acc"] <= 1
    # train.py's last evaluation is the same function on its fixed windows: recompute it from the checkpoint
    from nanoforge.checkpoint import load_model
    from nanoforge.tokenizer import load_tokenizer
    model, spec, meta = load_model(out)
    token_bytes = torch.tensor(load_tokenizer(spec).token_bytes(), dtype=torch.float64)
    starts = tokens.eval_starts(tokens.split_length(data_dir, "val", 32), 32, 3 * 8)
    again = evaluate(model, tokens.split_path(data_dir, "val"), starts, 32, 8, token_bytes, "cpu", torch.no_grad())
    with open(os.path.join(out, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f if "val_loss" in line][-1]
    assert logged["val_loss"] == pytest.approx(again["loss"], rel=1e-6)
    # two DDP processes score the same windows between them: the same numbers
    ddp = run("evaluate.py", f"--out_dir={out}", "--device=cpu", "--max_tokens=3000",
              launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    one = run("evaluate.py", f"--out_dir={out}", "--device=cpu", "--max_tokens=3000")
    assert ddp.returncode == 0 and one.returncode == 0
    with open(os.path.join(out, "eval.jsonl")) as f:
        r_ddp, r_one = [json.loads(line) for line in f][-2:]
    assert r_ddp["world_size"] == 2 and r_one["world_size"] == 1 and r_ddp["tokens"] == r_one["tokens"]
    # dtype=auto decides at this model's matmuls, which are too small for bf16 on any CPU: both runs score in
    # float32 (measured at a big shape, a loaded machine's timings had the two runs pick different dtypes)
    assert r_ddp["dtype"] == r_one["dtype"] == "float32"
    assert r_ddp["loss"] == pytest.approx(r_one["loss"], rel=1e-6)
    # side by side
    plot = str(tmp_path / "cmp.png")
    cmp = run("evaluate.py", "--compare", out, out, f"--compare_plot={plot}")
    assert cmp.stdout.count(out) >= 2 and os.path.getsize(plot) > 1000


@pytest.mark.slow
def test_evaluate_script_scores_a_sharded_dataset_as_the_same_tokens_in_one_file(trained, sharded_char_data):
    """A dataset prepared with --shard_tokens (what train.py trains on) scores in evaluate.py: the same
    windows over the same tokens, so the same numbers as the one-file layout."""
    data_dir, out = trained
    for d in (data_dir, sharded_char_data):
        run("evaluate.py", f"--out_dir={out}", "--device=cpu", f"--data_dir={d}", "--max_tokens=6000")
    with open(os.path.join(out, "eval.jsonl")) as f:
        one_file, sharded = [json.loads(line) for line in f][-2:]
    assert sharded["data_dir"] == sharded_char_data and one_file["data_dir"] == data_dir
    assert sharded["tokens"] == one_file["tokens"] > 0
    assert sharded["loss"] == pytest.approx(one_file["loss"], rel=1e-6)
    assert sharded["train_loss"] == pytest.approx(one_file["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_evaluate_script_errors(tmp_path, hf_gpt2_dir):
    proc = run("evaluate.py", f"--out_dir={tmp_path}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: no checkpoint at")
    proc = run("evaluate.py", "--compare", str(tmp_path), check=False)
    assert proc.returncode == 2 and "has no eval.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("evaluate.py", f"--init_from={hf_gpt2_dir[0]}", "--task=x.jsonl", check=False)  # 100 ids, GPT-2 BPE
    assert proc.returncode == 2 and "100 token embeddings" in proc.stderr and "Traceback" not in proc.stderr
