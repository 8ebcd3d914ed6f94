"""
The optimisation rules that every training script shares: which parameters get weight decay, which
optimizer updates which parameters, and the learning-rate schedule. train.py (pretraining) and
finetune.py (chat fine-tuning) both call these.
"""
import math

import torch

from nanoforge.errors import UserError


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices only (biases and LayerNorm gains are not decayed); frozen
    parameters (e.g. the base weights under LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


# Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024), as torch.optim.Muon uses them
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5, dtype=torch.bfloat16):
    """The nearest (semi-)orthogonal matrix to each matrix of a stack G, (N, A, B), by `steps` quintic
    Newton-Schulz iterations in `dtype`: in bf16, torch.optim.Muon's arithmetic for one matrix, op for op
    (tested to be identical), over the whole stack at once. On a CPU a small model's 16 matrices one at a
    time cost more than its forward pass; stacked by shape they take 4 batched matmuls per iteration.
    fp32 where bf16 is slow (a CPU without native bf16 emulates it ~300x slower)."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: the Gram matrix X X^T is then the smaller one
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT  # (N, A, A)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Muon: SGD with Nesterov momentum whose update for each matrix is replaced by the nearest
    orthogonal matrix (orthogonalize), so every direction of the weight moves at the same rate. The same
    rule as torch.optim.Muon with adjust_lr_fn='match_rms_adamw' (the reference it is tested against):
    the update is scaled by 0.2 * sqrt(max(A, B)) so its RMS matches AdamW's and one learning rate and
    schedule drive both. What differs is speed: matrices of one shape are orthogonalized together."""

    def __init__(self, params, lr, weight_decay, momentum=0.95, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype  # not a group setting: saved checkpoints stay loadable on any machine

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            bufs = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(self.state[p]["momentum_buffer"])
            grads = [p.grad for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - mom)  # momentum
            updates = torch._foreach_lerp(grads, bufs, mom)  # Nesterov: look one momentum step ahead
            by_shape = {}  # shape -> indices: one batched orthogonalization per shape
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay, as AdamW's
            for shape, idx in by_shape.items():
                ortho = orthogonalize(torch.stack([updates[i] for i in idx]), group["ns_steps"], self.ns_dtype)
                scale = -lr * 0.2 * math.sqrt(max(shape[0], shape[1]))  # match AdamW's update RMS
                torch._foreach_add_([params[i] for i in idx], list(ortho.unbind(0)), alpha=scale)


class MuonAdamW:
    """Muon (above) for the matrices inside the transformer blocks, AdamW for everything else
    (embeddings, the output layer, gains, biases), stepped and saved as one optimizer. Muon's updates are
    sized like AdamW's, so one learning rate and schedule drive both."""

    def __init__(self, model, learning_rate, weight_decay, betas, momentum, fused, ns_dtype=torch.bfloat16):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hidden = [p for n, p in params if p.dim() == 2 and ".h." in f".{n}"]  # transformer.h.<i>....weight
        rest = [p for n, p in params if not (p.dim() == 2 and ".h." in f".{n}")]
        self.muon = Muon(hidden, lr=learning_rate, weight_decay=weight_decay, momentum=momentum, ns_dtype=ns_dtype)
        self.adamw = torch.optim.AdamW(
            [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
             {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
            lr=learning_rate, betas=betas, fused=fused)

    @property
    def param_groups(self):  # what the schedule sets the lr of, and what a GradScaler unscales
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model, name, learning_rate, weight_decay, betas, device, muon_momentum=0.95,
                    ns_dtype=torch.bfloat16):
    """'adamw' (GPT-2's, nanoGPT's) or 'muon' (MuonAdamW above; ns_dtype: the precision of its
    Newton-Schulz iterations, hardware.newton_schulz_dtype of the run's dtype)."""
    fused = device.startswith("cuda")
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=learning_rate, betas=betas, fused=fused)
    if name == "muon":
        return MuonAdamW(model, learning_rate, weight_decay, betas, muon_momentum, fused, ns_dtype)
    raise UserError(f"optimizer must be 'adamw' or 'muon', got {name!r}")


def lr_at(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True, schedule="cosine",
          cooldown=0.2, progress=None):
    """Linear warmup from learning_rate / (warmup_iters + 1) (never 0), then the decay to min_lr:
    - 'cosine': cosine from learning_rate to min_lr at lr_decay_iters, constant after;
    - 'wsd' (warmup-stable-decay): learning_rate until the last `cooldown` fraction, then linear to min_lr.
    progress: the fraction of the run done (e.g. of a time budget), replacing the iteration count as the
    decay's clock. decay_lr=False: constant learning_rate throughout."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if progress is None:
        if it >= lr_decay_iters:
            return min_lr
        progress = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "wsd":
        into_cooldown = (progress - (1.0 - cooldown)) / cooldown if cooldown > 0 else 0.0
        return learning_rate - max(0.0, into_cooldown) * (learning_rate - min_lr)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)
