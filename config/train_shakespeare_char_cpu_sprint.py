# train.py: the sprint. nanoGPT's CPU recipe reaches val 1.886 on Tiny Shakespeare (characters) after 2000
# iterations, ~90 s on 2 Zen 4 cores (~160 s on Zen 3); this passes it (val ~1.85) in 17 s of training on the
# same cores, 20 s on a CPU without native bf16 (dev/LOG.md). `python bench_time_to_loss.py` runs the two side
# by side.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu_sprint.py
# It is the quick start's recipe (config/train_shakespeare_char_cpu.py: architecture, Muon, the time clock)
# with a smaller model for a shorter run; the quick start is the best model in 5 minutes, a bigger model
# that pays for torch.compile's ~25 s, which a 17 s run cannot.
from train_shakespeare_char_cpu import *  # noqa: F403 (the quick start's values; what differs follows)

out_dir = "out-shakespeare-char-cpu-sprint"
eval_interval = 100000  # evaluate once, at the end of the time budget

# nanoGPT's CPU model (128 wide, context 64) with 3 layers instead of 4 (more steps in the time: 1.80 vs
# 1.85 at 17 s) and 2 heads of 64 instead of 4 of 32 (the same FLOPs, better loss), in the quick start's
# architecture (rotary positions, RMSNorm, QK-norm, ReLU^2). Each was measured against GPT-2's own in dev/LOG.md.
block_size = 64
n_layer = 3
n_head = 2
n_embd = 128
time_budget = 17.0
compile = False  # compiling takes ~25 s, longer than this whole run

# dtype='auto' (the quick start's) trains in bf16 where this CPU runs it faster (AVX-512 BF16), else fp32.
# Where bf16 is emulated (AVX2-only CPUs, most laptops), fp32 runs at ~half the speed, and 2 layers make
# enough more steps to get there first: val 1.84 after 20 s, where 3 layers read 1.91 after 22 s and
# nanoGPT's recipe ends at 1.89 after 114 s (dev/LOG.md, emulated AVX2). train.py applies these once it
# has resolved dtype; loading this file measures nothing.
float32_overrides = "--n_layer=2 --time_budget=20.0"
