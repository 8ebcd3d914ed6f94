# train.py: the tour's model (docs/TOUR.md), a ~1M-parameter GPT on TinyStories with a 2,048-token BPE
# trained on them, a few minutes on a laptop CPU. It keeps the weights of its last 16 evaluations so
# explain.py can show the model as it learned, from its random start.
# $ python train_tokenizer.py --input=data/tinystories/input.txt --vocab_size=2048 --out=tokenizers/tinystories
# $ python data/tinystories/prepare.py
# $ python train.py config/train_tinystories_cpu.py
# $ python explain.py --out_dir=out-tinystories-cpu --prompt="the girl gave her dog a treat"
# Offline, point --input of both at ../shared/data/tinystories/tinystories_valid_head.txt (~190K train
# tokens: the model sees it a few times over, so dropout is on; the hub's validation file is 25x larger).
# The quick start's CPU recipe (config/train_shakespeare_char_cpu.py: batch, context, the time clock,
# measured dtype) with GPT-2's architecture and AdamW.
from train_shakespeare_char_cpu import *  # noqa: F403 (the quick start's values; what differs follows)

out_dir = "out-tinystories-cpu"
eval_interval = 40
eval_iters = 10  # 10 x 16 fixed windows per split
log_interval = 10
keep_checkpoints = 16  # every evaluation of the 150 s run: explain.py shows 8 of them, from the random start on

dataset = "tinystories"

# GPT-2's architecture (learned positions, LayerNorm, GELU), small: 4 layers of 4 heads, 128 wide
n_head = 4
n_embd = 128
dropout = 0.1
pos_emb = "learned"
norm = "layernorm"
mlp = "gelu"
qk_norm = False

# AdamW, the learning rate following the clock down to min_lr
optimizer_name = "adamw"
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
time_budget = 150.0  # seconds of training
compile = False  # a 2-minute run does not repay the ~25 s compile on a busy machine
