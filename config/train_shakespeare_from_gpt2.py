# train.py: GPT-2's pretraining continued on Tiny Shakespeare (GPT-2 BPE), from the pretrained weights;
# a plain-text fine-tune (finetune.py is chat fine-tuning: config/finetune_shop_chat.py).
# $ python data/shakespeare/prepare.py
# $ python train.py config/train_shakespeare_from_gpt2.py
# $ python sample.py --out_dir=out-shakespeare
# init_from takes a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) when online, or a local folder
# written by transformers' save_pretrained:  --init_from=path/to/gpt2

out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
log_interval = 1
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft-gpt2"

dataset = "shakespeare"
init_from = "gpt2"
block_size = 1024  # GPT-2's context; shorten it (e.g. 256) to fit a small machine

# only save checkpoints if the validation loss improves: fine-tuning overfits quickly
always_save_checkpoint = False

# 1 sequence x 32 micro-steps x 1024 tokens = 32,768 tokens per iteration;
# shakespeare has 301,966 tokens, so one epoch is ~9.2 iterations
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# fine-tune at a small constant learning rate
learning_rate = 3e-5
decay_lr = False
