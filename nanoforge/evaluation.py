"""
Held-out scoring: the one computation behind train.py's evaluations, evaluate.py and sweep.py, so their
numbers can never disagree.

- evaluate(): mean loss and bits per byte of a model over a set of windows of a token file, summed over
  all ranks (train.py scores a fixed set of windows; evaluate.py and sweep.py the whole split).
- score_batch(): the summed loss, tokens and bytes of one batch, by the chunked LM head (the (B, T, V)
  logits never exist whole: with their copies ~5 GB at 8 x 1024 x GPT-2's vocab) or the plain reference.
- split_windows(): non-overlapping windows that cover a split, or its first max_tokens.
- generalisation(): the gap between held-out and train loss, and whether it says the model memorises.
- multiple_choice(): accuracy on a multiple-choice task by the log-likelihood of each ending given the
  context, summed and length-normalised, with Wilson confidence intervals.
- chat_questions(): accuracy of a chat model's greedy replies on questions whose answers are known: a
  reply is right when it contains every expected string.

Bits per byte (bpb) divides the summed loss (converted from nats to bits) by the UTF-8 bytes of the
target tokens, so models with different tokenizers (characters vs BPE) can be compared on one scale.
Everything here is deterministic: the same model and data give the same numbers on every run.
"""
import math
import threading

import numpy as np
import torch
import torch.distributed as dist
from torch.nn import functional as F

from nanoforge import tokens
from nanoforge.chat_template import render
from nanoforge.errors import UserError
from nanoforge.lm_head_loss import chunked_lm_head_loss
from nanoforge.tokens import read_batch


@torch.no_grad()
def score_batch(model, x, y, token_bytes, autocast_ctx, chunked=True):
    """(summed loss in nats, target tokens, their UTF-8 bytes) of one batch, a (3,) fp64 tensor; targets
    of -1 are not scored (the model's masking rule). chunked: the chunked LM head (nanoforge/lm_head_loss.py,
    forward only under no_grad) gives the mean over the targets, times their
    count; a model with a logit soft cap takes the plain head inside it, as training does.
    chunked=False: the reference, the whole (B, T, V) logits and one cross-entropy summed over them."""
    # an int8 head (evaluate.py --quantize=int8) has no float weight to take in chunks: it runs as itself
    chunked = chunked and model.lm_head.weight.is_floating_point()
    keep = y != -1  # (B, T)
    n = keep.sum().double()
    n_bytes = (token_bytes[y.clamp(min=0)] * keep).sum().double()
    with autocast_ctx:
        logits, loss = model(x, y, head_loss=chunked_lm_head_loss if chunked else None)  # logits None if chunked
    if chunked:
        # only summation order and the mean's fp32 rounding (~1e-7) differ; no targets: 0, not 0/0's nan
        loss = torch.where(n > 0, loss.double() * n, 0.0)
    else:
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                               reduction="sum").double()
    return torch.stack([loss, n, n_bytes])


@torch.no_grad()
def evaluate(model, path, starts, block_size, batch_size, token_bytes, device, autocast_ctx,
             rank=0, world_size=1, progress=False, chunked=True):
    """Mean loss (nats/token), perplexity and bits per byte of `model` over the windows `starts` of a
    token file; also the number of target tokens and their bytes.

    Rank r scores windows r, r + world_size, ...; the sums are added over all ranks, so every rank
    returns the same numbers, which are those of one process scoring every window.
    token_bytes: (vocab_size,) tensor of UTF-8 bytes per token id (0 for special tokens).
    progress: a label for a progress bar on rank 0 (evaluate.py; train.py's evaluations are short).
    chunked: score_batch's chunked LM head (the default), or False for the plain reference path."""
    was_training = model.training
    model.eval()
    mine = starts[rank::world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss in nats, tokens, bytes
    token_bytes = token_bytes.to(device)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(starts) * block_size, unit="tok", unit_scale=True, desc=str(progress))
    # every rank runs the same number of forward passes: under FSDP each one is a collective (the
    # weights are gathered), so a rank with fewer windows scores a stand-in batch and discards it
    n_batches = math.ceil(math.ceil(len(starts) / world_size) / batch_size)
    for i in range(0, n_batches * batch_size, batch_size):
        rows = mine[i:i + batch_size]
        x, y = read_batch(path, rows if len(rows) else starts[:1], block_size)
        x, y = x.to(device), y.to(device)
        batch = score_batch(model, x, y, token_bytes, autocast_ctx, chunked)  # every rank runs the forward
        if not len(rows):
            continue
        sums += batch
        if bar is not None:
            bar.update(y.numel() * world_size)
    if bar is not None:
        bar.close()
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss_sum, n_tokens, n_bytes = sums.tolist()
    loss = loss_sum / n_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(n_tokens), "bytes": int(n_bytes),
            "bpb": loss_sum / (math.log(2) * n_bytes) if n_bytes else float("nan")}


def split_windows(count, block_size, max_tokens=0):
    """Start offsets of back-to-back windows over a split of `count` tokens: every target token is scored
    once, except the last (count - 1) % block_size, which do not fill a window. max_tokens > 0 keeps only
    the windows that fit in the first max_tokens tokens (at least one)."""
    n = (count - 1) // block_size
    if max_tokens > 0:
        n = min(n, max(1, max_tokens // block_size))
    return np.arange(n, dtype=np.int64) * block_size


def run_data_dir(meta):
    """The data folder a checkpoint's run trained on (its data_dir, else data/<dataset>), or '' when the
    checkpoint does not say (a Hugging Face model)."""
    config = meta.get("config", {})
    if not (config.get("data_dir") or config.get("dataset")):
        return ""
    return tokens.dataset_dir(config.get("dataset", ""), config.get("data_dir", ""))


def score_split(model, data_dir, split, token_bytes, batch_size, device, autocast_ctx, block_size=0, max_tokens=0,
                rank=0, world_size=1, progress=False):
    """evaluate() over the whole split of a dataset (or its first max_tokens tokens): what evaluate.py
    reports and what sweep.py ranks trials by."""
    block_size = block_size or model.config.block_size
    starts = split_windows(tokens.split_length(data_dir, split, block_size), block_size, max_tokens)
    return evaluate(model, tokens.split_files(data_dir, split), starts, block_size, batch_size, token_bytes, device,
                    autocast_ctx, rank, world_size, progress=progress and split)


def generalisation(train_loss, val_loss, tolerance):
    """(gap, memorising): the held-out minus train loss, and whether the gap exceeds `tolerance` times the
    held-out loss. A model that learns the language scores both splits alike; one that memorises its
    training text scores train much better than text it has never seen."""
    gap = val_loss - train_loss
    return gap, gap > tolerance * abs(val_loss)


# -----------------------------------------------------------------------------------------------------
# multiple choice

def wilson_interval(correct, n, z=1.96):
    """The Wilson score interval for a proportion correct/n (95% for z=1.96): unlike the normal
    approximation it stays inside [0, 1] and is sound for small n and accuracies near 0 or 1."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def choice_logprobs(model, context_ids, choice_ids, device, autocast_ctx):
    """(sum of log-probabilities of each choice's tokens given the context, token count of each choice),
    all choices of one question in one forward pass. A sequence longer than the model's context keeps
    its last block_size + 1 tokens (the start of the context is dropped, never the choice)."""
    T = model.config.block_size
    rows = []
    for ids in choice_ids:
        if not 0 < len(ids) <= T:
            raise ValueError(f"a choice of {len(ids)} tokens does not fit the model's context of {T}")
        seq = (list(context_ids) + list(ids))[-(T + 1):]
        rows.append((seq[:-1], seq[1:], len(ids)))
    L = max(len(x) for x, _, _ in rows)
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)  # -1: not a choice token, not scored
    for r, (xs, ys, n) in enumerate(rows):
        x[r, :len(xs)] = torch.tensor(xs)
        y[r, len(ys) - n:len(ys)] = torch.tensor(ys[-n:])  # only the choice's own tokens are targets
    x, y = x.to(device), y.to(device)
    with autocast_ctx:
        logits, _ = model(x, y)  # (N, L, V): targets make the model return every position
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, L)
    picked = picked.masked_fill(y < 0, 0.0)
    return picked.sum(dim=1).double().cpu(), (y >= 0).sum(dim=1).cpu()


def join_choice(context, choice):
    """The text a choice continues the context with: a space between them unless one is already there
    (HellaSwag's convention; a BPE tokenizer then sees ' word' tokens as in running text)."""
    if not context or context[-1].isspace() or choice[:1].isspace():
        return choice
    return " " + choice


def multiple_choice(model, examples, tok, device, autocast_ctx, rank=0, world_size=1, progress=False):
    """Accuracy on `examples` ({context, choices, label}): a question is right when its label's choice has
    the highest log-likelihood, summed over its tokens ('acc') or averaged per token ('acc_norm', which
    does not favour short choices). Ties go to the first choice. Ranks split the questions; the counts
    are summed over ranks. Returns counts, accuracies and 95% Wilson intervals."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # questions, right (sum), right (mean)
    mine = range(rank, len(examples), world_size)
    if progress and rank == 0:
        from tqdm import tqdm
        mine = tqdm(mine, desc="choices", unit="q")
    for i in mine:
        ex = examples[i]
        context_ids = tok.encode(ex["context"])
        if not context_ids:
            if tok.eot_id is None:
                raise ValueError(f"example {i} has an empty context and the tokenizer no end-of-text token")
            context_ids = [tok.eot_id]
        choice_ids = [tok.encode(join_choice(ex["context"], c)) for c in ex["choices"]]
        total, n = choice_logprobs(model, context_ids, choice_ids, device, autocast_ctx)
        counts += torch.tensor([1.0, float(total.argmax().item() == ex["label"]),
                                float((total / n).argmax().item() == ex["label"])], dtype=torch.float64,
                               device=device)
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    n, right, right_norm = (int(v) for v in counts.tolist())
    return {"n": n, "correct": right, "correct_norm": right_norm,
            "acc": right / n if n else float("nan"), "acc_norm": right_norm / n if n else float("nan"),
            "acc_ci": wilson_interval(right, n), "acc_norm_ci": wilson_interval(right_norm, n)}


# -----------------------------------------------------------------------------------------------------
# chat questions with known answers

def normalise(text):
    """Lower case, runs of spaces as one: a right fact is right however it is capitalised or spaced."""
    return " ".join(text.lower().split())


def greedy_reply(model, tok, ids, device, max_new_tokens):
    """The reference: one question at a time, decoded by GPT.generate_stream; ends at any special token."""
    stops, reply = set(tok.special_tokens.values()), []
    for nxt in model.generate_stream(torch.tensor([ids], dtype=torch.long, device=device), max_new_tokens,
                                     temperature=0.0):
        if nxt.item() in stops:
            break
        reply.append(nxt.item())
    return tok.decode(reply)


def greedy_replies(model, tok, prompts, device, dtype, max_new_tokens, max_batch=16):
    """Every prompt's greedy reply, decoded together by serve.py's continuous batching (engine.py): up to
    max_batch sequences a forward instead of one. The same replies as greedy_reply() (a test holds them
    equal), except that a reply stops when prompt and reply fill the context, where greedy_reply slides."""
    from nanoforge.engine import Engine, Sequence, TextStream
    texts, finished = [[] for _ in prompts], threading.Semaphore(0)

    def sink(i):
        def take(event):
            if event[0] == "text":
                texts[i].append(event[1])
            else:  # "done", or "error" (a bug, printed by the engine): this reply is over either way
                finished.release()
        return take

    engine = Engine(model, tok, device, dtype, max_batch=max_batch, max_queue=len(prompts))
    try:
        engine.submit([Sequence(ids, max_new_tokens, sink(i), temperature=0.0, stop_ids=tok.special_tokens.values(),
                                text=TextStream(tok)) for i, ids in enumerate(prompts)])
        for _ in prompts:
            finished.acquire()
    finally:
        engine.close()
    return ["".join(t) for t in texts]


@torch.no_grad()
def chat_questions(model, tok, examples, device, dtype="float32", max_new_tokens=160, batched=True):
    """Greedy replies to `examples` ({messages, expect}), rendered with the chat template the model was
    fine-tuned on; a reply ends at any special token (<|end|>, or a weak model's new turn). A question
    is right when its reply contains every expected string (normalise()). Returns counts, accuracy, its
    95% Wilson interval, and each question's reply and verdict."""
    model.eval()
    prompts = [render(tok, ex["messages"], add_generation_prompt=True)[0] for ex in examples]
    for ex, ids in zip(examples, prompts):
        if len(ids) >= model.config.block_size:
            raise UserError(f"the question {ex['messages'][-1]['content'][:40]!r} is {len(ids)} tokens with its "
                            f"conversation; the model's context is {model.config.block_size}")
    if batched:
        replies = greedy_replies(model, tok, prompts, device, dtype, max_new_tokens)
    else:
        replies = [greedy_reply(model, tok, ids, device, max_new_tokens) for ids in prompts]
    results = []
    for ex, text in zip(examples, replies):
        right = all(normalise(e) in normalise(text) for e in ex["expect"])
        results.append({"question": ex["messages"][-1]["content"], "reply": text, "expect": ex["expect"],
                        "right": right})
    n, right = len(results), sum(r["right"] for r in results)
    return {"n": n, "correct": right, "acc": right / n if n else float("nan"), "acc_ci": wilson_interval(right, n),
            "results": results}
