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
        return logits.argmax(dim=-1, keepdim=True)
    probs = probabilities(logits, temperature, top_k, top_p)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """logits: (B, V) -> the (B, V) distribution that sampling draws from at temperature > 0, after
    top_k and top_p have cut the tail (explain.py shows it)."""
    # the best logit moved to 0 first, and the temperature no smaller than float32 can hold (1e-300 would
    # round to 0): then the best stays at 0 and the rest may go to -inf, so the softmax below is never 0/0
    logits = logits.float()
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), sorted descending
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus (Holtzman et al., 2019): keep the smallest set of tokens whose probability adds up to top_p
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)  # (B, V)
        p = torch.softmax(sorted_logits, dim=-1)
        drop = p.cumsum(dim=-1) - p >= top_p  # the tokens before this one already hold top_p
        drop[:, 0] = False  # always keep the most likely token (top_p <= 0 would drop them all)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    return F.softmax(logits, dim=-1)  # (B, V)
