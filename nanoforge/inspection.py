"""
What explain.py shows, computed: each function takes a model (and a tokenizer, token ids) and returns
plain lists and numbers, ready for JSON. Nothing here draws; the page (pages/explain.html) only draws.

The order is the order of the page: tokens, embeddings, attention, logit lens, the next token,
surprise, snapshots of a run as it learned, the parameter budget. Every number comes from the model's
own modules (trace, below, runs them as GPT.forward does), so what the page shows is what the model computes.
"""
import math

import numpy as np
import torch
from torch.nn import functional as F

from nanoforge import runlog, sampling, tokens
from nanoforge.tokenizer import token_bytes_of

COUNT_LIMIT = 50_000_000  # tokens of a training split counted for rarity: enough to tell rare from common


def _r(t, digits=5):
    """A tensor as nested lists of floats rounded to `digits` (the JSON stays a few MB at GPT-2's size)."""
    return np.round(t.detach().float().cpu().numpy().astype(np.float64), digits).tolist()


# -----------------------------------------------------------------------------------------------------
# tokens

def piece_text(b):
    """Token bytes as text; a byte that is part of a character split across tokens shows as \\xNN."""
    return b.decode("utf-8", errors="backslashreplace")


def merge_steps(ranks, token, limit=24):
    """The merges byte-level BPE makes to build `token` from its single bytes, in order: [(left, right)].
    Plain BPE on the token alone: merge the adjacent pair whose join has the lowest rank, until none can."""
    parts, steps = [token[i:i + 1] for i in range(len(token))], []
    while len(parts) > 1 and len(steps) < limit:
        pairs = [(ranks.get(parts[j] + parts[j + 1]), j) for j in range(len(parts) - 1)]
        pairs = [(r, j) for r, j in pairs if r is not None]
        if not pairs:
            break
        _, j = min(pairs)
        steps.append((parts[j], parts[j + 1]))
        parts[j:j + 2] = [parts[j] + parts[j + 1]]
    return steps


def train_counts(data_dir, vocab_size, limit=COUNT_LIMIT):
    """(count of each id in the first `limit` tokens of the run's train split, tokens counted), or
    (None, 0) when the split is not there."""
    if not data_dir:
        return None, 0
    try:
        files = tokens.split_files(data_dir, "train")
        arrays = [tokens.open_tokens(p) for p in files]
    except Exception:  # no data beside the run (a copied checkpoint): rarity is not shown
        return None, 0
    counts, seen = np.zeros(vocab_size, dtype=np.int64), 0
    for a in arrays:
        for s in range(0, len(a), 10_000_000):  # chunks: memory stays flat on big splits
            chunk = np.asarray(a[s:min(len(a), s + 10_000_000, s + limit - seen)], dtype=np.int64)
            counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
            seen += len(chunk)
            if seen >= limit:
                return counts, seen
    return counts, seen


def tokens_view(tok, ids, counts, counted, rare_below=5):
    """How the tokenizer cut the prompt: per token its id, text, bytes, the BPE merges that built it,
    and how often it came up in the training data (rare: fewer than rare_below times)."""
    ranks = tok.enc._mergeable_ranks if hasattr(tok, "enc") else None
    rows = []
    for i in ids:
        b = token_bytes_of(tok, i)
        row = {"id": i, "text": piece_text(b), "bytes": b.hex(" ")}
        if ranks is not None and i not in tok.special_tokens.values():
            row["merges"] = [[piece_text(a), piece_text(c)] for a, c in merge_steps(ranks, b)]
        if counts is not None:
            row["count"] = int(counts[i])
            row["rare"] = bool(counts[i] < rare_below)
        rows.append(row)
    kind = tok.spec["kind"]
    return {"tokenizer": {"kind": kind, "vocab_size": tok.vocab_size, "path": tok.spec.get("path", "")},
            "tokens": rows, "counted_tokens": counted, "rare_below": rare_below}


# -----------------------------------------------------------------------------------------------------
# embeddings

@torch.no_grad()
def embeddings_view(model, tok, ids, counts, n_near=10, n_points=600, n_positions=32):
    """Nearest tokens by cosine similarity of the token embedding (wte) to each prompt token, a 2-D PCA
    of the most frequent tokens' embeddings (the first ids when no counts), and, for learned positions,
    the cosine similarities of the first position embeddings (wpe) to each other."""
    E = model.transformer.wte.weight.float()  # (V, C)
    En = F.normalize(E, dim=-1)  # (V, C) unit rows: a dot product is the cosine
    V = E.size(0)
    near = {}
    for i in dict.fromkeys(ids):
        sims = En @ En[i]  # (V,)
        sims[i] = -2.0  # not itself
        top = torch.topk(sims, min(n_near, V - 1))
        near[str(i)] = [{"id": int(j), "text": piece_text(token_bytes_of(tok, int(j))), "cos": round(float(c), 4)}
                        for c, j in zip(top.values, top.indices)]
    if counts is not None:
        chosen = [int(j) for j in np.argsort(-counts, kind="stable")[:n_points] if counts[j] > 0]
    else:
        chosen = list(range(min(V, n_points)))
    chosen = list(dict.fromkeys(chosen + list(ids)))  # the prompt's tokens are always on the map
    X = E[chosen] - E[chosen].mean(0)  # (N, C) centred
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # principal axes: rows of Vh
    xy = X @ Vh[:2].T  # (N, 2)
    explained = (S[:2] ** 2 / (S ** 2).sum()).tolist()
    points = [{"id": j, "text": piece_text(token_bytes_of(tok, j)), "x": round(float(a), 4), "y": round(float(b), 4)}
              for j, (a, b) in zip(chosen, xy.tolist())]
    out = {"near": near, "pca": {"points": points, "explained": [round(e, 4) for e in explained],
                                 "of": "most frequent in the training data" if counts is not None else "first ids"},
           "pos_emb": model.config.pos_emb}
    if model.config.pos_emb == "learned":
        P = F.normalize(model.transformer.wpe.weight[:n_positions].float(), dim=-1)  # (n, C)
        out["positions_cos"] = _r(P @ P.T, 3)  # (n, n)
    return out


# -----------------------------------------------------------------------------------------------------
# attention, logit lens, the next token: one traced forward pass over the prompt

def attention_weights(attn, x):
    """The causal softmax weights of attention module attn on x (B, T, C) attending to itself, (B, nh, T, T):
    what the fused kernel computes inside and never returns. Row i says how much position i reads each j <= i."""
    q, k, _ = attn.heads(x)  # (B, nh, T, hs) each, QK-norm and rotary applied as in forward
    T = q.size(2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    return F.softmax(att.masked_fill(~mask, float("-inf")).float(), dim=-1)  # (B, nh, T, T)


@torch.no_grad()
def trace(model, idx):
    """GPT.forward's computation on idx (B, T), with what it passes through kept: (logits (B, T, V) at every
    position, residual stream (L + 1, B, T, C) entering each block and leaving the last (before ln_f),
    attention weights (L, B, nh, T, T)). Runs the model's own modules; the weights cost one extra softmax
    per layer."""
    T = idx.size(1)
    assert T <= model.config.block_size, f"sequence of {T} exceeds block_size {model.config.block_size}"
    x = model.embed(idx)  # (B, T, C)
    resid, att = [], []
    for block in model.transformer.h:
        resid.append(x)
        att.append(attention_weights(block.attn, block.ln_1(x)))  # (B, nh, T, T)
        x = block(x)
    resid.append(x)
    logits = model.soft_cap(model.lm_head(model.transformer.ln_f(x)))  # (B, T, V)
    return logits, torch.stack(resid), torch.stack(att)


@torch.no_grad()
def trace_prompt(model, ids):
    """(logits (T, V), residual stream (L + 1, T, C), attention (L, nh, T, T)) of the prompt."""
    idx = torch.tensor([ids], dtype=torch.long)  # (1, T)
    logits, resid, att = trace(model, idx)
    return logits[0].float(), resid[:, 0], att[:, 0]


def attention_view(att):
    """att (L, nh, T, T) -> the weights and, for each layer, head and position, the position it reads most."""
    return {"weights": _r(att), "argmax": att.argmax(-1).tolist()}  # (L, nh, T, T), (L, nh, T)


@torch.no_grad()
def logit_lens_view(model, tok, resid):
    """The residual stream after each layer read out as if it were the last (ln_f, then lm_head): the best
    next-token guess and its probability at every layer (0: the embeddings alone) and position."""
    logits = model.soft_cap(model.lm_head(model.transformer.ln_f(resid))).float()  # (L + 1, T, V)
    p, i = F.softmax(logits, dim=-1).max(-1)  # (L + 1, T) each
    return {"ids": i.tolist(), "probs": _r(p, 4),
            "texts": [[piece_text(token_bytes_of(tok, j)) for j in row] for row in i.tolist()]}


DECODING = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.7, top_k=0, top_p=1.0),
            dict(temperature=1.5, top_k=0, top_p=1.0), dict(temperature=1.0, top_k=5, top_p=1.0),
            dict(temperature=1.0, top_k=0, top_p=0.9), dict(temperature=0.8, top_k=200, top_p=1.0)]


@torch.no_grad()
def next_token_view(tok, last_logits, k=20, ship_logits=True):
    """The next-token distribution at the end of the prompt: the top k, and how each sampling setting of
    DECODING (the rule of sampling.probabilities) reshapes it. With ship_logits every logit goes too,
    for the page's sliders to recompute from exactly."""
    probs = F.softmax(last_logits, dim=-1)  # (V,)
    top = torch.topk(last_logits, min(k, last_logits.numel()))
    settings = []
    for s in DECODING:
        q = sampling.probabilities(last_logits[None], s["temperature"], s["top_k"] or None, s["top_p"])[0]  # (V,)
        settings.append(dict(s, probs=_r(q[top.indices], 5), kept=int((q > 0).sum())))
    out = {"ids": top.indices.tolist(), "texts": [piece_text(token_bytes_of(tok, int(j))) for j in top.indices],
           "probs": _r(probs[top.indices], 5), "settings": settings}
    if ship_logits:
        out["logits"] = _r(last_logits, 4)  # (V,)
    return out


# -----------------------------------------------------------------------------------------------------
# surprise: per-token loss on held-out text

def val_ids(data_dir, n):
    """The first n tokens of the run's val split, or None when it is not there."""
    if not data_dir:
        return None
    try:
        a = tokens.open_tokens(tokens.split_files(data_dir, "val")[0])
    except Exception:
        return None
    return np.asarray(a[:n], dtype=np.int64).tolist()


@torch.no_grad()
def surprise_view(model, tok, ids, source, n_hard=12):
    """The loss (nats) of each token of `ids` given the ones before it, the model's own guess there, and
    the hardest tokens. The mean is the held-out loss evaluation.py reports for the same text."""
    x = torch.tensor([ids[:-1]], dtype=torch.long)  # (1, T)
    y = torch.tensor([ids[1:]], dtype=torch.long)  # (1, T)
    logits, _ = model(x, y)  # (1, T, V): with targets the model returns every position
    loss = F.cross_entropy(logits[0].float(), y[0], reduction="none")  # (T,)
    guess = logits[0].argmax(-1).tolist()
    hard = torch.argsort(loss, descending=True)[:n_hard].tolist()
    return {"source": source, "first": piece_text(token_bytes_of(tok, ids[0])), "first_id": ids[0],
            "texts": [piece_text(token_bytes_of(tok, j)) for j in ids[1:]], "ids": ids[1:], "loss": _r(loss, 4),
            "mean_loss": float(loss.double().mean()),
            "hardest": [{"pos": p, "text": piece_text(token_bytes_of(tok, ids[p + 1])), "loss": round(float(loss[p]), 4),
                         "guess": piece_text(token_bytes_of(tok, guess[p]))} for p in hard]}


# -----------------------------------------------------------------------------------------------------
# as it learned: kept checkpoints (train.py --keep_checkpoints) and the loss curve

def loss_curve(out_dir):
    """[(iter, train loss)] and [(iter, val loss)] from a run's log.jsonl ([] without one)."""
    records = runlog.read_log(out_dir) if out_dir else []
    # a diverged step logs nan or inf, which JSON cannot hold: the curve leaves it out
    return {"train": [[r["iter"], round(r["loss"], 4)] for r in records if math.isfinite(r.get("loss", math.nan))],
            "val": [[r["iter"], round(r["val_loss"], 4)] for r in records if math.isfinite(r.get("val_loss", math.nan))]}


def snapshot_view(model, tok, ids, iter_num, val_loss):
    """Attention, logit lens and next-token table of one checkpoint on the prompt."""
    logits, resid, att = trace_prompt(model, ids)
    nxt = next_token_view(tok, logits[-1], k=10, ship_logits=False)
    val_loss = val_loss if val_loss is not None and math.isfinite(val_loss) else None
    return {"iter": iter_num, "val_loss": val_loss, "attention": attention_view(att)["weights"],
            "lens": logit_lens_view(model, tok, resid),
            "next": {k: nxt[k] for k in ("ids", "texts", "probs")}}


# -----------------------------------------------------------------------------------------------------
# the parameter budget

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head")


def component_of(name):
    if name.startswith(("transformer.wte", "transformer.wpe")):
        return "embeddings"
    if name.startswith("lm_head"):
        return "head"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norms"  # ln_1, ln_2, ln_f


def budget_view(model, T=None):
    """Parameters and training FLOPs per token of each component, split the way model.GPT.flops_per_token
    counts them (6 per weight of a matmul, plus attention's 12 L C T), so the FLOPs add up to it. The
    head's matmul is 6 V C whether or not its weights are the embedding's; a token's embedding lookup is
    no matmul."""
    cfg = model.config
    T = T or cfg.block_size
    params = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():  # a tied wte/lm_head is listed once, as wte
        params[component_of(name)] += p.numel()
    matmul = dict(params, embeddings=0)  # weights each token multiplies by
    if cfg.tie_embeddings:
        matmul["head"] = model.lm_head.weight.numel()  # the shared matrix, used as the head
    flops = {k: 6 * v for k, v in matmul.items()}
    flops["attention"] += 12 * cfg.n_layer * cfg.n_embd * T  # scores and weighted sum, per token
    return {"T": T, "tied": cfg.tie_embeddings, "params": params, "flops": flops,
            "total_params": sum(params.values()), "total_flops": sum(flops.values()),
            "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                     "pos_emb", "norm", "mlp", "qk_norm", "tie_embeddings")}}
