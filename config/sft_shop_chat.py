# Chat fine-tuning of a character-level Shakespeare model into a shop's customer-service assistant:
# offline, 2 CPU cores, ~4 minutes in all (base ~2.7 min, this ~1 min) (README, "Fine-tune for a domain").
# $ python data/shakespeare_char/prepare.py
# $ python train.py config/train_shakespeare_char_cpu_gpt2.py --block_size=256 --batch_size=8 --max_iters=1500 \
#       --lr_decay_iters=1500 --eval_interval=500 --out_dir=out-shakespeare-char-256
# $ python data/shop_chat/prepare.py
# $ python finetune.py config/sft_shop_chat.py
# $ python sample.py --out_dir=out-sft-shop --chat
# LoRA instead of full fine-tuning: --lora_rank=8 --learning_rate=3e-3 --out_dir=out-sft-shop-lora

out_dir = "out-sft-shop"
init_from = "out-shakespeare-char-256"
dataset = "shop_chat"
block_size = 256
batch_size = 8
max_iters = 600
eval_interval = 200
log_interval = 50
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
device = "cpu"
