"""
The LM head and the cross-entropy loss in one pass, chunk by chunk over the rows, so the (B, T, V) logits
never exist whole: the largest tensor of a small model's training step (1.57 GiB at GPT-2's 8 x 1024 x
50,257 in fp32). GPT.forward takes it as head_loss; its plain lm_head + F.cross_entropy path is the
reference it is tested against (values and gradients).

    _, loss = model(x, y, head_loss=chunked_lm_head_loss)
"""
import torch

# rows of the flattened (B*T, C) hidden states per chunk of the chunked LM head + loss: 512 rows of GPT-2's
# 50,257 logits are ~100 MiB in fp32, against 1.57 GiB a copy for the whole 8 x 1024 batch
LOSS_CHUNK_ROWS = 512


class ChunkedLMHeadLoss(torch.autograd.Function):
    """The LM head and the mean cross-entropy over targets != -1, chunk by chunk over the rows, with the
    gradients computed in the same pass: the (N, V) logits never exist whole, only (chunk_rows, V) at a
    time. Same result as F.cross_entropy(h @ weight.T, targets, ignore_index=-1), which keeps the logits
    and their log-softmax through backward and makes more (N, V) copies there (~4.7 GiB at 8 x 1024 x
    50,257 in fp32). Nothing is recomputed: forward keeps grad_h (N, C) and grad_weight (V, C) and backward
    only scales them by the incoming gradient (the loss is a scalar, so that is exact). with_grads=False
    (evaluation, under no_grad) computes the loss alone: a third of the head's FLOPs, no grad_weight."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, compute_dtype, with_grads):
        # h: (N, C), weight: (V, C) (the tied wte/lm_head), targets: (N,) with -1 = ignored
        n_keep = (targets != -1).sum()  # the mean is over learned targets, as in F.cross_entropy's
        w = weight.to(compute_dtype)  # under autocast the matmuls run in its dtype, as nn.Linear's would
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        if with_grads:
            grad_h = torch.empty_like(h)  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)  # (V, C), fp32 sum
        for s in range(0, h.size(0), chunk_rows):
            hc, tc = h[s:s + chunk_rows].to(compute_dtype), targets[s:s + chunk_rows]  # (n, C), (n,)
            keep = tc != -1  # (n,)
            logits = (hc @ w.t()).float()  # (n, V): the softmax in fp32, like the plain path's .float()
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            picked = logits.gather(1, tc.clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,) ignored rows pick 0
            loss_sum += ((lse - picked) * keep).sum()
            if not with_grads:
                continue
            # d(sum of row losses)/d logits = softmax - one_hot(target), zero for ignored rows; in place
            g = logits.sub_(lse.unsqueeze(1)).exp_()  # (n, V)
            g.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -keep.unsqueeze(1).to(g.dtype))
            # the mean: divide by the learned count; with none learned the loss is nan (0/0) and the
            # gradients zero, both as F.cross_entropy's
            g.mul_((keep / n_keep.clamp(min=1)).unsqueeze(1))
            g = g.to(compute_dtype)
            grad_h[s:s + chunk_rows] = (g @ w).to(h.dtype)  # (n, V) @ (V, C) -> (n, C)
            grad_w += (g.t() @ hc).float()  # (V, n) @ (n, C) -> (V, C)
        if with_grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss_sum / n_keep

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None



def chunked_lm_head_loss(h, weight, targets):
    """h: (B, T, C) final hidden states (after ln_f), weight: lm_head's (V, C), targets: (B, T) with -1 =
    not learned -> the mean cross-entropy, a scalar. Under autocast the head runs in autocast's dtype, as
    the plain nn.Linear would; without gradients (evaluation, under no_grad) only the loss is computed."""
    dev = h.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    with torch.autocast(dev, enabled=False):  # the dtypes are handled inside, explicitly
        # no gradients wanted: the loss alone (needs_input_grad would say True under no_grad too)
        return _head_and_loss(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), LOSS_CHUNK_ROWS,
                              compute_dtype, torch.is_grad_enabled())


_head_and_loss = ChunkedLMHeadLoss.apply


def keep_eager_under_compile():
    """Makes torch.compile leave the chunked head eager: inductor's kernels for its in-place steps corrupted
    the heap at one CPU thread (torch 2.13: "malloc(): unaligned tcache chunk detected", or nan losses;
    dev/LOG.md), and the chunked head is matmuls, which gain nothing from compiling. Called before
    compiling (hardware.prepare_to_compile), not at import: torch.compiler.disable imports torch's
    compiler, 2-3 s of every script's start."""
    global _head_and_loss
    if not getattr(_head_and_loss, "eager_under_compile", False):
        _head_and_loss = torch.compiler.disable(ChunkedLMHeadLoss.apply)
        _head_and_loss.eager_under_compile = True
