"""
Weight-only int8 for decoding. A token of decoding reads every weight once and does little arithmetic with
it: four bytes a weight in float32, one in int8. quantize_int8(model) swaps each Linear of the blocks and
the LM head for an Int8Linear, weights rounded per output channel (a row of the matrix shares one scale,
its largest magnitude over 127); activations, norms, embeddings and the KV cache stay as they were. The
model is for decoding from then on (no gradients, nothing to save).

    model = quantize_weights(model, "int8")   # sample.py, serve.py, evaluate.py: --quantize=int8

Int8Linear.forward runs torch's int8-weight matmul on the CPU (torch._weight_int8pack_mm: it widens the
weights inside the kernel, so no float copy is ever made); Int8Linear.reference dequantizes and multiplies
in plain float32, the simple path the tests hold it to. The kernel reads one row of activations at a time
well and many poorly: decoding one sequence is ~1.8x float32's speed, a long prompt's prefill ~2x slower
(dev/LOG.md has the figures).
"""
import torch
from torch import nn
from torch.nn import functional as F

from nanoforge.errors import UserError

QUANTIZE = ("none", "int8")  # the choices of --quantize


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 (out, in) and one float32 scale per output row."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,): the row's largest weight lands on 127
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))  # (N, K)
        self.register_buffer("scales", scale)  # (N,)
        self.register_buffer("scales_bf16", scale.to(torch.bfloat16))  # (N,): the kernel's, as its activations
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x):
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K): the kernel takes a matrix
        if x2.device.type == "cpu":
            # the kernel is fast with bf16 activations only (float32 ones take a path ~15x slower, AVX2 and
            # AVX-512 alike): rounding them to bf16 moves an output by ~0.4% of the largest, int8's own ~0.8%
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales_bf16).to(x.dtype)  # (M, N)
        else:  # a GPU: x (q s)^T = (x q^T) s, the int8 weight widened in the matmul's dtype (compile fuses it)
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales.to(x2.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape, self.out_features)

    def dequantized(self):
        return self.weight.float() * self.scales[:, None]  # (N, K): the float32 weight the int8 one stands for

    def reference(self, x):
        return F.linear(x.float(), self.dequantized(), self.bias)


def quantize_int8(model):
    """Swaps the Linear layers of model's blocks and its LM head for Int8Linear, in place; returns model.
    The token embedding stays float32 (a token reads one row of it: no bandwidth to save), so a head tied
    to it gets its own int8 copy."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    return model


def quantize_weights(model, quantize):
    """--quantize's value applied to a model loaded for decoding; 'none' leaves it as it is."""
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(repr(q) for q in QUANTIZE)}, got {quantize!r}")
    return quantize_int8(model) if quantize == "int8" else model
