"""
Peak memory of one fine-tuning mode on a GPT-2-124M-shaped model (random weights: memory does not depend
on their values), measured in its own process as the peak resident set size (ru_maxrss). Does what
finetune.py does to the model: the chat tokens' extra rows, LoRA through lora.apply_lora, gradient
checkpointing through parallel.gradient_checkpointing, AdamW over optim.param_groups; the batch is masked
like chat data (the loss counts the second half of each row).

$ /usr/bin/time -v python dev/ft_memory.py --mode=full       # also: model (load + forward only), lora, lora_ckpt, full_ckpt
"""
import resource
import sys
import time

import torch

from configurator import configure
from model import GPT, GPTConfig
from nanoforge import lora, optim, parallel

cfg = configure(dict(mode="full", batch_size=4, block_size=512, steps=3, lora_rank=8, seed=0), sys.argv[1:])
torch.manual_seed(cfg["seed"])
B, T = cfg["batch_size"], cfg["block_size"]
model = GPT(GPTConfig(block_size=1024, vocab_size=50257 + 4, n_layer=12, n_head=12, n_embd=768))
if cfg["mode"].endswith("_ckpt"):
    parallel.gradient_checkpointing(model)
if cfg["mode"].startswith("lora"):
    model = lora.apply_lora(model, cfg["lora_rank"], 2.0 * cfg["lora_rank"], 0.0)
trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
x = torch.randint(0, 50257, (B, T))  # (B, T)
y = torch.roll(x, -1, dims=1)
y[:, :T // 2] = -1  # the prompt half is not scored
t0 = time.perf_counter()
if cfg["mode"] == "model":
    with torch.no_grad():
        model(x, y)
else:
    opt = torch.optim.AdamW(optim.param_groups(model, 0.0), lr=1e-4)
    for _ in range(cfg["steps"]):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
print(f"mode={cfg['mode']} batch {B}x{T}: trained params {trained / 1e6:.2f}M, peak RSS {peak:.2f} GiB, "
      f"{(time.perf_counter() - t0) / max(cfg['steps'], 1):.1f}s/step")
