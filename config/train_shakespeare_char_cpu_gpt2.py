# The previous quick start: nanoGPT's CPU model (4x4x128, context 64) with GPT-2's architecture and
# AdamW, 3000 iterations in fp32: val loss ~1.79 after ~97 s of training on 2 cores. Kept because the
# shop_chat fine-tuning recipe (config/sft_shop_chat.py) and the sweep (config/sweep_shakespeare_char.py)
# were measured on it; the quick start is now config/train_shakespeare_char_cpu.py.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu_gpt2.py

out_dir = "out-shakespeare-char-cpu-gpt2"
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
