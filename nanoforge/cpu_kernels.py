"""
The CPU's decoding matmuls and one-query attention (cpu_kernels.c), built once for this machine and called
through ctypes.

Decoding multiplies one row of activations (a few, serving several sequences) by each weight matrix: the
time is the time to read the weights. torch hands that shape to a library that runs it on one core here
(~12 GB/s on a 2-core AMD EPYC, against the ~25-30 GB/s the machine can stream), and its int8-weight
kernel reads ~8 GB/s. cpu_kernels.c reads each weight row once for all rows of activations, on all of
torch's threads, in float32, bfloat16 and int8 (dev/LOG.md has the measurements).

The C file is compiled on first use with the machine's compiler (`cc`, or $CC) for this CPU
(-march=native), into ~/.cache/nanoforge (or $XDG_CACHE_HOME/nanoforge), named by a hash of the source,
the compiler command and the CPU, written beside its place and renamed in. No compiler, no AVX2/FMA (an
older x86 or an ARM CPU), or NANOFORGE_CPU_KERNELS=0: available() is False and the callers use torch's
matmuls, the reference the tests hold these to.

    if cpu_kernels.available():
        p = cpu_kernels.pack_f32(w)                 # w (N, K) float32 -> the order linear_f32 reads it in
        y = cpu_kernels.linear_f32(x, p, N, b)      # x (..., K) float32 -> x w^T + b, (..., N); b may be None
        h = cpu_kernels.pack_bf16(w)                # w rounded to bfloat16, half the bytes, in that order
        y = cpu_kernels.linear_bf16(x, h, N, b)     # the same product, each weight widened to float32
        q = cpu_kernels.pack_q8(w8)                 # w8 (N, K) int8 -> the order linear_q8 reads it in
        y = cpu_kernels.linear_q8(x, q, scales, b)  # with a float32 scale per row of w8, (N,)
        f = cpu_kernels.bind_q8(q, scales, K, b)    # the same, its weights checked once: y = f(x) (a layer's)
        y = cpu_kernels.attention(q, k, v, mask)    # F.scaled_dot_product_attention, one query a sequence here
"""
import ctypes
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess

import torch
from torch.nn import functional as F

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
BLOCK = 32  # linear_q8 quantizes activations in blocks of this many values: K must be a multiple
F32_BLOCK = 16  # linear_f32's weights are packed in blocks of this many floats: K must be a multiple

_lib = None  # the loaded library, once built
_why = None  # why it is unavailable, once known


def cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanoforge")


def _cpu_id():
    """What -march=native depends on: a library built for one CPU may not run on another (a home folder
    shared between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build():
    """The path of the compiled library, compiling it if this source, compiler and CPU have none yet."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc}) on PATH")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join([cc, *FLAGS, platform.machine(), _cpu_id()]).encode()).hexdigest()
    path = os.path.join(cache_dir(), f"cpu_kernels-{key[:16]}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # beside its place, renamed in: two processes building at once both win
    try:
        done = subprocess.run([cc, *FLAGS, SOURCE, "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no message)"]
            raise OSError(f"{cc} could not build {os.path.basename(SOURCE)}: {lines[0]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def available():
    """True when the kernels are built (or build now) and load on this machine; the first call builds."""
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib is not None
    if os.environ.get("NANOFORGE_CPU_KERNELS", "1") == "0":
        _why = "turned off by NANOFORGE_CPU_KERNELS=0"
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _why = f"they are written for x86-64 with AVX2, this is {platform.machine()}"
        return False
    try:
        lib = ctypes.CDLL(_build())  # torch is imported, so its OpenMP runtime is the one the library uses
    except OSError as e:
        _why = str(e)
        return False
    P, I, T = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.linear_f32.argtypes = [P, P, P, P, I, I, I, T]
    lib.linear_bf16.argtypes = [P, P, P, P, I, I, I, T]
    lib.linear_f32.restype = lib.linear_bf16.restype = None  # void: nothing to read back
    lib.linear_q8.argtypes = [P, P, P, P, P, I, I, I, T]
    lib.attend_one.argtypes = [P, P, P, P, P, *[I] * 15, ctypes.c_float, T]
    _lib = lib
    return True


def status():
    """One line for benchmarks and logs: whether decoding uses these kernels, and if not why."""
    return "nanoforge's CPU kernels (cpu_kernels.c)" if available() else f"torch's matmuls ({_why})"


def _vector(v, N):
    """Whether v is what the kernels read as a float32 vector of N (a scale or bias per output)."""
    return v.dtype == torch.float32 and v.shape == (N,) and v.is_cpu and v.is_contiguous()


def _check(w, wdtype, wshape, bias, N):
    """Raises unless w and bias are what the C code expects (x is _product's to check)."""
    # a wrong pointer or size is a crash, not an exception: every promise the C code relies on is checked
    fits = (w.dtype == wdtype and w.shape == wshape and w.is_cpu and w.is_contiguous()
            and (bias is None or _vector(bias, N)))
    if not available():  # the first call builds the library
        raise RuntimeError(f"the CPU kernels are not available ({_why}): check available() first")
    if not fits:
        got = "" if bias is None else f", bias {bias.dtype} {tuple(bias.shape)}"
        raise ValueError(f"w must be a contiguous {wdtype} tensor of shape {tuple(wshape)} and bias None or {N} "
                         f"contiguous float32s, all on the CPU: got {w.dtype} {tuple(w.shape)}{got}")


def packed_shape(N, K, block):
    """The shape of a packed (N, K) weight: (groups of four rows, blocks, 4, block)."""
    return (N + 3) // 4, K // block, 4, block


def _pack(w, block):
    """w (N, K) -> packed_shape(N, K, block): rows in groups of four, the last padded with zero rows, and
    within a group the four rows' first block side by side, then their second, ...: the bytes in the order
    the kernels use them (cpu_kernels.c says why). K a multiple of block."""
    N, K = w.shape
    if K % block:
        raise ValueError(f"packing needs K a multiple of {block}, got {K}")
    G = (N + 3) // 4
    w = torch.cat([w, w.new_zeros(4 * G - N, K)]) if N % 4 else w  # (4G, K)
    return w.reshape(G, 4, K // block, block).transpose(1, 2).contiguous()  # (G, K/block, 4, block)


def pack_f32(w):
    """w (N, K) float32 -> the layout linear_f32 reads, in blocks of F32_BLOCK."""
    return _pack(w, F32_BLOCK)


def pack_bf16(w):
    """w (N, K) float32 -> rounded to bfloat16 (to nearest), in the layout linear_bf16 reads (pack_f32's)."""
    return _pack(w.to(torch.bfloat16), F32_BLOCK)


def pack_q8(w):
    """w (N, K) int8 -> the layout linear_q8 reads, in blocks of BLOCK."""
    return _pack(w, BLOCK)


# x86-64's large page: one TLB entry covers what 512 small (4 KiB) ones do, and the hardware prefetcher, which
# stops at a page's end, runs on through it. Weights read front to back every token on such pages read faster:
# a token of GPT-2 1.04-1.19x on an AMD Zen 4 (dev/LOG.md)
HUGE_PAGE = 2 << 20


class HugePages:
    """One block of memory, room for tensors of the given byte sizes side by side, that Linux is asked to back
    with 2 MiB pages (madvise MADV_HUGEPAGE: with transparent huge pages set to 'madvise', most distributions'
    default, memory gets them only when asked). copy(t) puts the next tensor in: contiguous, on a 64-byte
    line, after the one before. One at a time, so a caller can let each original go before the next copy
    (peak memory: the block and one matrix, not twice the weights). Where the system has no such pages (THP
    'never', another OS) the block is ordinary memory: the copies are the same either way."""

    def __init__(self, sizes):
        self.used = 0
        total = -(-sum(-(-n // 64) * 64 for n in sizes) // HUGE_PAGE) * HUGE_PAGE  # whole large pages
        if total and hasattr(mmap, "MADV_HUGEPAGE"):
            # a page more than needed, so the copies can start on a large page's boundary
            block = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            raw = torch.frombuffer(block, dtype=torch.uint8)  # the tensor keeps the mapping alive
            first = -raw.data_ptr() % HUGE_PAGE
            try:
                block.madvise(mmap.MADV_HUGEPAGE, first, total)
            except OSError:  # a kernel built without transparent huge pages
                pass
            self.raw = raw[first:first + total]
        else:
            self.raw = torch.empty(total, dtype=torch.uint8)

    def copy(self, t):
        n = t.nbytes
        if self.used + n > self.raw.numel():
            raise ValueError(f"no room left for {n} bytes ({self.raw.numel() - self.used} of {self.raw.numel()} free)")
        c = self.raw[self.used:self.used + n].view(t.dtype).view(t.shape).copy_(t)
        self.used += -(-n // 64) * 64  # the next copy on a 64-byte line
        return c


def unpack(packed, N):
    """pack_f32's, pack_bf16's or pack_q8's inverse: the (N, K) weight (a copy)."""
    G, B, _, block = packed.shape
    return packed.transpose(1, 2).reshape(4 * G, B * block)[:N].contiguous()


def linear_f32(x, w, N, bias=None):
    """x (..., K) float32 contiguous, w an (N, K) float32 weight packed by pack_f32, bias None or (N,) float32
    -> x w^T + bias, (..., N), as F.linear: x's leading dims are its M rows (no reshape on the way: decoding
    makes ~50 of these calls a token, and each of its small operations costs a microsecond or two)."""
    _check16(torch.float32, w, N, x.size(-1), bias)
    return _product("linear_f32", _pointers((w, bias)), x.size(-1), N, x)


def linear_bf16(x, w, N, bias=None):
    """linear_f32 with w bfloat16, packed by pack_bf16: each weight widened to float32 exactly, float32 sums."""
    _check16(torch.bfloat16, w, N, x.size(-1), bias)
    return _product("linear_bf16", _pointers((w, bias)), x.size(-1), N, x)


def linear_q8(x, w, scales, bias=None):
    """x (..., K) float32 contiguous, w an (N, K) int8 weight packed by pack_q8, scales (N,) float32, bias None
    or (N,) float32 -> x (w * scales[:, None])^T + bias, (..., N), with x rounded to int8 in blocks of 32 on
    the way (K a multiple of 32). Any number of rows: a prompt's prefill runs here too."""
    _check_q8(w, scales, x.size(-1), bias)
    return _product("linear_q8", _pointers((w, scales, bias)), x.size(-1), scales.size(0), x)


def _check16(wdtype, w, N, K, bias):
    if K % F32_BLOCK:
        raise ValueError(f"linear_f32 and linear_bf16 need K a multiple of {F32_BLOCK}, got {K}")
    _check(w, wdtype, packed_shape(N, K, F32_BLOCK), bias, N)


def _check_q8(w, scales, K, bias):
    N = scales.size(0)
    if K % BLOCK:
        raise ValueError(f"linear_q8 needs K a multiple of {BLOCK}, got {K}")
    _check(w, torch.int8, packed_shape(N, K, BLOCK), bias, N)
    if not _vector(scales, N):
        raise ValueError(f"linear_q8 needs {N} contiguous float32 scales, got {scales.dtype} {tuple(scales.shape)}")


def _pointers(tensors):
    return tuple([0 if t is None else t.data_ptr() for t in tensors])


def _product(name, pointers, K, N, x):
    """The library's product `name` of x (..., K) and the checked weight tensors, given by their pointers
    (_pointers: w, then scales for linear_q8, then bias or 0): x checked, y (..., N) made."""
    if not (x.dtype == torch.float32 and x.is_cpu and x.is_contiguous() and x.dim() >= 1 and x.size(-1) == K):
        raise ValueError(f"{name}: x must be a contiguous float32 tensor on the CPU, (..., {K}): got {x.dtype} "
                         f"{tuple(x.shape)}{'' if x.is_contiguous() else ', not contiguous'}")
    y = torch.empty(*x.shape[:-1], N)
    M = x.numel() // K
    if getattr(_lib, name)(x.data_ptr(), *pointers, y.data_ptr(), M, K, N, torch.get_num_threads()):
        raise MemoryError(f"no memory for the int8 copy of a ({M}, {K}) input")  # only linear_q8 can fail
    return y


# A layer multiplies by the same weight every step: bind_* check it (and its scales and bias) once and give a
# Bound, which then checks x alone. The weight's checks were most of a call's Python: without them an eager
# int8 token of GPT-2 went 1.13x faster (dev/LOG.md).

def bind_f32(w, N, K, bias=None):
    """linear_f32 for inputs of width K, bound to w and bias."""
    _check16(torch.float32, w, N, K, bias)
    return Bound("linear_f32", (w, bias), K, N)


def bind_bf16(w, N, K, bias=None):
    """linear_bf16 for inputs of width K, bound to w and bias."""
    _check16(torch.bfloat16, w, N, K, bias)
    return Bound("linear_bf16", (w, bias), K, N)


def bind_q8(w, scales, K, bias=None):
    """linear_q8 for inputs of width K, bound to w, scales and bias."""
    _check_q8(w, scales, K, bias)
    return Bound("linear_q8", (w, scales, bias), K, N=scales.size(0))


class Bound:
    """One of the library's products with its weight tensors (w, then scales for linear_q8, then bias or None)
    checked: bound(x) multiplies x (..., K). It holds the storages its pointers point into, so they stay valid
    whatever becomes of the tensors (the layer that holds it, quantize.BoundLayer, binds again when they change)."""

    def __init__(self, name, tensors, K, N):
        self.name, self.K, self.N = name, K, N
        self.pointers = _pointers(tensors)
        self.storages = [t.untyped_storage() for t in tensors if t is not None]

    def __call__(self, x):
        return _product(self.name, self.pointers, self.K, self.N, x)

    def __deepcopy__(self, memo):
        return None  # a copy of a layer binds its own tensors, not a second copy of these storages


ATTN_D = 256  # attend_one takes heads up to this wide (and a multiple of 8)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """F.scaled_dot_product_attention, with decoding's case, one query a sequence (q (B, H, 1, D) against k and v
    (B, H, L, D), float32 on the CPU, a boolean mask or none), run by attend_one: SDPA's CPU kernel spends ~50 us
    on such a call, mostly setting up for blocks of queries, where the arithmetic is a few microseconds and the
    keys are read once. Every other case is SDPA's. The same numbers as SDPA's up to the order of the sums."""
    B, H, T, D = q.shape
    L = k.size(2)
    if not (T == 1 and L > 0 and not is_causal and dropout_p == 0.0 and D % 8 == 0 and D <= ATTN_D
            and q.dtype == k.dtype == v.dtype == torch.float32 and q.is_cpu and k.is_cpu and v.is_cpu
            and k.shape == v.shape == (B, H, L, D) and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and (attn_mask is None or attn_mask.dtype == torch.bool and attn_mask.is_cpu) and available()
            and not torch.compiler.is_compiling()):  # compiled: inductor's own fusion (0.97x this, dev/LOG.md)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale)
    return attend_one(q, k, v, attn_mask, 1.0 / math.sqrt(D) if scale is None else scale)


def attend_one(q, k, v, mask, scale):
    """attention's kernel call, its promises checked by attention: q (B, H, 1, D), k, v (B, H, L, D), mask None or
    boolean, broadcastable to (B, H, 1, L) -> (B, H, 1, D)."""
    B, H, _, D = q.shape
    L = k.size(2)
    y = torch.empty(B, H, 1, D)
    m = (0, 0, 0, 0) if mask is None else mask.expand(B, H, 1, L).stride()
    if _lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if mask is None else mask.data_ptr(),
                       y.data_ptr(), B, H, L, D, q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
                       m[0], m[1], m[3], scale, torch.get_num_threads()):
        raise MemoryError(f"no memory for the attention scores of {B} x {H} x {L}")
    return y


# The same two products as torch operators, for torch.compile: a compiled graph calls these as opaque ops
# (a ctypes call inside a traced function would break the graph at every layer). Eager code calls the
# functions above directly: the operator's dispatch costs a few us a call. Defined on a torch.library.Library
# rather than with torch.library.custom_op, whose wrapper cost ~17 us a call against ~9 (~0.4 ms of a
# compiled int8 token of GPT-2, 49 calls; dev/LOG.md); they have no autograd: decoding needs none.
_ops = torch.library.Library("nanoforge", "DEF")
_ops.define("linear_f32(Tensor x, Tensor w, int N, Tensor? bias=None) -> Tensor")
_ops.define("linear_bf16(Tensor x, Tensor w, int N, Tensor? bias=None) -> Tensor")
_ops.define("linear_q8(Tensor x, Tensor w, Tensor scales, Tensor? bias=None) -> Tensor")
_ops.impl("linear_f32", lambda x, w, N, bias=None: linear_f32(x.contiguous(), w, N, bias), "CPU")
_ops.impl("linear_bf16", lambda x, w, N, bias=None: linear_bf16(x.contiguous(), w, N, bias), "CPU")
_ops.impl("linear_q8", lambda x, w, scales, bias=None: linear_q8(x.contiguous(), w, scales, bias), "CPU")


@torch.library.register_fake("nanoforge::linear_f32")
@torch.library.register_fake("nanoforge::linear_bf16")
def _(x, w, N, bias=None):
    return x.new_empty(*x.shape[:-1], N)


@torch.library.register_fake("nanoforge::linear_q8")
def _(x, w, scales, bias=None):
    return x.new_empty(*x.shape[:-1], scales.size(0))


linear_f32_op = torch.ops.nanoforge.linear_f32.default
linear_bf16_op = torch.ops.nanoforge.linear_bf16.default
linear_q8_op = torch.ops.nanoforge.linear_q8.default
