"""
Instruction / chat fine-tuning (SFT) on JSONL conversations, fully or with LoRA adapters. The loss counts
only the assistant's tokens (chat_template.py); held-out conversations are scored at every evaluation.

The example domain (offline, 2 CPU cores, minutes): a character-level Shakespeare model learns to be a shop's
customer-service assistant:
$ python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu.py
$ python data/shop_chat/prepare.py && python finetune.py config/finetune_shop_chat.py
$ python sample.py --out_dir=out-sft-shop --chat

From GPT-2 (a hub name online, a save_pretrained folder offline), with LoRA on attention and MLP:
$ python finetune.py --init_from=gpt2 --dataset=shop_chat --lora_rank=8 --out_dir=out-sft-gpt2

One process (no DDP). out_dir gets log.jsonl, run.json and ckpt.pt (the best model by held-out loss, with
LoRA adapters merged in, so sample.py and export.py load it like any run); with LoRA also adapter/ (peft's
format, to load onto the base with lora.load_adapter). Checkpoints hold no optimizer state: a stopped
fine-tune is rerun, not resumed.
"""
import os
import sys
import time

import torch

from configurator import configure, knobs, overrides
from model import CausalSelfAttention
from nanoforge import chat_template, checkpoint, errors, files, hardware, lora, optim, parallel, runlog, tokens, training
from nanoforge.errors import UserError
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
# default config values
out_dir = "out-sft"
init_from = "gpt2"  # a nanoforge out_dir or checkpoint file, a GPT-2 name, or a HF folder (export.py's, or GPT-2)
dataset = ""  # reads data/<dataset>/train.jsonl and val.jsonl
train_file = ""  # or name the files directly
val_file = ""
eval_interval = 50
eval_only = False  # report the held-out loss of init_from and exit
log_interval = 10
batch_size = 8  # packed rows per micro-step
gradient_accumulation_steps = 1
block_size = 256  # rows are this long; longer examples are skipped and reported, never cut
max_iters = 300
time_budget = 0.0  # > 0: also stop (evaluate, save) once this many seconds were spent training; the lr decay
                   # follows whichever of the two ends the run first. 0: max_iters alone
learning_rate = 3e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True  # linear warmup, cosine decay to min_lr at max_iters
warmup_iters = 20
min_lr = 3e-5
dropout = 0.0
lora_rank = 0  # > 0: train LoRA adapters of this rank instead of all weights
lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
lora_dropout = 0.05
lora_targets = lora.DEFAULT_TARGETS  # comma-separated Linear names
gradient_checkpointing = False
device = "auto"
dtype = "auto"
seed = 1337
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
config = configure(defaults, sys.argv[1:])
globals().update(config)

device, device_why = hardware.resolve_device(device)
data_dir = tokens.dataset_dir(dataset)
train_file = train_file or (os.path.join(data_dir, "train.jsonl") if dataset else "")
val_file = val_file or (os.path.join(data_dir, "val.jsonl") if dataset else "")
if not train_file or not val_file:
    raise UserError("no data: set dataset=<name> (data/<name>/train.jsonl, val.jsonl) or train_file and val_file")
out_dir_lock = files.lock_out_dir(out_dir)  # before looking: two runs must not both start
if os.path.exists(checkpoint.ckpt_path(out_dir)) and not eval_only:
    raise UserError(f"{out_dir} already holds a checkpoint; pick another --out_dir (or delete it)")

# -----------------------------------------------------------------------------------------------------
# model and tokenizer: the base's, plus the turn markers (new embedding rows) when it lacks them

torch.manual_seed(seed)
model, base_spec, _ = checkpoint.load_model(init_from, dropout=dropout)
base_tok = load_tokenizer(base_spec)
tok = chat_template.chat_tokenizer(base_tok)
if model.config.vocab_size not in (base_tok.vocab_size, tok.vocab_size):
    raise UserError(f"{init_from} has {model.config.vocab_size} embedding rows but its tokenizer "
                    f"({base_spec['kind']}) has {base_tok.vocab_size} tokens; cannot tell which rows are which")
if tok.vocab_size > model.config.vocab_size:
    print(f"adding {tok.vocab_size - model.config.vocab_size} chat tokens to the tokenizer and embedding")
    training.grow_vocab(model, tok.vocab_size)
training.fit_context(model, block_size, init_from)
model.to(device)
if gradient_checkpointing:
    parallel.gradient_checkpointing(model)
base_model = model  # the GPT (under LoRA, with peft's layers inside): its config is what ckpt.pt records
if lora_rank > 0:
    model = lora.apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
n_all = sum(p.numel() for p in model.parameters())
print(f"model from {init_from}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trained "
      f"({'LoRA rank ' + str(lora_rank) if lora_rank else 'full fine-tuning'})")

# -----------------------------------------------------------------------------------------------------
# data: checked, rendered with the chat template, packed into rows; problems reported by line number

X_train, Y_train, train_report, train_counts = chat_template.load_split(train_file, tok, block_size)
X_val, Y_val, val_report, val_counts = chat_template.load_split(val_file, tok, block_size)
print(train_report)
print(val_report)
if not len(X_train) or not len(X_val):
    raise UserError(f"no usable examples in {train_file if not len(X_train) else val_file}; see the report above")
print(f"train: {train_counts['rows']} rows of {block_size}, {train_counts['learned_tokens']:,} learned tokens; "
      f"val: {val_counts['rows']} rows, {val_counts['learned_tokens']:,} learned tokens")

optimizer = torch.optim.AdamW(optim.param_groups(model, weight_decay), lr=learning_rate, betas=(beta1, beta2))
dtype, dtype_why = hardware.resolve_dtype(dtype, device, (batch_size * block_size, model.config.n_embd))
training.startup_lines(print, device, device_why, dtype, dtype_why, overrides(defaults, config),
                       gradient_checkpointing)
autocast_ctx = hardware.autocast(device, dtype)
CausalSelfAttention.sdpa_backward = hardware.sdpa_backward(device, dtype)  # the attention path training takes

# -----------------------------------------------------------------------------------------------------
# logs and checkpoints

runlog.write_run_json(out_dir, config, dict(device=device, dtype=dtype, trained_params=n_train),
                      {"train": train_counts, "val": val_counts}, device)
run_log = runlog.RunLog(out_dir, keep=eval_only)
record = run_log.record


def evaluate():
    model.eval()
    n = min(len(X_train), len(X_val))  # as many training rows as held-out ones: the overfitting gap
    scores = {split: chat_template.masked_loss(model, X, Y, batch_size, device, autocast_ctx)
              for split, X, Y in (("val", X_val, Y_val), ("train", X_train[:n], Y_train[:n]))}
    model.train()
    return scores


def save():
    meta = dict(iter_num=iter_num, best_val_loss=best_val_loss, config=config, tokenizer=tok.spec,
                init_from=init_from, dataset=dataset or train_file,
                lora=dict(rank=lora_rank, alpha=lora_alpha, targets=lora_targets, merged=True) if lora_rank else None)
    weights = lora.merged_state_dict(model) if lora_rank else None
    checkpoint.save_checkpoint(checkpoint.ckpt_path(out_dir), base_model, meta, weights=weights)
    if lora_rank:
        lora.save_adapter(model, os.path.join(out_dir, "adapter"))
    print(f"saved {out_dir} at iteration {iter_num}")


# -----------------------------------------------------------------------------------------------------
# training loop

iter_num, best_val_loss, train_time = 0, float("inf"), 0.0
model.train()
while True:
    out_of_time = 0 < time_budget <= train_time
    if iter_num % eval_interval == 0 or iter_num >= max_iters or out_of_time or eval_only:
        scores = evaluate()
        print(f"step {iter_num}: held-out loss {scores['val']:.4f}, train loss {scores['train']:.4f}")
        record(dict(iter=iter_num, val_loss=scores["val"], train_eval_loss=scores["train"], train_time=round(train_time, 3)))
        if scores["val"] < best_val_loss and iter_num > 0:
            best_val_loss = scores["val"]
            save()
        best_val_loss = min(best_val_loss, scores["val"])
    if iter_num >= max_iters or out_of_time or eval_only:
        if out_of_time:
            print(f"time_budget of {time_budget:g}s spent at iteration {iter_num}")
        break

    t0 = time.perf_counter()
    # the decay follows whichever clock ends the run first: the iterations, or the time budget
    by_iters = (iter_num - warmup_iters) / max(1, max_iters - warmup_iters)
    lr = optim.lr_at(iter_num, learning_rate, warmup_iters, max_iters, min_lr, decay_lr,
                     progress=max(by_iters, train_time / time_budget) if time_budget else None)
    training.set_lr(optimizer, lr)
    # this step's rows are a function of (seed, step)
    g = torch.Generator().manual_seed(seed * 1_000_003 + iter_num)
    rows = torch.randint(len(X_train), (gradient_accumulation_steps * batch_size,), generator=g)
    loss_sum = 0.0
    for micro in range(gradient_accumulation_steps):
        pick = rows[micro * batch_size:(micro + 1) * batch_size]
        x, y = X_train[pick].to(device), Y_train[pick].to(device)  # (B, T) each
        with autocast_ctx:
            _, loss = model(x, y)  # mean over this micro-batch's learned tokens
            loss = loss / gradient_accumulation_steps
        loss.backward()
        loss_sum += loss.item()
    training.check_finite(loss_sum, iter_num, out_dir)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    train_time += dt
    if iter_num % log_interval == 0:
        tok_s = len(rows) * block_size / dt
        print(f"iter {iter_num}: loss {loss_sum:.4f}, lr {lr:.2e}, {dt * 1000:.0f}ms, {tok_s:,.0f} tok/s")
        record(dict(iter=iter_num, loss=loss_sum, lr=lr, ms=round(dt * 1000, 2), tokens_per_s=round(tok_s)))
    iter_num += 1

run_log.close()
print(f"best held-out loss {best_val_loss:.4f}")
