"""
Choosing the next token from the model's logits: greedy, or a draw at a temperature from the tokens that
top-k and top-p (nucleus) keep. One rule for every decoder: model.GPT.generate, the serving engine,
evaluate.py's chat questions, and explain.py, which shows the distribution a setting draws from.
"""
import torch
from torch.nn import functional as F


def next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits: (B, V) for the next token -> (B, 1) ids. temperature 0 or top_k 1 is greedy."""
    if temperature == 0 or top_k == 1:
        return greedy(logits)
    probs = probabilities(logits, temperature, top_k, top_p)  # (B, V)
    return draw(probs, generator)  # (B, 1)


def greedy(logits):
    """logits (B, V) -> (B, 1), the index of each row's largest logit (the first, on a tie), as
    logits.argmax(-1, keepdim=True). float32 on a CPU through numpy: torch's argmax takes ~43 us on GPT-2's
    50257 logits, numpy's ~5."""
    if logits.is_cpu and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1)[:, None])
    return logits.argmax(dim=-1, keepdim=True)


def draw(probs, generator=None):
    """One token a row of probs (B, V), each drawn with its probability: the first token whose cumulative
    probability passes a uniform draw (inverse transform sampling), one random number a row. torch.multinomial
    (draw_reference) draws an exponential for every token, ~1 ms a row on GPT-2's vocabulary on a CPU, as
    long as a token of int8 decoding; this takes ~0.06 ms."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V); float64, so a long tail of small probabilities adds up
    total = cdf[:, -1:]  # (B, 1): 1 up to rounding, and never 0 (the best token's probability is the largest)
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)  # [0, 1)
    # below total even where u * total rounds up to it: then no token past the last likely one can be chosen
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # the i with cdf[i - 1] <= point < cdf[i]: cdf rises at i, so probs[i] > 0 (a token ruled out never comes)
    return torch.searchsorted(cdf, point, right=True)  # (B, 1)


def draw_reference(probs, generator=None):
    """draw as torch.multinomial does it: what the tests hold draw to (the same distribution)."""
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """logits: (B, V) -> the (B, V) distribution that sampling draws from at temperature > 0, after
    top_k and top_p have cut the tail (explain.py shows it)."""
    # the best logit moved to 0 first, and the temperature no smaller than float32 can hold (1e-300 would
    # round to 0): then the best stays at 0 and the rest may go to -inf, so the softmax below is never 0/0
    logits = logits.float()
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # amax: max(dim) finds indices too, 6x slower
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), sorted descending
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = nucleus(logits, top_p)
    return F.softmax(logits, dim=-1)  # (B, V)


def nucleus(logits, top_p):
    """logits (B, V) with the tokens outside each row's nucleus at -inf (Holtzman et al., 2019): the smallest set
    of the most likely tokens whose probability adds up to top_p, the most likely always kept. Sorting all of
    GPT-2's vocabulary (nucleus_reference) takes ~3.7 ms on a CPU, as long as half a token of int8 decoding, and
    a trained model's nucleus is mostly a few dozen tokens: looked for among the 64 most likely first, then the
    1024, and only then among all."""
    p = torch.softmax(logits, dim=-1)  # (B, V)
    V = logits.size(-1)
    for m in (64, 1024):
        if m >= V:
            break
        top, idx = torch.topk(p, m)  # (B, m), sorted descending
        short = top_p - top.sum(dim=-1)  # (B,): probability still missing
        if bool((short <= 0).all()):
            return _keep(logits, top, idx, top_p)
        # every other token is at most as likely as the m-th: at least short / top[:, -1] more are needed
        if m == 64 and bool((short / top[:, -1] > 1024 - m).any()):
            break  # more than the next try holds: straight to the sort
    top, idx = torch.sort(p, descending=True)  # (B, V)
    return _keep(logits, top, idx, top_p)


def _keep(logits, top, idx, top_p):
    """logits with all but the nucleus at -inf, given the most likely tokens idx (B, m) and their
    probabilities top, sorted descending, which hold it."""
    drop = top.cumsum(dim=-1) - top >= top_p  # the tokens before this one already hold top_p
    drop[:, 0] = False  # always keep the most likely token (top_p <= 0 would drop them all)
    kept = logits.gather(1, idx).masked_fill(drop, float("-inf"))  # (B, m)
    return torch.full_like(logits, float("-inf")).scatter(1, idx, kept)


def nucleus_reference(logits, top_p):
    """nucleus by sorting the whole vocabulary, the plain way the tests hold nucleus's shortcut to."""
    top, idx = torch.sort(torch.softmax(logits, dim=-1), descending=True)  # (B, V)
    return _keep(logits, top, idx, top_p)
