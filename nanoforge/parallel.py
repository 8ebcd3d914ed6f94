"""
Many processes, or less memory: torchrun/DDP setup, FSDP2 sharding, and gradient (activation)
checkpointing, each applied from outside the model, so model.py and its parameter names stay the same.
"""
import datetime
import os

import torch


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


def rank0_choice(value):
    """value as rank 0 has it, on every rank; value itself in one process. For choices made by measuring
    (the dtype, compiling): each rank measures for itself, and on a busy machine two ranks once chose
    differently, so they computed different numbers."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


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
    from nanoforge import hardware
    mesh = init_device_mesh(device.split(":")[0], (torch.distributed.get_world_size(),))
    mp = MixedPrecisionPolicy()  # fp32: nothing cast
    if dtype != "float32":
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32)
    if compile:
        hardware.prepare_to_compile(model)
    for block in model.transformer.h:
        if compile:
            block.compile()  # in place: parameter names (so checkpoints) do not change
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def grad_scaler(dtype, fsdp):
    """The GradScaler fp16 training needs (disabled, a no-op, in bf16 and fp32). Under FSDP its inf/nan
    check is agreed by all ranks, which each see only their shard of the gradients."""
    if fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler("cuda", enabled=(dtype == "float16"))
    return torch.amp.GradScaler("cuda", enabled=(dtype == "float16"))
