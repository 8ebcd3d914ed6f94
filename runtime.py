"""
What every script needs around the model: one-line errors, files written atomically, the device, the
precision and compile choice (resolved after overrides and printed with the reason), torchrun/DDP setup,
the device's peak FLOP/s for MFU, and a record of the run's environment.
"""
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch


class UserError(Exception):
    """Bad input a user can fix. Scripts print it as one line, without a traceback."""


def friendly_errors():
    """Make an uncaught UserError print `error: <message>` and exit with status 2 instead of a traceback;
    Ctrl-C exits quietly. Scripts call this first."""
    default_hook = sys.excepthook

    def hook(kind, value, tb):
        # sys.__stderr__: under torchrun, torch's own hook wraps this one with sys.stderr redirected to a
        # buffer it prints afterwards, which sys.exit would skip, losing the message
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.__stderr__, flush=True)
            sys.exit(2)  # sys.exit inside the hook still sets the exit status
        elif lost_peer(value):
            first = str(value).strip().splitlines()[0][-200:]
            print(f"error: rank {os.environ.get('RANK')} lost contact with the other ranks ({first}): one died "
                  f"or hung; torchrun's summary names the first to fail. Resume with --init_from=resume",
                  file=sys.__stderr__, flush=True)
            sys.exit(1)
        elif issubclass(kind, KeyboardInterrupt):
            print("", file=sys.stderr)
            sys.exit(130)
        else:
            default_hook(kind, value, tb)

    sys.excepthook = hook


def lost_peer(error):
    """Whether an exception in a torchrun worker means another rank died (connection reset) or hung
    (a collective timed out), as gloo and nccl report it."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out", "NCCL"))


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it is renamed over `path` in one step, so a crash
    or Ctrl-C mid-write never leaves a half-written file where a good one was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


# -----------------------------------------------------------------------------------------------------
# device, precision, compile

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


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on GPUs that have it, float16 (with a GradScaler) on older GPUs, float32
    elsewhere. Returns (dtype name, reason)."""
    names = ("float32", "bfloat16", "float16")
    if dtype == "auto":
        if device.startswith("cuda"):
            if torch.cuda.is_bf16_supported():
                return "bfloat16", "auto: this GPU supports bf16"
            return "float16", "auto: this GPU lacks bf16, so fp16 with loss scaling"
        return "float32", f"auto: {device} trains in fp32 by default (bf16 autocast is opt-in: --dtype=bfloat16)"
    if dtype not in names:
        raise UserError(f"unknown dtype '{dtype}': use auto, {', '.join(names)}")
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError(f"dtype float16 needs a CUDA device (got {device}); use bfloat16 or float32")
    return dtype, "as configured"


def resolve_compile(compile, device):
    """'auto' -> torch.compile on CUDA (it pays for itself), not on CPU (minutes of a short run)."""
    if compile == "auto":
        on = device.startswith("cuda")
        return on, "auto: " + ("CUDA, compile pays off" if on else f"{device}, eager avoids the compile wait")
    if not isinstance(compile, bool):
        raise UserError(f"compile must be True, False or 'auto', got {compile!r}")
    return compile, "as configured"


def keep_freed_memory(device):
    """Keep memory that a training step frees inside the process, for the next step to reuse. glibc's
    malloc hands big blocks (a step's activations and gradients) back to the kernel when they are freed
    (mmap'd chunks, and a heap top above the trim threshold), so every step faults the same pages in
    again: on 2 CPU cores that was up to a third of a step (dev/LOG.md, issue 8). Raising both
    thresholds to 1 GiB stops it; peak memory is unchanged, it is just not handed back until exit.
    Only for training on a CPU (on a GPU the activations are not malloc's), on Linux with glibc.
    Returns the line to log where it was applied, else None."""
    if device != "cpu" or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h
    if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "cpu: freed memory is kept for reuse (malloc thresholds raised: runtime.keep_freed_memory)"
    return None


def autocast(device, dtype):
    """The mixed-precision context for forward passes; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def gradient_checkpointing(model):
    """Recompute each transformer block's activations in the backward pass instead of keeping them:
    activation memory drops from one copy per layer to one per block boundary, for roughly one extra
    forward pass of compute. Applied from outside: the model code stays unaware, and parameter names
    (so checkpoints) do not change. Dropout masks are replayed exactly (the RNG state is saved)."""
    from torch.utils.checkpoint import checkpoint
    for block in model.transformer.h:
        plain = block.forward

        def checkpointed(x, kv_cache=None, plain=plain):
            if kv_cache is not None or not torch.is_grad_enabled():
                return plain(x, kv_cache)  # generation and evaluation keep nothing for backward anyway
            return checkpoint(plain, x, use_reentrant=False)

        block.forward = checkpointed
    return model


# -----------------------------------------------------------------------------------------------------
# distributed (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)

def setup_distributed(backend, device, timeout=600.0):
    """Returns (ddp, rank, local_rank, world_size, device). Under torchrun, joins the process group
    (nccl on CUDA, gloo on CPU unless configured) and gives each rank its own GPU. `timeout` seconds:
    how long a collective waits for a rank that stopped answering before it fails."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    # a rank that dies or hangs must not leave the others waiting forever on a collective: gloo fails a
    # collective after `timeout`; nccl's watchdog aborts the process (TORCH_NCCL_ASYNC_ERROR_HANDLING,
    # on by default) after it, instead of blocking the GPU stream for good
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    return True, rank, local_rank, world_size, device


def fully_shard_model(model, device, dtype, compile):
    """FSDP2, applied from outside the model: each transformer block is one unit of sharding (its
    parameters are gathered just before its forward and freed after it, and again for backward), then
    the root takes what is left: wte (tied to lm_head, so one parameter in one unit), wpe and ln_f.
    Gradients are reduce-scattered, so each rank keeps 1/world_size of the parameters, gradients and
    optimizer state. In bf16/fp16 the gathered copies are in that dtype (half the traffic and memory)
    and gradients are reduced in fp32; the sharded master weights stay fp32. Compile goes per block
    (before sharding), the way FSDP2 composes with torch.compile. Returns the model, sharded in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.split(":")[0], (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy()  # fp32: nothing cast
    if dtype != "float32":
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile:
            block.compile()  # in place: parameter names (so checkpoints) do not change
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


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


def measure_matmul_flops(device, dtype, n=1024, seconds=0.3):
    """FLOP/s of an n x n matmul on this device, measured: the peak MFU is quoted against on CPUs and
    unknown GPUs (a laptop has no data sheet number that means anything)."""
    key = (device, dtype, n)
    if key not in _measured:
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        for _ in range(3):
            a @ b  # warm-up
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            runs += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        _measured[key] = 2 * n ** 3 * runs / (time.perf_counter() - t0)
    return _measured[key]


def peak_flops(device, dtype):
    """(FLOP/s, where the number came from) for MFU."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for gpu, table in GPU_PEAK_FLOPS.items():
            if gpu in name and dtype in table:
                return table[dtype], f"{gpu} data sheet, {dtype}"
    return measure_matmul_flops(device, dtype), f"measured {dtype} matmul on {device}"


# -----------------------------------------------------------------------------------------------------
# run record

def run_info(device):
    """Git revision and environment, written beside every run's checkpoints."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    info = {
        "git_revision": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
