"""
Trains a GPT. One process on a laptop CPU or a GPU, or many with torchrun (DDP, or FSDP with fsdp=True).

A laptop CPU (the quick start):
$ python train.py config/train_shakespeare_char_cpu.py

One GPU:
$ python train.py config/train_shakespeare_char.py --batch_size=32

8 GPUs on one node:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

2 nodes of 8 GPUs (run on each node; NODE_RANK 0 on the node at MASTER_ADDR):
$ torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --rdzv_backend=c10d \\
      --rdzv_endpoint=$MASTER_ADDR:29500 --rdzv_id=gpt2 train.py config/train_gpt2.py

A model too big for DDP: FSDP shards parameters, gradients and optimizer state over the ranks, and saves
sharded checkpoints (ckpt_sharded/) that resume on any number of ranks, plus an ordinary ckpt.pt at the end:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py --fsdp=True

Resume exactly where a run stopped (Ctrl-C and SIGTERM save a checkpoint first):
$ python train.py config/train_shakespeare_char_cpu.py --init_from=resume
"""
import gc
import math
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import (FRACTION, NON_NEGATIVE, POSITIVE_INT, check_ranges, conditional_overrides, configure, knobs,
                          overrides)
from model import GPT, CausalSelfAttention, GPTConfig
from nanoforge import checkpoint, errors, files, hardware, optim, parallel, runlog, tokens, training
from nanoforge.errors import UserError
from nanoforge.evaluation import evaluate, split_windows
from nanoforge.lm_head_loss import chunked_lm_head_loss
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
# default config values: GPT-2 (124M) on OpenWebText, as in nanoGPT
# I/O
out_dir = "out"
eval_interval = 2000
log_interval = 1
eval_iters = 200  # the fixed eval set is eval_iters * batch_size windows of each split
eval_only = False  # evaluate once and exit
eval_whole_val = False  # score the whole val split (back-to-back windows) instead of the fixed sample
target_loss = 0.0  # if > 0, stop (save) at the first evaluation whose val loss is at or below it
always_save_checkpoint = True  # if False, save only when val loss improves (keeps the best model)
keep_checkpoints = 0  # > 0: keep the weights of the last N evaluations in out_dir/checkpoints/ (explain.py; no fsdp)
init_from = "scratch"  # 'scratch', 'resume' (from out_dir), a GPT-2 name, a HF folder or a nanoforge out_dir
plot = True  # loss-curve PNG in out_dir at the end
# wandb logging (honours WANDB_MODE=offline/disabled)
wandb_log = False
wandb_project = "nanoforge"
wandb_run_name = "gpt2"
# data
dataset = "openwebtext"  # reads data/<dataset>/{train,val}.bin and meta.json
data_dir = ""  # if set, overrides data/<dataset>
gradient_accumulation_steps = 5 * 8  # global micro-steps per optimizer step, split across ranks
batch_size = 12  # sequences per micro-step per rank
block_size = 1024
total_batch_size = -1  # tokens per optimizer step; if > 0, gradient_accumulation_steps is derived from it
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for fine-tuning
bias = False  # biases in Linears and LayerNorms; GPT-2 had them, training is a bit faster without
pos_emb = "learned"  # 'learned' (GPT-2) or 'rope'
# architecture options (model.py, GPTConfig); the defaults are GPT-2's, which from_pretrained and export need
norm = "layernorm"  # 'layernorm' or 'rmsnorm'
mlp = "gelu"  # 'gelu', 'relu2' or 'swiglu'
qk_norm = False
tie_embeddings = True
zero_init = False  # residual projections (and an untied lm_head) start at zero
logit_softcap = 0.0
# optimizer: 'adamw', or 'muon' (Muon for the blocks' matrices, AdamW for the rest; optim.py)
optimizer_name = "adamw"
muon_momentum = 0.95
learning_rate = 6e-4
max_iters = 600000
time_budget = 0.0  # if > 0, stop (evaluate, save) once this many seconds were spent training; 0 = no limit
max_epochs = 0.0  # if > 0, also stop after this many passes over the train split (caps max_iters): a small
                  # corpus is not memorised however long the time budget
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm, 0 to disable
# learning rate schedule: linear warmup, then 'cosine' down to min_lr at lr_decay_iters, or 'wsd' (constant,
# then linear down to min_lr over the last lr_cooldown of the run)
decay_lr = True
lr_schedule = "cosine"
lr_cooldown = 0.2
lr_clock = "iters"  # 'iters', or 'time': the decay follows the fraction of time_budget spent
warmup_iters = 2000
lr_decay_iters = 600000  # ~= max_iters per Chinchilla
min_lr = 6e-5  # ~= learning_rate / 10 per Chinchilla
# system
backend = "auto"  # 'nccl' on CUDA, 'gloo' on CPU
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (measured: bf16 where this device runs it faster), 'float32', 'bfloat16', 'float16' (CUDA)
float32_overrides = ""  # '--key=value ...' applied when the run trains in float32 (the command line's own win):
# a CPU recipe's other shape for machines where bf16 is emulated, chosen once dtype is resolved
compile = "auto"  # torch.compile: 'auto' is on for CUDA, and on a CPU for runs long enough to repay the compile
gradient_checkpointing = False  # recompute block activations in backward: less memory, ~30% more compute
chunked_loss = True  # LM head + loss in row chunks (nanoforge/lm_head_loss.py): the (B, T, V) logits, 1.57 GiB
# a copy at 8 x 1024 x 50,257 in fp32, never exist whole; same FLOPs, same loss; False is the plain reference
memory_check = True  # refuse a run whose training step is estimated to need more memory than the device has
fsdp = False  # under torchrun: shard parameters, gradients, optimizer state (FSDP2) instead of DDP's copies
fsdp_consolidate = True  # fsdp: at the end, also write an ordinary ckpt.pt (for sample.py, evaluation, export)
dist_timeout = 600.0  # seconds a collective waits for a silent rank before the run fails (rather than hang)
seed = 1337
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
given = set()
config = configure(defaults, sys.argv[1:], given=given)
resume_line = None
if config["init_from"] == "resume":  # the run's own settings, from its out_dir: no config file needed
    config, resume_line = training.resume_config(config, given, config["out_dir"])
globals().update(config)
check_ranges(config, {
    **{k: POSITIVE_INT for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "eval_interval",
                                 "eval_iters", "log_interval", "gradient_accumulation_steps")},
    **{k: NON_NEGATIVE for k in ("max_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip", "time_budget",
                                 "target_loss", "logit_softcap", "keep_checkpoints", "max_epochs")},
    **{k: FRACTION for k in ("dropout", "beta1", "beta2", "muon_momentum")},
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "lr_decay_iters": (lambda v: v >= 1, "an int >= 1"),
    "lr_cooldown": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
})
training.check_heads(n_embd, n_head, pos_emb)
# -----------------------------------------------------------------------------------------------------
# derived values, checked

device, device_why = hardware.resolve_device(device)
ddp, rank, local_rank, world_size, device = parallel.setup_distributed(backend, device, dist_timeout)
master = rank == 0  # logs, checkpoints, plots
dtype, dtype_why = hardware.resolve_dtype(dtype, device, (batch_size * block_size, n_embd))
dtype, dtype_why = parallel.rank0_choice((dtype, dtype_why))  # measured on each rank: rank 0's on every rank
log = print if master else (lambda *a, **k: None)
if float32_overrides and dtype == "float32":  # the recipe's fp32 shape, now that the precision is known
    fp32 = conditional_overrides(defaults, sys.argv[1:], float32_overrides, "float32_overrides")
    if {"device", "dtype"} & fp32.keys():
        raise UserError("float32_overrides may not set device or dtype: they decide whether it applies")
    config.update(fp32)
    globals().update(fp32)
    log(f"float32 training: the recipe's float32_overrides apply: {fp32}")

# micro-steps per optimizer step: all ranks' (from total_batch_size, if set), and each rank's
gradient_accumulation_steps, local_accum = training.accumulation_steps(
    gradient_accumulation_steps, total_batch_size, batch_size, block_size, world_size)
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size
if lr_clock not in ("iters", "time") or (lr_clock == "time" and time_budget <= 0):
    raise UserError(f"lr_clock={lr_clock!r}: use 'iters', or 'time' together with a --time_budget in seconds")
if lr_schedule not in ("cosine", "wsd"):
    raise UserError(f"lr_schedule must be 'cosine' or 'wsd', got {lr_schedule!r}")
if fsdp and optimizer_name == "muon":
    raise UserError("optimizer_name='muon' orthogonalises whole matrices, which FSDP shards; use adamw with fsdp")
if fsdp and not ddp:
    raise UserError("fsdp=True shards over torchrun's processes; launch with torchrun --standalone "
                    "--nproc_per_node=N train.py ... (N=1 works too)")
if resume_line:
    log(resume_line)
out_dir_lock = files.lock_out_dir(out_dir) if master else None  # before looking: two runs must not both start
resume_from = checkpoint.check_out_dir(out_dir, init_from, fsdp)  # fsdp runs resume sharded checkpoints

training.startup_lines(log, device, device_why, dtype, dtype_why, overrides(defaults, config),
                       gradient_checkpointing)
log(f"world size {world_size}, {gradient_accumulation_steps} micro-steps of {batch_size} x {block_size} "
    f"({local_accum} per rank): {tokens_per_iter:,} tokens per iteration")

# -----------------------------------------------------------------------------------------------------
# data

data_dir = tokens.dataset_dir(dataset, data_dir)
meta = tokens.read_meta(data_dir)
train_path, val_path = tokens.split_files(data_dir, "train"), tokens.split_files(data_dir, "val")  # lists of shards
train_len = tokens.split_length(data_dir, "train", block_size)
val_len = tokens.split_length(data_dir, "val", block_size)
tokenizer = load_tokenizer(meta["tokenizer"])
token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64)
log(f"data: {data_dir}: {train_len:,} train and {val_len:,} val tokens, vocab {meta['vocab_size']:,}")
if max_epochs and math.ceil(max_epochs * train_len / tokens_per_iter) < max_iters:
    max_iters = math.ceil(max_epochs * train_len / tokens_per_iter)
    log(f"max_epochs={max_epochs:g}: at most {max_iters:,} iterations ({tokens_per_iter:,} tokens each)")
if small := tokens.small_split_warning(val_len, "val", data_dir):
    log(small)

# -----------------------------------------------------------------------------------------------------
# model, optimizer, state

model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                  vocab_size=meta["vocab_size"], dropout=dropout, pos_emb=pos_emb, norm=norm, mlp=mlp,
                  qk_norm=qk_norm, tie_embeddings=tie_embeddings, zero_init=zero_init, logit_softcap=logit_softcap)
# train_time: seconds spent in training steps, evaluation excluded; a resumed run goes on from its
# checkpoint's, so a time_budget and the time clock of the learning rate carry across the stop
iter_num, best_val_loss, train_time, resume = 0, float("inf"), 0.0, None
torch.manual_seed(seed)  # the same initial weights on every rank and every run with this seed
if init_from == "scratch":
    model = GPT(GPTConfig(**model_args))
elif init_from == "resume":  # the optimizer (and under fsdp the weights) load once they exist: resume.restore
    resume = checkpoint.Resume(resume_from, fsdp, model_args)
    model, iter_num, best_val_loss, train_time = resume.model, resume.iter_num, resume.best_val_loss, resume.train_time
    log(f"resuming from {resume_from} at iteration {iter_num}")
else:  # fine-tuning: weights from GPT-2 or another run; the shape is theirs
    model, tok_spec, _ = checkpoint.load_model(init_from, dropout=dropout)
    if tok_spec != meta["tokenizer"] or model.config.vocab_size != meta["vocab_size"]:
        raise UserError(f"{init_from} uses tokenizer {tok_spec['kind']} with vocab {model.config.vocab_size}, but "
                        f"{data_dir} was prepared with {meta['tokenizer']['kind']}, vocab {meta['vocab_size']}; "
                        f"prepare the data with the model's tokenizer")
    training.fit_context(model, block_size, init_from, log)
    log(f"initialised from {init_from}: {model.config}")
# refused before any step allocates: a step that cannot fit would thrash the machine for minutes, then fail
if memory_check and (too_big := hardware.step_memory_error(model.config, model.get_num_params(), batch_size, dtype,
                                                           chunked_loss, gradient_checkpointing, device,
                                                           world_size if fsdp else 1)):
    raise UserError(too_big)
model.to(device)
if gradient_checkpointing:
    parallel.gradient_checkpointing(model)
autocast_ctx = hardware.autocast(device, dtype)
CausalSelfAttention.sdpa_backward = hardware.sdpa_backward(device, dtype)  # the attention path training takes
head_loss = chunked_lm_head_loss if chunked_loss else None
peak, peak_why = hardware.peak_flops(device, dtype)
# compile where it pays: the run's expected training time, from its FLOPs at a typical CPU MFU of 30%
# (the figure is only compared with the ~30 s a compile costs), capped by its time budget
expected = (max_iters - iter_num) * model.flops_per_token() * tokens_per_iter / world_size / (0.3 * peak)
compile, compile_why = hardware.resolve_compile(compile, device, min(expected, time_budget or expected))
compile, compile_why = parallel.rank0_choice((compile, compile_why))  # a measured choice: rank 0's on every rank
log(f"compile: {compile} ({compile_why})")
# the fixed evaluation set: eval_iters * batch_size windows a split, fewer where evaluating would take more
# than a bounded share of the run (the whole run's plan, and a resumed run keeps its checkpoint's size)
planned = min(max_iters, time_budget * 0.3 * peak * world_size / (model.flops_per_token() * tokens_per_iter)) \
    if time_budget else max_iters
windows, eval_line = training.eval_windows(eval_iters, batch_size, block_size, eval_interval, int(planned),
                                           tokens_per_iter)
windows = resume.meta.get("eval_windows", eval_iters * batch_size) if resume else windows
log(eval_line if not resume else f"evaluation: {windows:,} fixed windows of each split, as before the stop")
eval_sets = {split: (path, tokens.eval_starts(n, block_size, windows))
             for split, path, n in (("train", train_path, train_len), ("val", val_path, val_len))}
if eval_whole_val:
    eval_sets["val"] = (val_path, split_windows(val_len, block_size))
if fsdp:  # before the optimizer is built: sharding replaces the parameters
    parallel.fully_shard_model(model, device, dtype, compile)

optimizer = optim.build_optimizer(model, optimizer_name, learning_rate, weight_decay, (beta1, beta2), device,
                                  muon_momentum, hardware.newton_schulz_dtype(dtype))
scaler = parallel.grad_scaler(dtype, fsdp)  # fp16 only; a no-op otherwise
if resume:
    resume.restore(model, optimizer, scaler, optimizer_name)


def warmup_step(m):
    """One forward and backward of a training batch, gradients discarded: what makes torch.compile compile.
    Returns its loss."""
    x, y = tokens.read_batch(train_path, tokens.train_starts(seed, 0, batch_size, train_len, block_size), block_size)
    with autocast_ctx:
        loss = m(x.to(device), y.to(device), head_loss=head_loss)[1]
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# three handles on one model: `model` the GPT (saved, its FLOPs counted; under fsdp sharded in place),
# `eval_model` the same compiled, `step_model` what a step calls: eval_model in DDP's gradient-averaging wrapper
eval_model = model
if compile and not fsdp:  # fsdp compiled each block already
    log("compiling the model (a minute on a laptop; not counted in the training time)...")
    eval_model, compile_time = hardware.compile_model(model, warmup_step, log)
    if compile := eval_model is not model:
        log(f"compiled in {compile_time:.1f}s")
step_model = DDP(eval_model, device_ids=[local_rank] if device.startswith("cuda") else None) \
    if ddp and not fsdp else eval_model
log(f"model: {model.get_num_params() / 1e6:.2f}M parameters; MFU against {hardware.format_flops(peak)} ({peak_why})")

# -----------------------------------------------------------------------------------------------------
# run record and logs

def get_lr(it):
    # the time clock's decay follows whichever ends the run first: the time budget, or max_iters
    progress = max(train_time / time_budget, (it - warmup_iters) / max(1, max_iters - warmup_iters)) \
        if lr_clock == "time" else None
    return optim.lr_at(it, learning_rate, warmup_iters, lr_decay_iters, min_lr, decay_lr, lr_schedule, lr_cooldown,
                       progress)


start_iter = iter_num
if master:
    derived = dict(device=device, dtype=dtype, compile=compile, world_size=world_size,
                   gradient_accumulation_steps=gradient_accumulation_steps, tokens_per_iter=tokens_per_iter)
    runlog.write_run_json(out_dir, config, derived, meta, device)
    if wandb_log:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")
    run_log = runlog.RunLog(out_dir, resume_iter=iter_num if resume else None, wandb_run=wandb if wandb_log else None)
record = run_log.record if master else (lambda entry: None)


def save(reason):
    meta_out = dict(iter_num=iter_num, best_val_loss=best_val_loss, train_time=train_time, config=config,
                    dataset=dataset, tokenizer=meta["tokenizer"], data_position=dict(seed=seed, next_step=iter_num),
                    eval_windows=windows)
    if fsdp:  # every rank writes its own shards
        if scaler.is_enabled():
            meta_out["scaler"] = scaler.state_dict()
        checkpoint.save_sharded(out_dir, model, optimizer, meta_out)
    elif master:
        checkpoint.save_checkpoint(checkpoint.ckpt_path(out_dir), model, meta_out, optimizer, scaler)
    stop.saved_iter = iter_num
    log(f"saved {'sharded ' if fsdp else ''}checkpoint to {out_dir} at iteration {iter_num} ({reason})")


# Ctrl-C / SIGTERM: finish the step (or drop the evaluation), save, exit
stop = training.StopSignals(log, out_dir, saved_iter=iter_num if resume else None, interrupt_evaluations=not ddp)

# -----------------------------------------------------------------------------------------------------
# training loop

# time_budget spent; a stop asked for on any rank or during an evaluation (ranks agree through the all-reduce)
out_of_time = stopping = False
if busy := hardware.busy_line(device):  # other work on the cores slows every step: said now, or once it shows
    log(busy)
busy_said = busy is not None
while True:
    # evaluate on the fixed sets (not where a resumed run starts: the stopped run evaluated there)
    just_resumed = init_from == "resume" and iter_num == start_iter and not eval_only
    last = iter_num >= max_iters or out_of_time
    if (iter_num % eval_interval == 0 or last or eval_only) and not just_resumed:
        try:  # a stop asked during an evaluation drops it (single process): the training so far is saved below
            stop.in_eval = True
            scores = {split: evaluate(eval_model, path, starts, block_size, batch_size, token_bytes, device,
                                      autocast_ctx, rank, world_size) for split, (path, starts) in eval_sets.items()}
        except training.Stopped:
            log(f"stop requested during the evaluation at iteration {iter_num}: dropped it")
            stopping = True
            break
        finally:
            stop.in_eval = False
        val_loss = scores["val"]["loss"]
        log(f"step {iter_num}: train loss {scores['train']['loss']:.4f}, val loss {val_loss:.4f}, "
            f"val bpb {scores['val']['bpb']:.4f}, train time {train_time:.1f}s")
        record(dict(iter=iter_num, val_loss=val_loss, val_bpb=scores["val"]["bpb"],
                    train_eval_loss=scores["train"]["loss"], train_time=round(train_time, 3)))
        if keep_checkpoints > 0 and master and not fsdp and not eval_only:  # snapshots of the run as it learns
            checkpoint.keep_checkpoint(out_dir, model, dict(config=config, dataset=dataset, val_loss=val_loss,
                                       tokenizer=meta["tokenizer"]), iter_num, keep_checkpoints)
        improved = val_loss < best_val_loss
        best_val_loss = min(best_val_loss, val_loss)
        reached = 0 < target_loss and val_loss <= target_loss
        if iter_num > start_iter and (always_save_checkpoint or improved or reached):
            save("val improved" if improved else "always_save_checkpoint" if always_save_checkpoint else "target")
        if reached and not eval_only:
            log(f"target val loss {target_loss:g} reached at iteration {iter_num} after {train_time:.1f}s of training")
            break
    if last or eval_only:
        if out_of_time:
            log(f"time_budget of {time_budget:g}s spent at iteration {iter_num}")
        break

    t0 = time.perf_counter()
    lr = get_lr(iter_num)
    training.set_lr(optimizer, lr)
    # this step's examples: the same global draw on every rank, each taking its own rows
    rows = tokens.train_starts(seed, iter_num, gradient_accumulation_steps * batch_size, train_len, block_size)
    rows = rows[rank * local_accum * batch_size:(rank + 1) * local_accum * batch_size]
    # dropout's randomness is a function of (seed, rank, iteration), so a resumed run draws the same masks
    torch.manual_seed(int(np.random.SeedSequence([seed, rank, iter_num]).generate_state(1)[0]))
    loss_sum = torch.zeros((), device=device)
    for micro in range(local_accum):
        x, y = tokens.read_batch(train_path, rows[micro * batch_size:(micro + 1) * batch_size], block_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP and FSDP: average gradients across ranks only once, after the last micro-step
        if fsdp:
            step_model.set_requires_gradient_sync(micro == local_accum - 1)
        sync = step_model.no_sync() if ddp and not fsdp and micro < local_accum - 1 else nullcontext()
        with sync:
            with autocast_ctx:
                # [1]: not the logits (None when chunked): kept, they would hold (B, T, V) floats through backward
                loss = step_model(x, y, head_loss=head_loss)[1]
                loss = loss / local_accum  # the mean over this rank's micro-steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    # the loss of the whole global batch, and whether any rank was asked to stop or ran out of time
    # (counting this step's time so far), in one all-reduce
    spent = time_budget > 0 and train_time + time.perf_counter() - t0 >= time_budget
    stats = torch.stack([loss_sum.float(), torch.tensor(float(stop.requested), device=device),
                         torch.tensor(float(spent), device=device)])
    if ddp:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    # stop.requested stays the handler's: one landing after the read above goes into the next step's all-reduce
    step_loss, stopping, out_of_time = stats[0].item() / world_size, stats[1].item() > 0, stats[2].item() > 0
    training.check_finite(step_loss, iter_num, out_dir)
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    hardware.synchronize(device)
    dt = time.perf_counter() - t0
    train_time += dt

    if iter_num % log_interval == 0:
        if not busy_said and iter_num >= start_iter + 2 and (busy := hardware.busy_line(device, running=True)):
            log(busy)  # said once: a run that slows to a crawl halfway, and why, is the one to notice
            busy_said = True
        tok_s = tokens_per_iter / dt
        mfu = model.estimate_mfu(tok_s / world_size, peak)
        log(f"iter {iter_num}: loss {step_loss:.4f}, lr {lr:.2e}, {dt * 1000:.1f}ms, {tok_s:,.0f} tok/s, mfu {mfu * 100:.2f}%")
        record(dict(iter=iter_num, loss=step_loss, lr=lr, ms=round(dt * 1000, 2), tokens_per_s=round(tok_s),
                    mfu=mfu, train_time=round(train_time, 3)))
    iter_num += 1
    if stopping:
        break

# a stop keeps the training done so far: the model as of its last finished step, unless out_dir already holds
# it, or holds the best model and always_save_checkpoint=False asked to keep only that
if stopping and not eval_only:
    if iter_num == start_iter and stop.saved_iter is None:
        log(f"stop requested before the first training step; nothing to save, {stop.kept()}")
    elif stop.saved_iter == iter_num:
        log(f"stop requested; {stop.kept()}, the last finished step")
    elif always_save_checkpoint or stop.saved_iter is None:
        save("stop requested")
    else:
        log(f"stop requested; {stop.kept()}, the best val loss (always_save_checkpoint=False): "
            f"the {iter_num - stop.saved_iter} iterations since are not saved")

if fsdp and fsdp_consolidate and master and checkpoint.find_sharded(out_dir):
    checkpoint.consolidate(checkpoint.find_sharded(out_dir), checkpoint.ckpt_path(out_dir))
    log(f"consolidated the sharded checkpoint into {checkpoint.ckpt_path(out_dir)}")
if master:
    run_log.close()
    if plot:
        log(f"loss curve: {runlog.plot_losses(out_dir)}")
if ddp:  # leave together: a rank that exits while another still works (consolidating) can fail its teardown
    dist.barrier()
    # DDP's reducer holds the process group and its gloo work: freed now, while the interpreter is whole; left
    # to its exit, a gloo thread's teardown aborted a rank ('terminate called without an active exception')
    step_model = sync = None
    gc.collect()
    dist.destroy_process_group()
