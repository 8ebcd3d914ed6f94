"""
The optimisation rules that every training script shares: which parameters get weight decay, which
optimizer updates which parameters, and the learning-rate schedule. train.py (pretraining) and
finetune.py (chat fine-tuning) both call these.
"""
import math

import torch

from runtime import UserError


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices only (biases and LayerNorm gains are not decayed); frozen
    parameters (e.g. the base weights under LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class MuonAdamW:
    """Muon (Jordan et al., 2024) for the matrices inside the transformer blocks, AdamW for everything
    else (embeddings, the output layer, gains, biases), stepped and saved as one optimizer. Muon replaces
    each matrix's momentum by the nearest orthogonal matrix (a few Newton-Schulz iterations), so every
    direction of the weight moves at the same rate. torch's "match_rms_adamw" scaling sizes its updates
    like AdamW's, so one learning rate and schedule drive both."""

    def __init__(self, model, learning_rate, weight_decay, betas, momentum, fused):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hidden = [p for n, p in params if p.dim() == 2 and ".h." in f".{n}"]  # transformer.h.<i>....weight
        rest = [p for n, p in params if not (p.dim() == 2 and ".h." in f".{n}")]
        self.muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
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


def build_optimizer(model, name, learning_rate, weight_decay, betas, device, muon_momentum=0.95):
    """'adamw' (GPT-2's, nanoGPT's) or 'muon' (MuonAdamW above)."""
    fused = device.startswith("cuda")
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=learning_rate, betas=betas, fused=fused)
    if name == "muon":
        return MuonAdamW(model, learning_rate, weight_decay, betas, muon_momentum, fused)
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
