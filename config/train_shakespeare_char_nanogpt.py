# For train.py, the baseline of bench_time_to_loss.py: nanoGPT's documented laptop-CPU recipe for shakespeare_char, in
# nanoforge: GPT-2's architecture (learned positions, LayerNorm, GELU, tied embeddings), AdamW, no biases,
# nanoGPT's hyperparameters. nanoGPT reports val ~1.88 after these 2000 iterations (~90 s on 2 cores).
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_nanogpt.py
out_dir = "out-bench-nanogpt-cpu"
eval_interval = 100  # often, so bench_time_to_loss.py can time when the val loss first crosses its target
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 1e-1
grad_clip = 1.0

device = "cpu"
dtype = "float32"
compile = False
