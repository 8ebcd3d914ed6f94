"""
Weights for decoding. A token of decoding reads every weight once and does little arithmetic with it: its
time is the time to read them. These shorten it, and decoding_weights(model, quantize) applies them:

- On a CPU, the Linear layers and the LM head multiply their few rows of activations through
  cpu_kernels.c, which reads each weight row once on all threads (torch's matmul runs that shape on one
  core). CPULinear does it in float32, the same numbers up to the order of the additions, and hands more
  rows than FEW_ROWS (a long prompt's prefill) to torch's matmul as before.
- quantize="bf16": the same CPULinear layers with their weights rounded to bfloat16, half float32's bytes,
  ~3 significant digits kept, widened back to float32 in the kernel (exactly: any AVX2 CPU, no bf16
  instructions needed). Without the kernels (a GPU) the model itself is cast to bfloat16.
- quantize="int8": weight-only int8, four times fewer bytes than float32. Each Linear of the blocks and
  the LM head becomes an Int8Linear, weights rounded per output channel (a row of the matrix shares one
  scale, its largest magnitude over 127); norms, embeddings and the KV cache stay as they were.
- The packed weights move into one block of memory on 2 MiB pages, in the order the layers run
  (packed_on_huge_pages): fewer TLB misses, and the prefetcher runs on past 4 KiB page ends.
- On a CPU with the kernels, attention with one query a sequence (every decoding step) runs
  cpu_kernels.attention's kernel in place of SDPA's (the model's attention takes it as its sdpa).

    model = decoding_weights(model, "int8")   # sample.py, serve.py, evaluate.py: --quantize=int8 (or bf16)

Int8Linear.forward runs cpu_kernels.linear_q8 (activations rounded to int8 in blocks of 32, as llama.cpp's
q8_0 does) on any number of rows: it reads int8 weights faster than torch's int8-weight matmul one row at a
time and multiplies faster at a prompt's many (dev/LOG.md). Without the kernels it is that matmul
(torch._weight_int8pack_mm, which widens the weights inside the kernel: no float copy is made); on a GPU
the weight is widened in the matmul.
Int8Linear.reference dequantizes and multiplies in plain float32, the simple path the tests hold every
one of them to. The model is for decoding from then on (no gradients, nothing to save).
"""
import functools

import torch
from torch import nn
from torch.nn import functional as F

from model import CausalSelfAttention
from nanoforge import cpu_kernels
from nanoforge.errors import UserError

QUANTIZE = ("none", "bf16", "int8")  # the choices of --quantize
# up to this many rows the float32 kernel is as fast as torch's matmuls or faster, and a prefill of them spares
# unpacking every weight (GPT-2's: ~25 ms); past them torch's blocked matmul pulls ahead (dev/LOG.md)
FEW_ROWS = 128


def kernel_rows(x):
    """Whether float32 activations x (..., K) go through cpu_kernels: a few rows on a CPU that has them,
    unless the caller asked for bf16 matmuls (--dtype=bfloat16 autocast), which are then torch's."""
    return (x.dtype == torch.float32 and x.numel() <= FEW_ROWS * x.size(-1) and x.is_cpu
            and not torch.is_autocast_enabled("cpu") and cpu_kernels.available())


class BoundLayer(nn.Module):
    """A layer that multiplies through cpu_kernels with its weight checked once (a cpu_kernels.Bound, made at the
    first call by product()): checking it every call took a third of the call's Python, and reading the module's
    tensors to see whether they are still the bound ones ~2 us more (nn.Module's attribute lookup). The bound
    product is dropped instead whenever an attribute is set (a weight replaced) or the module converted (to(),
    half(): tensors swapped), and made again at the next call. What goes around nn.Module, a `.data` assigned by
    hand, is not seen: the Bound keeps the old memory alive and reads it (set bound to None after such a swap)."""

    bound = None

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name != "bound" and self.__dict__.get("bound") is not None:
            self.bound = None

    def _apply(self, fn, recurse=True):
        self.bound = None
        return super()._apply(fn, recurse)


class CPULinear(BoundLayer):
    """y = x W^T + b, the weight and bias of the nn.Linear it replaces, the weight stored packed in the order
    cpu_kernels.linear_f32 reads it (cpu_kernels.pack_f32), or with bf16 rounded to bfloat16 for linear_bf16
    (pack_bf16). Up to FEW_ROWS rows go through that kernel; more (a long prompt's prefill) and bf16 autocast
    through F.linear, the reference, on the weight unpacked (a copy: ~1 ms for one of GPT-2's matrices, beside
    its products at a prefill's rows). keep_weight: the (N, K) weight is kept too, shared as it was (GPT-2's
    head, tied to the token embedding, which needs it; the chunked loss reads lm_head.weight). A width the
    kernel does not take (not a multiple of its blocks) stays as it was, unpacked and unrounded, on F.linear."""

    def __init__(self, linear, keep_weight=False, bf16=False):
        super().__init__()
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = self.in_features % cpu_kernels.F32_BLOCK == 0
        self.bf16 = bf16 and self.packed
        if self.packed:
            pack = cpu_kernels.pack_bf16 if self.bf16 else cpu_kernels.pack_f32
            self.register_buffer("packed_weight", pack(linear.weight.detach()))  # (G, K/16, 4, 16)
        if keep_weight or not self.packed:
            self.weight = linear.weight  # (N, K)

    def full_weight(self):
        """The (N, K) float32 weight the layer multiplies by: the one kept, or the packed one unpacked (and
        widened from bfloat16: a kept weight is then the unrounded one, which the products do not use)."""
        kept = getattr(self, "weight", None)
        if kept is not None and not self.bf16:
            return kept
        return cpu_kernels.unpack(self.packed_weight, self.out_features).float()

    def forward(self, x):
        if not (self.packed and kernel_rows(x)):
            return F.linear(x, self.full_weight(), self.bias)
        if torch.compiler.is_compiling():
            kernel = cpu_kernels.linear_bf16_op if self.bf16 else cpu_kernels.linear_f32_op
            return kernel(x.contiguous(), self.packed_weight, self.out_features, self.bias)  # (..., N), bias added
        return self.product()(x.contiguous())

    def product(self):
        """The kernel bound to this layer's weight and bias (BoundLayer)."""
        if self.bound is None:
            bind = cpu_kernels.bind_bf16 if self.bf16 else cpu_kernels.bind_f32
            self.bound = bind(self.packed_weight, self.out_features, self.in_features, self.bias)
        return self.bound

    def reference(self, x):
        return F.linear(x, self.full_weight(), self.bias)


class Int8Linear(BoundLayer):
    """y = x W^T + b with W stored as int8 (out, in) and one float32 scale per output row. On a CPU with the
    kernels (and in_features a multiple of their blocks) the int8 weight is stored packed in the order
    cpu_kernels.linear_q8 reads it (cpu_kernels.pack_q8), and every product, a prompt's prefill too, runs
    there; elsewhere it stays (out, in) for torch's kernels."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,): the row's largest weight lands on 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.packed = w.device.type == "cpu" and self.in_features % cpu_kernels.BLOCK == 0 and cpu_kernels.available()
        self.register_buffer("weight", cpu_kernels.pack_q8(q) if self.packed else q)  # (G, K/32, 4, 32) or (N, K)
        self.register_buffer("scales", scale)  # (N,)
        if not self.packed:  # (N,): torch's int8 kernel's, in bf16 as its activations
            self.register_buffer("scales_bf16", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def product(self):
        """The kernel bound to the weight, scales and bias (BoundLayer)."""
        if self.bound is None:
            self.bound = cpu_kernels.bind_q8(self.weight, self.scales, self.in_features, self.bias)
        return self.bound

    def int8_weight(self):
        """The (N, K) int8 weight, unpacked if it is stored packed."""
        return cpu_kernels.unpack(self.weight, self.out_features) if self.packed else self.weight

    def forward(self, x):
        if self.packed and x.is_cpu:  # the bias is added in the kernel: a call less a layer
            if torch.compiler.is_compiling():
                return cpu_kernels.linear_q8_op(x.float().contiguous(), self.weight, self.scales, self.bias).to(x.dtype)
            y = self.product()(x.float().contiguous())  # (..., N)
            return y if x.dtype == torch.float32 else y.to(x.dtype)  # a no-op .to still costs a microsecond
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K): torch's int8 kernel takes a matrix
        if x2.device.type == "cpu":
            # torch's kernel is fast with bf16 activations only (float32 ones take a path ~15x slower, AVX2 and
            # AVX-512 alike): rounding them to bf16 moves an output by ~0.4% of the largest, int8's own ~0.8%
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales_bf16).to(x.dtype)  # (M, N)
        else:  # a GPU: x (q s)^T = (x q^T) s, the int8 weight widened in the matmul's dtype (compile fuses it)
            y = F.linear(x2, self.int8_weight().to(x2.dtype)) * self.scales.to(x2.dtype)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape, self.out_features)

    def dequantized(self):
        return self.int8_weight().float() * self.scales[:, None]  # (N, K): the float32 weight the int8 one stands for

    def reference(self, x):
        return F.linear(x.float(), self.dequantized(), self.bias)


def swap_linears(model, kind):
    """Replaces every nn.Linear of model (the blocks' and the LM head) by kind(linear), in place."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, kind(child))
    return model


def quantize_int8(model):
    """Swaps the Linear layers of model's blocks and its LM head for Int8Linear, in place; returns model.
    The token embedding stays float32 (a token reads one row of it: no bandwidth to save), so a head tied
    to it gets its own int8 copy."""
    return swap_linears(model, Int8Linear)


def decoding_weights(model, quantize):
    """--quantize's value applied to a model loaded for decoding, in place: 'int8' swaps in Int8Linear
    layers; 'none' keeps the float weights and, on a CPU with cpu_kernels, multiplies them there; 'bf16'
    rounds them to bfloat16 there (without the kernels, the model is cast to bfloat16)."""
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(repr(q) for q in QUANTIZE)}, got {quantize!r}")
    # built now, not inside the first step (or a compiled graph)
    kernels = model.lm_head.weight.device.type == "cpu" and cpu_kernels.available()
    if quantize == "int8":
        quantize_int8(model)
    elif kernels and model.lm_head.weight.dtype == torch.float32:
        bf16 = quantize == "bf16"
        model.lm_head = CPULinear(model.lm_head, keep_weight=True, bf16=bf16)  # first: swap_linears passes it by
        swap_linears(model, functools.partial(CPULinear, bf16=bf16))
    elif quantize == "bf16":
        model.to(torch.bfloat16)
    if kernels:  # one query a sequence: cpu_kernels.attention's own kernel (SDPA's otherwise)
        for m in model.modules():
            if isinstance(m, CausalSelfAttention):
                m.sdpa = cpu_kernels.attention
    return packed_on_huge_pages(model)


def packed_on_huge_pages(model):
    """Moves the packed weights of model's CPULinear and Int8Linear layers into one block of 2 MiB pages
    (cpu_kernels.HugePages), in the order the layers run; returns model."""
    layers = [(m, "packed_weight" if isinstance(m, CPULinear) else "weight") for m in model.modules()
              if isinstance(m, (CPULinear, Int8Linear)) and m.packed]
    block = cpu_kernels.HugePages([getattr(m, name).nbytes for m, name in layers])
    for m, name in layers:
        setattr(m, name, block.copy(getattr(m, name)))  # the buffer replaced: the packed one is freed
    return model
