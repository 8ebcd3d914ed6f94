"""
Held-out scoring: loss and bits per byte on a fixed set of windows, shared by all ranks.

Bits per byte (bpb) divides the summed loss (converted from nats to bits) by the UTF-8 bytes of the
target tokens, so models with different tokenizers (characters vs BPE) can be compared on one scale.
"""
import math

import torch
import torch.distributed as dist
from torch.nn import functional as F

from tokens import read_batch


@torch.no_grad()
def evaluate(model, path, starts, block_size, batch_size, token_bytes, device, autocast_ctx,
             rank=0, world_size=1):
    """Mean loss (nats/token) and bits per byte of `model` over the windows `starts` of a token file.

    Rank r scores windows r, r + world_size, ...; the sums are added over all ranks, so every rank
    returns the same numbers, which are those of one process scoring every window.
    token_bytes: (vocab_size,) tensor of UTF-8 bytes per token id (0 for special tokens)."""
    was_training = model.training
    model.eval()
    mine = starts[rank::world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss in nats, tokens, bytes
    token_bytes = token_bytes.to(device)
    # every rank runs the same number of forward passes: under FSDP each one is a collective (the
    # weights are gathered), so a rank with fewer windows scores a stand-in batch and discards it
    n_batches = math.ceil(math.ceil(len(starts) / world_size) / batch_size)
    for i in range(0, n_batches * batch_size, batch_size):
        rows = mine[i:i + batch_size]
        x, y = read_batch(path, rows if len(rows) else starts[:1], block_size)
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            logits, _ = model(x, y)  # (B, T, V)
        if not len(rows):
            continue
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction="sum")
        sums += torch.stack([loss.double(), torch.tensor(y.numel(), dtype=torch.float64, device=device),
                             token_bytes[y].sum().double()])
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    loss_sum, n_tokens, n_bytes = sums.tolist()
    return {"loss": loss_sum / n_tokens, "bpb": loss_sum / (math.log(2) * n_bytes) if n_bytes else float("nan")}
