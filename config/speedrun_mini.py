# speedrun.py in miniature: every stage of the default recipe on a tiny model and a slice of the data,
# seconds a stage, no clock (fixed iterations, so two runs give the same numbers). The tests run it.
# $ python speedrun.py config/speedrun_mini.py --run_dir=speedrun-mini
run_dir = "speedrun-mini"
time = "0"
vocab_size = 400
curate_args = "--min_words=20 --val_fraction=0.05 --near_dedup=False"
pretrain_args = ("--n_layer=2 --n_head=2 --n_embd=48 --block_size=64 --batch_size=8 --max_iters=40 --time_budget=0 "
                 "--lr_clock=iters --lr_decay_iters=40 --warmup_iters=5 --eval_interval=20 --eval_iters=2 "
                 "--keep_checkpoints=2 --compile=False")
finetune_args = "--block_size=192 --batch_size=4 --max_iters=20 --eval_interval=10 --warmup_iters=5"
evaluate_args = "--max_tokens=2048"
chat_data_args = "--n_train=200 --n_val=20 --n_facts=10"
chat_eval_args = "--max_new_tokens=48"
