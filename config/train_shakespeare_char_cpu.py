# The quick start: a character-level Shakespeare model trained on a laptop CPU in under two minutes.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu.py
# $ python sample.py --out_dir=out-shakespeare-char-cpu
# nanoGPT's CPU model (4x4x128, context 64) trained 3000 iterations: val loss ~1.79 after ~97 s of
# training on 2 cores, below 1.90 from ~65 s on (README, "Measured").

out_dir = "out-shakespeare-char-cpu"
eval_interval = 500
eval_iters = 50  # 50 x 12 fixed windows per split (a third of val): the same text every time
log_interval = 50
always_save_checkpoint = True

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 3000
lr_decay_iters = 3000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = "cpu"
compile = False
