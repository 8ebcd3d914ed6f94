"""
The machine a run is on: the device, the CPU's class, the precision and compile choice (resolved after
overrides and printed with the reason, measured where it matters), malloc tuning, autocast, and the
device's peak FLOP/s for MFU.
"""
import contextlib
import math
import os
import platform
import subprocess
import sys
import time

import torch

import model as model_module
from nanoforge import lm_head_loss
from nanoforge.errors import UserError


def resolve_device(device):
    """'auto' -> cuda if present, else mps, else cpu. Returns (device string, reason)."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda", "auto: CUDA is available"
        if torch.backends.mps.is_available():
            return "mps", "auto: Apple MPS is available"
        return "cpu", "auto: no CUDA or MPS device"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for but torch sees no CUDA GPU; use --device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for but it is not available here; use --device=cpu")
    return device, "as configured"


def cpu_info():
    """What this CPU is and can do, read from the OS: its model name, the widest vector unit torch's
    matmuls use on it ('AMX', 'AVX-512', 'AVX2', 'NEON', ...) and whether it multiplies bf16 natively
    (AVX-512 BF16 or AMX on x86, FEAT_BF16 on Arm). Without native bf16 a bf16 matmul is emulated,
    hundreds of times slower than fp32 (AMD before Zen 4, Intel Core from 12th gen, Apple M1).
    ONEDNN_MAX_CPU_ISA (oneDNN's cap on the instructions it uses, e.g. AVX2) is honoured, so a capped
    process describes what it really runs."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware") and name in ("", platform.processor(), platform.machine()):
                    name = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: ask sysctl (macOS)
        def sysctl(key):
            try:
                return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""
        name = sysctl("machdep.cpu.brand_string") or name
        if sysctl("hw.optional.arm.FEAT_BF16") == "1":
            flags.add("bf16")
        if platform.machine() == "arm64":
            flags.add("asimd")
    if {"amx_tile", "amx_bf16"} <= flags:
        isa = "AMX"
    elif "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    elif "asimd" in flags or platform.machine() in ("arm64", "aarch64"):
        isa = "NEON"
    else:
        isa = "SSE"
    native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not any(s in cap for s in ("AVX512_CORE_BF16", "AVX512_CORE_AMX", "AVX10", "ALL")):
        native_bf16 = False
        isa = "AVX2" if "AVX2" in cap else isa if "AVX512" in cap else "SSE"
    return {"name": name, "isa": isa, "native_bf16": native_bf16, "cores": os.cpu_count()}


def describe_cpu(info=None):
    """One line naming the CPU and its class, printed beside every speed figure."""
    info = info or cpu_info()
    return f"{info['name']}, {info['cores']} cores, {info['isa']}, bf16 {'native' if info['native_bf16'] else 'emulated'}"


def resolve_dtype(dtype, device, shape=(2048, 768)):
    """'auto' -> bfloat16 on GPUs that have it, float16 (with a GradScaler) on older GPUs; on a CPU,
    bfloat16 only where it is measured faster than float32 at the model's matmul shape (`shape`: rows of
    a step, n_embd; timed as (rows, n_embd) @ (n_embd, 4 n_embd), the MLP's), else float32. An explicit
    bfloat16 on a CPU without native bf16 is kept, with the measured slowdown in the reason. Returns
    (dtype name, reason); the CPU's measurements take under a second and are kept for the process."""
    names = ("float32", "bfloat16", "float16")
    if dtype not in names + ("auto",):
        raise UserError(f"unknown dtype '{dtype}': use auto, {', '.join(names)}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError(f"dtype float16 needs a CUDA device (got {device}); use bfloat16 or float32")
    if device.startswith("cuda"):
        if dtype != "auto":
            return dtype, "as configured"
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: this GPU supports bf16"
        return "float16", "auto: this GPU lacks bf16, so fp16 with loss scaling"
    if device != "cpu" or dtype == "float32":
        if dtype == "auto":
            return "float32", f"auto: {device} trains in fp32 (bf16 autocast is opt-in: --dtype=bfloat16)"
        return dtype, "as configured"
    info = cpu_info()
    rows, C = min(int(shape[0]), 2048), int(shape[1])  # more rows than 2048 run at the same rate
    if dtype == "auto" and 8 * rows * C * C < SMALL_MATMUL:
        return "float32", f"auto: matmuls of {rows}x{C}x{4 * C} are too small for bf16 to pay (casts cost more)"
    fp32 = measure_matmul_flops(device, "float32", (rows, C, 4 * C))
    if not info["native_bf16"]:  # emulated: a small probe says how slow, a big one would take minutes
        n = peak_probe_size(device, "bfloat16")
        bf16 = measure_matmul_flops(device, "bfloat16", (n, n, n))
    else:
        bf16 = measure_matmul_flops(device, "bfloat16", (rows, C, 4 * C))
    rates = f"{format_flops(bf16)} bf16 vs {format_flops(fp32)} fp32"
    cls = f"{info['isa']}, bf16 {'native' if info['native_bf16'] else 'emulated'}"
    if dtype == "bfloat16":
        if bf16 < fp32:
            return dtype, (f"as configured, but this CPU ({cls}) runs bf16 matmuls {fp32 / bf16:.0f}x slower than "
                           f"fp32 ({rates}); --dtype=auto picks float32")
        return dtype, "as configured"
    # bf16 only where it clearly wins: autocast adds casts the matmul probe does not see
    if info["native_bf16"] and bf16 > 1.2 * fp32:
        return "bfloat16", f"auto: {cls}, bf16 measured {bf16 / fp32:.1f}x fp32 at {rows}x{C}x{4 * C} ({rates})"
    return "float32", f"auto: {cls}, fp32 is faster here at {rows}x{C}x{4 * C} ({rates})"


SMALL_MATMUL = 1e8  # FLOPs of the MLP's matmul below which a CPU stays in fp32 without measuring: timings
# of so small a matmul are mostly overhead, and would pick either dtype by chance on a busy machine


def newton_schulz_dtype(dtype):
    """The precision of Muon's Newton-Schulz iterations: bf16 where the run itself chose bf16 (it is then
    fast on this device), fp32 otherwise (on a CPU without native bf16, bf16 would be ~300x slower)."""
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def resolve_compile(compile, device, expected_seconds=0.0):
    """'auto' -> torch.compile on CUDA (it pays for itself); on a CPU only when the run is expected to
    train for at least COMPILE_PAYS_AFTER seconds (inductor's first compile takes ~20-60 s on a laptop)
    and a C++ compiler is there for inductor's kernels. Returns (on, reason)."""
    if compile == "auto":
        if device.startswith("cuda"):
            return True, "auto: CUDA, compile pays off"
        if device != "cpu":
            return False, f"auto: {device}, eager"
        if expected_seconds < COMPILE_PAYS_AFTER:
            return False, (f"auto: a ~{expected_seconds:.0f}s run does not repay a ~30 s compile "
                           f"(on from {COMPILE_PAYS_AFTER:.0f}s)")
        cxx = cpp_compiler()
        if not cxx:
            return False, "auto: no C++ compiler for torch.compile's CPU kernels (install g++), eager"
        return True, f"auto: a ~{expected_seconds:.0f}s run repays a ~30 s compile ({cxx})"
    if not isinstance(compile, bool):
        raise UserError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile, "as configured"


COMPILE_PAYS_AFTER = 120.0  # seconds of training from which compiling (~30 s, 1.3-2x faster steps) pays


def cpp_compiler():
    """The C++ compiler inductor will call (CXX, else g++), if it is installed; None otherwise."""
    import shutil
    return shutil.which(os.environ.get("CXX") or "g++")


class GELUTanhSigmoid(torch.nn.Module):
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(u)), written as the identical x * sigmoid(2u), u = sqrt(2/pi) (x +
    0.044715 x^3), for compiled runs: tanh is slow on CPUs (2 ms for 1.5M floats here, exp 0.4 ms), so
    torch.compile's CPU kernels of the tanh form ran 2x slower than these (dev/LOG.md). Eager code keeps
    nn.GELU's one fused kernel; they agree to float rounding (tested)."""

    def forward(self, x):
        return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 * sqrt(2 / pi)


def prepare_to_compile(model, undo=False):
    """What compiled runs change, applied from outside the model before torch.compile (undo=True: back to
    eager's): the MLPs' GELU in its sigmoid form, and the chunked LM head kept eager (lm_head_loss)."""
    for m in model.modules():
        if isinstance(m, model_module.MLP):
            m.gelu = torch.nn.GELU(approximate="tanh") if undo else GELUTanhSigmoid()
    if not undo:
        lm_head_loss.keep_eager_under_compile()


def sdpa_backward(device, dtype):
    """Whether attention takes the fused SDPA kernel where a backward follows (CausalSelfAttention's
    sdpa_backward, set by the scripts that train). Not in bf16 on a CPU: PyTorch's CPU flash-attention
    backward is ~5x slower there than the plain path, whose matmuls run in bf16 (dev/LOG.md). Without a
    backward (decoding, evaluation) the fused kernel stays the faster one (-13% a cached token)."""
    return not (device.split(":")[0] == "cpu" and dtype == "bfloat16")


def compile_model(model, warmup, log=print):
    """torch.compile(model), compiled now: inductor compiles lazily at the first call, so `warmup(m)` runs
    one representative step (a forward and backward) at once and returns its loss. Returns (the model to
    use, seconds the compile took). If compiling fails (no working C++ compiler, an unsupported op), or the
    compiled step's loss is not finite where the eager model's is (torch 2.13's AVX2 kernels at one CPU
    thread gave nan), says so in one line and returns the eager model: a run is never lost to compiling."""
    t0 = time.perf_counter()
    prepare_to_compile(model)
    compiled = torch.compile(model)
    try:
        loss = float(warmup(compiled))
    except Exception as e:  # inductor's errors have many types; any of them means: run eager
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log(f"torch.compile failed ({type(e).__name__}: {first}); training eager instead")
        torch._dynamo.reset()
        prepare_to_compile(model, undo=True)
        return model, time.perf_counter() - t0
    if not math.isfinite(loss) and math.isfinite(eager := float(warmup(model))):
        log(f"torch.compile gave a loss of {loss} where eager gives {eager:.4f}; training eager instead")
        torch._dynamo.reset()
        prepare_to_compile(model, undo=True)
        return model, time.perf_counter() - t0
    return compiled, time.perf_counter() - t0


def malloc_policy(device, save_memory=False):
    """How glibc's malloc treats memory a training step frees, for training on a CPU (on a GPU the
    activations are not malloc's), on Linux with glibc. Returns the line to log where it was set, else None.
    - Speed (the default): keep it in the process for the next step. glibc hands big blocks (a step's
      activations and gradients) back to the kernel when freed, so every step faulted the same pages in
      again: up to a third of a step on 2 cores (dev/LOG.md). Both thresholds at 1 GiB stop it.
    - save_memory (gradient checkpointing: the run is there to fit): every block of 1 MiB or more goes
      back at once, mmap'd. glibc's default moves that threshold up as blocks are freed, and the tensors
      under it stay in its heap, fragmented: 1-1.3 GiB above the live tensors at the GPT-2 shape, and
      checkpointing's 46% saving in live memory showed as 37% of the process (41% with this; dev/LOG.md)."""
    if device != "cpu" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    if save_memory:
        if libc.mallopt(m_mmap_threshold, 1 << 20):
            return "cpu: freed blocks of 1 MiB or more go back to the system at once (hardware.malloc_policy, save_memory)"
    elif libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "cpu: freed memory is kept for reuse (malloc thresholds raised: hardware.malloc_policy)"
    return None


def step_memory_warning(cfg, n_params, batch_size, dtype, chunked_loss, checkpointing):
    """A warning line when one training step of this model at this batch is estimated to need more memory
    than the machine has, else None: a context of 100,000 on a laptop otherwise grows for minutes and
    then fails. The estimate: weights, gradients and AdamW's two moments in fp32, plus activations of
    ~68 C bytes a token a layer in fp32 (half that in bf16; one layer's worth with checkpointing), the
    (T, T) attention weights of each head where the plain attention runs (bf16 on a CPU), and the
    (B, T, V) logits three times over where the loss is not chunked."""
    B, T, C, L, nh, V = batch_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    width = 4 if dtype == "float32" else 2
    per_layer = B * T * (17 * C * width + (nh * T * width * 2 if dtype != "float32" else 0))
    need = 16 * n_params + per_layer * (1 if checkpointing else L) + (0 if chunked_loss else 3 * 4 * B * T * V)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    if need <= ram:
        return None
    return (f"warning: a step of {B} x {T} tokens is estimated to need {need / 2**30:,.0f} GiB, more than this "
            f"machine's {ram / 2**30:.0f} GiB; lower batch_size or block_size (or gradient_checkpointing=True)")


def autocast(device, dtype):
    """The mixed-precision context for forward passes; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))



# -----------------------------------------------------------------------------------------------------
# peak FLOP/s, for MFU

# dense (non-sparse) tensor-core peaks from the vendors' data sheets, in FLOP/s, by dtype
GPU_PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "A10G": {"bfloat16": 70e12, "float16": 70e12, "float32": 35e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 30e12},
    "RTX 4090": {"bfloat16": 165e12, "float16": 165e12, "float32": 83e12},
    "RTX 3090": {"bfloat16": 71e12, "float16": 71e12, "float32": 36e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "T4": {"float16": 65e12, "float32": 8.1e12},
}

_measured = {}


def measure_matmul_flops(device, dtype, shape=(1024, 1024, 1024), seconds=0.15):
    """FLOP/s of an (M, K) @ (K, N) matmul on this device, measured: the peak MFU is quoted against on
    CPUs and unknown GPUs (a laptop has no data sheet number that means anything), and what resolve_dtype
    compares. Times runs for about `seconds` (at least one, even where one is slow: an emulated bf16
    matmul on a CPU). Kept per process."""
    M, K, N = shape
    key = (device, dtype, shape)
    if key not in _measured:
        a = torch.randn(M, K, device=device).to(getattr(torch, dtype))
        b = torch.randn(K, N, device=device).to(getattr(torch, dtype))
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        t0 = time.perf_counter()
        a @ b  # warm-up: allocation and kernel choice
        sync()
        runs, t1 = 0, time.perf_counter()
        if t1 - t0 < seconds:  # a second warm-up only where it is cheap
            a @ b
            sync()
            t1 = time.perf_counter()
        while runs == 0 or time.perf_counter() - t1 < seconds:
            a @ b
            sync()
            runs += 1
        _measured[key] = 2 * M * K * N * runs / (time.perf_counter() - t1)
    return _measured[key]


def format_flops(flops):
    """A FLOP/s figure in the unit that shows it: 0.2 GFLOP/s never prints as 0.00 TFLOP/s."""
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP/s"


def peak_probe_size(device, dtype):
    """n of the n x n x n matmul a device's peak is measured with: 1024, but 256 for bf16 on a CPU that
    emulates it (0.2-2 GFLOP/s there: a 1024^3 one would take seconds)."""
    return 256 if device == "cpu" and dtype == "bfloat16" and not cpu_info()["native_bf16"] else 1024


def peak_flops(device, dtype):
    """(FLOP/s, where the number came from) for MFU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for gpu, table in GPU_PEAK_FLOPS.items():
            if gpu in name and dtype in table:
                return table[dtype], f"{gpu} data sheet, {dtype}"
    n = peak_probe_size(device, dtype)
    return measure_matmul_flops(device, dtype, (n, n, n)), f"measured {dtype} {n}x{n} matmul on {device}"
