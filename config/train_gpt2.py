# train.py: GPT-2 (124M) on OpenWebText, as nanoGPT trains it: ~2.85 val loss after ~400k iterations, about
# 4 days on 8 x A100 40GB.
# $ python data/your_text/prepare.py --dataset=openwebtext
# $ torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py
# Two nodes of 8 GPUs: see README ("Many GPUs, many machines").

wandb_log = True  # needs `wandb login`, or WANDB_MODE=offline
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

out_dir = "out-gpt2"
dataset = "openwebtext"
# 12 sequences x 1024 tokens x 40 micro-steps = 491,520 tokens per iteration (~0.5M, as in GPT-3 small)
batch_size = 12
block_size = 1024
total_batch_size = 12 * 1024 * 40  # gradient accumulation is derived: 5 micro-steps per GPU on 8 GPUs

# 600k iterations x 0.5M tokens = 300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
