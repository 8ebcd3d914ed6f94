# The best trial of the sweep 'shakespeare_char' (config/sweep_shakespeare_char.py): trial 15, held-out loss
# 1.7648 over the whole val split (baseline 1.8851, trial 0).
# 20 trials: 15 completed, 5 pruned, 0 failed. Written by sweep.py on 2026-11-25 05:11 UTC.
# $ python train.py config/sweep_best_shakespeare_char.py

batch_size = 16
beta2 = 0.99
block_size = 64
compile = False
dataset = 'shakespeare_char'
device = 'cpu'
dropout = 0.04246218999659215
eval_interval = 50
eval_iters = 10
gradient_accumulation_steps = 1
learning_rate = 0.0059050990971612274
log_interval = 100
lr_decay_iters = 5163
max_iters = 100000
min_lr = 0.0001
n_embd = 64
n_head = 4
n_layer = 2
out_dir = 'out-shakespeare_char-best'
time_budget = 60.0
warmup_iters = 185
weight_decay = 0.009559694068702386
