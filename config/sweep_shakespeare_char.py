# Hyperparameter search for the quick-start model: 20 trials of 60 s of training each, on 2 CPU cores,
# in under 30 minutes (pruned trials stop early), to beat config/train_shakespeare_char_cpu_gpt2.py at the
# same 60 s budget. Trial 0 is that config as it is (baseline=True), so the sweep prints the two side by side.
# $ python data/shakespeare_char/prepare.py
# $ python sweep.py config/sweep_shakespeare_char.py
# $ python train.py config/sweep_best_shakespeare_char.py        # the best setting, written by the sweep
# A killed sweep resumes with the same command; a second shell running it adds a worker (each trial then
# shares the cores, so time budgets buy less training: keep one worker per machine for timing-true sweeps).

study_name = "shakespeare_char"
sweep_dir = "out-sweep-shakespeare-char"
train_config = "config/train_shakespeare_char_cpu_gpt2.py"
n_trials = 20
time_budget = 60.0  # seconds of training per trial (evaluations not counted)
# max_iters out of the way: the time budget ends every trial, and lr_decay_iters (searched) sets the schedule;
# frequent, small evaluations of the fixed set feed the pruner (the score is the whole val split anyway)
fixed = {"max_iters": 100000, "eval_interval": 50, "eval_iters": 10, "log_interval": 100}
space = {
    "learning_rate": ("log", 3e-4, 1e-2),
    "lr_decay_iters": ("int", 1000, 6000),  # cosine length: ideally about the iterations that fit in the budget
    "warmup_iters": ("int", 0, 300),
    "batch_size": ("choice", [8, 12, 16, 24, 32]),
    "n_layer": ("int", 2, 6),
    "n_embd": ("choice", [64, 96, 128, 192, 256]),  # n_head stays 4: every width divides
    "dropout": ("float", 0.0, 0.2),
    "weight_decay": ("log", 1e-3, 0.3),
}
report_every = 10.0  # seconds of training between pruning checks
pruner_startup_trials = 5  # the baseline and 4 others run in full before anything is pruned
pruner_warmup = 20.0  # a trial is never pruned in its first 20 s (warmup and early noise)
sampler_startup_trials = 8  # random trials, then TPE
best_config = "config/sweep_best_shakespeare_char.py"
