"""
The optimisation rules that every training script shares: which parameters get weight decay, and the
learning-rate schedule. train.py (pretraining) and finetune.py (chat fine-tuning) both call these.
"""
import math


def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices only (biases and LayerNorm gains are not decayed); frozen
    parameters (e.g. the base weights under LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_at(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr=True):
    """Linear warmup from learning_rate / (warmup_iters + 1) (never 0), then cosine decay to min_lr at
    lr_decay_iters, constant after. decay_lr=False: constant learning_rate throughout."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
