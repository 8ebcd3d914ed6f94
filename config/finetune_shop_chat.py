# finetune.py: chat fine-tuning of the quick start's character-level Shakespeare model into a shop's
# customer-service assistant: offline, 2 CPU cores, ~11 minutes in all, the base included (README,
# "Fine-tune for a domain").
# $ python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_cpu.py   # the base, 5 min
# $ python data/shop_chat/prepare.py
# $ python finetune.py config/finetune_shop_chat.py
# $ python evaluate.py --out_dir=out-sft-shop --chat_task=data/shop_chat/facts.jsonl   # facts right, of 200
# $ python sample.py --out_dir=out-sft-shop --chat
# LoRA instead of full fine-tuning: --lora_rank=8 --learning_rate=3e-3 --out_dir=out-sft-shop-lora

out_dir = "out-sft-shop"
init_from = "out-shakespeare-char-cpu"
dataset = "shop_chat"
# the longest conversation with its chat markers is under 384 characters (data/shop_chat/prepare.py checks):
# none is skipped. The base was trained on 128; its rotary positions stretch to 384 as it trains here
block_size = 384
batch_size = 8
max_iters = 400  # the lr decays to min_lr by then: as right as 600 iterations, in 2/3 of the time (dev/LOG.md)
eval_interval = 200
log_interval = 50
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
device = "cpu"
