# train.py: a character-level Shakespeare model on one GPU: nanoGPT's baby GPT (6 layers, 6 heads, 384 wide,
# context 256), about 10M parameters; ~1.47 val loss after 5000 iterations.
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char.py
# $ python sample.py --out_dir=out-shakespeare-char
# On a laptop, shrink it: --device=cpu --compile=False --eval_iters=20 --block_size=64 --batch_size=12
#   --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
# (or use config/train_shakespeare_char_cpu.py, tuned for that)

out_dir = "out-shakespeare-char"
eval_interval = 250  # the model overfits this small corpus, so evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep the best model by val loss, not the last

wandb_log = False
wandb_project = "shakespeare-char"
wandb_run_name = "mini-gpt"

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # a small model can take a larger learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a bit higher than GPT-2's 0.95: few tokens per iteration
warmup_iters = 100
