# train.py, the quick start: the best character-level Shakespeare model 5 minutes of training on a laptop CPU
# can make. Val loss ~1.47 on the whole val split after 300 s on 2 cores (median of 3 seeds; nanoGPT's
# CPU recipe: 1.63 in the same time); it passes nanoGPT's 2000-iteration result, 1.886, within its first
# 90 s (README, "Fast on a CPU"; every choice below was measured in dev/LOG.md).
# Longer budgets overfit it without dropout (1.48 at 7 minutes, 1.53 at 12); 15 minutes with dropout,
# --time_budget=900 --dropout=0.1, gives ~1.473 (median of 3 seeds; best run 1.4638; nanoGPT's GPU
# config on an A100: 1.4697).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# $ python sample.py --out_dir=out-shakespeare-char-cpu
# A shorter run: --time_budget=60. Under 20 s: config/train_shakespeare_char_cpu_sprint.py. That and
# config/train_tinystories_cpu.py start from this file (they import it) and set only what differs.

out_dir = "out-shakespeare-char-cpu"
eval_interval = 500
eval_iters = 50  # 50 x 16 fixed windows per split: the same text every time
log_interval = 50
always_save_checkpoint = True

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128  # twice nanoGPT's CPU context: a longer run can afford it, and each character sees more

# 4 layers, 192 wide, 3 heads of 64, with the architecture of modern small-model speedruns: rotary
# positions, RMSNorm, QK-norm, ReLU^2 (GPT-2's own stays the default in train.py)
n_layer = 4
n_head = 3
n_embd = 192
dropout = 0.0
bias = False
pos_emb = "rope"
norm = "rmsnorm"
mlp = "relu2"
qk_norm = True

# Muon for the blocks' matrices, AdamW for the rest, one learning rate; the decay follows the clock:
# time_budget seconds of training (compilation included), cosine to zero over them
optimizer_name = "muon"
learning_rate = 4e-3
min_lr = 0.0
warmup_iters = 20
time_budget = 300.0
lr_clock = "time"
max_iters = 1000000  # the time budget ends the run
lr_decay_iters = 1000000
beta2 = 0.99
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
# measured on this machine at start-up: bf16 autocast where its matmuls run faster than fp32 (~2-3x on
# CPUs with AVX-512 BF16 or AMX), fp32 where bf16 is emulated (AVX2-only CPUs: ~300x slower)
dtype = "auto"
# auto: on for a run this long when a C++ compiler is there (~25 s the first time, not counted in the
# budget, then ~1.5x the steps per second); a failed compile falls back to eager
compile = "auto"
