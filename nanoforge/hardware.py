"""
The machine a run is on: the device, the CPU's class, the precision and compile choice (resolved after
overrides and printed with the reason, measured where it matters), malloc tuning, autocast, waiting for
the device before a clock is read, the device's peak FLOP/s for MFU, and the machine line every
benchmark prints first.
"""
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import types

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


def compile_decoding(model):
    """--compile for decoding, in place: the model's forward, which each step of generate_stream calls,
    compiled with dynamic shapes (prompts differ in length, the cache grows). torch.compile(model) would
    not do it: generate_stream is the original module's method and calls the original forward. The CPU
    kernels enter the graph as torch operators (cpu_kernels.linear_f32_op, linear_q8_op).

    A token's step is ~50 matrix products and a few hundred small operations, so on a CPU the time around
    the products counts (dev/LOG.md, int8 GPT-2 on an AMD Zen 4: 139 tokens/s compiled plainly, 176 with the
    three below, each worth +11-18% alone):
    - no guards on the modules' tensors: the model is fixed once it decodes, and checking its ~240
      parameters and buffers before every step took ~0.5 ms;
    - no size asserts in the compiled code: its inputs are the ones the guards already checked;
    - on a CPU, attention as attention_reference's plain operations, which inductor fuses into its own loops:
      SDPA's CPU kernel costs ~70 us a call at one query.
    A prompt (a step of more than one token, or the first of a sequence) runs eagerly, with SDPA: it comes
    once a generation and its time is in its matrix products, while its graph (another shape, from an empty
    cache) took longer to compile than the step's (GPT-2 int8 on an AMD Zen 4, inductor's cache empty: 33 of
    57 s; dev/LOG.md)."""
    prepare_to_compile(model)
    attentions = [m for m in model.modules() if isinstance(m, model_module.CausalSelfAttention)]
    plain = model.lm_head.weight.device.type == "cpu"
    for m in attentions:
        m.use_sdpa = not plain
    # torch keeps compiled code with the function's code object, which every GPT shares: without the module
    # guards another model's step would run this one's code (with the wrong weights). A copy of the code
    # object keeps this model's compiled step its own
    f = type(model).forward
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    compiled = torch.compile(types.MethodType(own, model), dynamic=True, options={
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False})

    def forward(idx, *args, **kwargs):
        caches = kwargs.get("kv_caches", args[1] if len(args) > 1 else None)  # GPT.forward's third argument
        if idx.size(1) > 1 or caches is None or (not torch.is_tensor(caches[0].length) and caches[0].length == 0):
            # a prompt: the original forward, attention on SDPA's fused kernel for its many queries; the step's
            # plain attention back after (a graph traced later, for a new shape, reads it)
            for m in attentions:
                m.use_sdpa = True
            try:
                return type(model).forward(model, idx, *args, **kwargs)
            finally:
                for m in attentions:
                    m.use_sdpa = not plain
        # floats read off the modules (dropout's p, an embedding's norm_type) would enter each graph as symbols,
        # which inductor then specializes, restarting the trace from the top: every graph was traced twice.
        # Constants from the first trace on: GPT-2 int8 on an AMD Zen 4, the compile went from 82 to 57-65 s with
        # an empty cache, 31 to 9 s with a warm one (dev/LOG.md). The flag is read while tracing, so it is set
        # around this model's calls alone (~5 us a step)
        config = torch._dynamo.config
        before, config.specialize_float = config.specialize_float, True
        try:
            return compiled(idx, *args, **kwargs)
        finally:
            config.specialize_float = before

    model.forward = forward
    return model


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


def device_memory(device):
    """Bytes of memory a run on `device` can use: the GPU's own on CUDA, the machine's RAM on a CPU; None
    where it cannot be told (MPS shares memory with the system, a platform without sysconf)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    if device.startswith("mps"):
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def step_memory_error(cfg, n_params, batch_size, dtype, chunked_loss, checkpointing, device, shards=1):
    """A one-line reason when one training step of this model at this batch is estimated to need more memory
    than the device has, else None: a context of 100,000 on a laptop otherwise grows for minutes, thrashing,
    and then fails. The estimate: weights, gradients and AdamW's two moments in fp32 (over `shards` ranks
    under FSDP), plus activations of ~68 C bytes a token a layer in fp32 (half that in bf16; one layer's worth
    with checkpointing), the (T, T) attention weights of each head where the plain attention runs (bf16 on a
    CPU), and the (B, T, V) logits three times over where the loss is not chunked."""
    B, T, C, L, nh, V = batch_size, cfg.block_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    width = 4 if dtype == "float32" else 2
    per_layer = B * T * (17 * C * width + (nh * T * width * 2 if dtype != "float32" else 0))
    need = 16 * n_params / shards + per_layer * (1 if checkpointing else L) + (0 if chunked_loss else 3 * 4 * B * T * V)
    have = device_memory(device)
    if have is None or need <= have:
        return None
    return (f"a step of {B} x {T} tokens is estimated to need {need / 2**30:,.0f} GiB, more than the "
            f"{have / 2**30:.0f} GiB of {device}; lower batch_size or block_size (or gradient_checkpointing=True), "
            f"or memory_check=False to run it anyway")


def load_average():
    """The machine's 1-minute load average (runnable processes, ours included), or None where the OS has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def cores_in_use(seconds=0.1):
    """How many cores other work keeps busy now: the machine's busy time in /proc/stat over the next `seconds`
    less this process's own (it mostly sleeps meanwhile), over the time; None where there is no /proc/stat."""
    def busy_and_total():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks[:3]) + ticks[5] + ticks[6], sum(ticks)  # steal (a shared host's own) is no one's here
    try:
        (busy0, total0), own0 = busy_and_total(), sum(os.times()[:2])
        time.sleep(seconds)
        (busy1, total1), own1 = busy_and_total(), sum(os.times()[:2])
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    if total1 <= total0:
        return None
    return max(0.0, (busy1 - busy0) / (total1 - total0) * cores - (own1 - own0) / seconds)


def busy_line(device, running=False):
    """A warning line when other work holds the CPU cores this process's threads need, else None. torch's
    threads wait for each other at every operation, so one thread on a busy core holds back the rest: with
    another job on 2 cores, 2 threads ran 5x slower than 1 (sample.py 40.9 s against 8.2 s). The 1-minute load
    average, less this process's own threads when it is `running` (computing flat out), says when to look.
    At a start (not running) what the cores do now (cores_in_use, 0.1 s) decides, since that average trails
    by a minute: a command run just before (pip, the training before sampling) still counted as other work,
    and the warning told an idle machine's user to halve their threads. Running, this process's own threads
    have pushed the average up by then, so it tells on its own (and no time is taken from the run)."""
    if not device.startswith("cpu") or load_average() is None:
        return None
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()

    def crowded(other):  # more threads than the other work leaves cores
        return threads >= 2 and other >= 0.75 and threads > max(1, round(cores - other))
    other = load_average() - (threads if running else 0)
    if not crowded(other):
        return None
    now = None if running else cores_in_use()
    if now is not None and not crowded(other := now):
        return None
    free = max(1, round(cores - other))  # the cores the other work leaves
    return (f"warning: this machine is busy (other work keeps ~{other:.1f} of its {cores} cores loaded), and {threads} "
            f"threads that wait for each other run several times slower on it; stop the other work, or rerun with "
            f"OMP_NUM_THREADS={free}")


def autocast(device, dtype):
    """The mixed-precision context for forward passes; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def synchronize(device):
    """Waits for the work queued on `device`, so a clock read after it measures the work and not only
    its launch: CUDA and MPS run asynchronously; on a CPU the work is done when the call returns."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


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
        t0 = time.perf_counter()
        a @ b  # warm-up: allocation and kernel choice
        synchronize(device)
        runs, t1 = 0, time.perf_counter()
        if t1 - t0 < seconds:  # a second warm-up only where it is cheap
            a @ b
            synchronize(device)
            t1 = time.perf_counter()
        while runs == 0 or time.perf_counter() - t1 < seconds:
            a @ b
            synchronize(device)
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


# -----------------------------------------------------------------------------------------------------
# the machine line: a tokens/s figure means nothing without the CPU (or GPU) it came from, so every
# benchmark prints this line before its results and puts its figures in its JSON

def measure_memory_bandwidth(device, mib=256, repeats=10):
    """Bytes/s between `device` and its memory: the best of `repeats` copies of a `mib` MiB float32
    tensor into another, far bigger than any cache, so every byte comes from and goes to DRAM. Counted:
    what the copy asks for, the mib MiB read plus the mib MiB written, as STREAM's copy counts them; the
    line a CPU may read before overwriting it (write-allocate) is not counted. The best and not the median:
    a busy neighbour only ever lowers it."""
    src = torch.ones(mib * 2**20 // 4, device=device)  # (n,) float32
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the first copy also faults dst's pages in, which is not bandwidth
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def measure_machine(device):
    """The machine's name, class and measured figures, in this process (about a second), as a dict whose
    'line' is the one-line summary. A CPU: its matmul GFLOP/s at 1024^3, but 256^3 for bf16 where it is
    emulated (0.2-2 GFLOP/s: a 1024^3 one takes seconds; peak_probe_size). On CUDA the GPU is what runs,
    so its name and figures stand in place of the CPU's; on MPS the CPU's are given."""
    info = cpu_info()
    probe = device if device.startswith("cuda") else "cpu"
    if probe == "cpu":
        name = describe_cpu(info)
        sizes = {dt: peak_probe_size("cpu", dt) for dt in ("float32", "bfloat16")}
    else:
        name = f"{torch.cuda.get_device_name(probe)} ({probe})"
        sizes = {"float32": 1024, "bfloat16" if torch.cuda.is_bf16_supported() else "float16": 1024}
    gflops = {dt: measure_matmul_flops(probe, dt, (n, n, n)) / 1e9 for dt, n in sizes.items()}
    gb_s = measure_memory_bandwidth(probe) / 1e9
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    rates = ", ".join(f"{short[dt]} {format_flops(gflops[dt] * 1e9)}"
                      + ("" if n == 1024 else f" ({n}^3, emulated)") for dt, n in sizes.items())
    threads = torch.get_num_threads()  # 1 under torchrun and in the tests (OMP_NUM_THREADS=1): one core's figures
    line = (f"machine: {name} | {threads} thread{'s' if threads > 1 else ''}, matmul 1024^3: {rates} | "
            f"memory {gb_s:.1f} GB/s (copy)")
    return {"line": line, "device": probe, "name": name, "cpu": info, "threads": threads,
            "matmul_gflops": gflops, "matmul_n": sizes, "memory_gb_s": gb_s}


def machine_line(device):
    """measure_machine(device) in a fresh process, printed, and its dict: the bandwidth probe holds
    512 MiB, which would stay in the caller's peak memory (a peak RSS only ever grows), and benchmarks
    report that peak."""
    code = ("import json, sys; from nanoforge.hardware import measure_machine; "
            "print(json.dumps(measure_machine(sys.argv[1])))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `nanoforge` imports from
    proc = subprocess.run([sys.executable, "-c", code, device], capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise UserError(f"measuring the machine failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(m["line"], flush=True)
    return m


def peak_memory(device):
    """(bytes, what was measured): the device's peak allocation on CUDA, else this process's peak RSS
    (ru_maxrss: KiB on Linux, bytes on macOS; the whole process's peak since it started)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    import resource  # not on Windows; only needed here
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), \
        "peak RSS of this process"
