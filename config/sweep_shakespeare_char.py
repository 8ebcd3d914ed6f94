# sweep.py: a hyperparameter search around the quick start (config/train_shakespeare_char_cpu.py): 20
# trials of 60 s of training each, on 2 CPU cores, in under 30 minutes (pruned trials stop early). Trial 0
# is the quick start as it is (baseline=True) at the same 60 s, so the sweep prints the two side by side.
# $ python data/shakespeare_char/prepare.py
# $ python sweep.py config/sweep_shakespeare_char.py
# $ python train.py out-sweep-shakespeare-char/best_shakespeare_char.py   # the best setting, written by the sweep
# A killed sweep resumes with the same command; a second shell running it adds a worker (each trial then
# shares the cores, so time budgets buy less training: keep one worker per machine for timing-true sweeps).

study_name = "shakespeare_char"
sweep_dir = "out-sweep-shakespeare-char"  # trials, the study and the best config (best_<study_name>.py)
train_config = "config/train_shakespeare_char_cpu.py"
n_trials = 20
time_budget = 60.0  # seconds of training per trial (evaluations not counted); the lr follows this clock
# frequent, small evaluations of the fixed set feed the pruner (the score is the whole val split anyway)
fixed = {"eval_interval": 50, "eval_iters": 10, "log_interval": 100}
space = {
    "learning_rate": ("log", 1e-3, 1.5e-2),  # Muon's, shared by AdamW for the embeddings
    "warmup_iters": ("int", 0, 100),
    "batch_size": ("choice", [8, 12, 16, 24, 32]),
    "n_layer": ("int", 2, 6),
    "n_embd": ("choice", [96, 144, 192, 240, 288]),  # n_head stays 3: every width splits into even rotary heads
    "dropout": ("float", 0.0, 0.2),
    "weight_decay": ("log", 1e-3, 0.3),
}
report_every = 10.0  # seconds of training between pruning checks
pruner_startup_trials = 5  # the baseline and 4 others run in full before anything is pruned
pruner_warmup = 20.0  # a trial is never pruned in its first 20 s (warmup and early noise)
sampler_startup_trials = 8  # random trials, then TPE
