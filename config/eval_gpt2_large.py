# Evaluate the pretrained gpt2-large (774M) on OpenWebText's val split: no training.
# $ python train.py config/eval_gpt2_large.py
# Offline, point init_from at a local folder written by transformers' save_pretrained:
# $ python train.py config/eval_gpt2_large.py --init_from=path/to/gpt2-large

init_from = "gpt2-large"
out_dir = "out-eval-gpt2-large"
dataset = "openwebtext"
batch_size = 8
block_size = 1024
eval_iters = 500  # 500 x 8 fixed windows per split
eval_only = True
wandb_log = False
plot = False
