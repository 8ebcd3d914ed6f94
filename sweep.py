"""
Hyperparameter search: an Optuna study whose trials are train.py runs, pruned early when they fall behind.

$ python sweep.py config/sweep_shakespeare_char.py                  # run it, or resume it where it stopped
$ python sweep.py config/sweep_shakespeare_char.py --n_trials=40    # continue the same study up to 40 trials
$ python sweep.py config/sweep_shakespeare_char.py                  # (again, in a second shell: two workers)
$ python sweep.py config/sweep_shakespeare_char.py --storage=postgresql://user:pass@host:5432/sweeps  # many machines

A sweep config names train.py's starting config (train_config), the overrides every trial shares (fixed,
such as a time_budget) and the search space, keyed by train.py's own config keys:

    space = {"learning_rate": ("log", 1e-4, 1e-2),     # log-uniform float
             "dropout": ("float", 0.0, 0.3),           # uniform float
             "n_layer": ("int", 2, 6),                 # uniform integer, both ends included
             "batch_size": ("choice", [8, 16, 32])}    # one of these

Each trial runs train.py in a subprocess, in <sweep_dir>/trial-NNNN. The sweep reads its log.jsonl as it
goes and reports the held-out loss (train.py's fixed eval set) at every report_every seconds of training:
Optuna's median pruner stops (kills) a trial that is worse than the median of earlier trials at the same
point. A trial that finishes is scored by its loss over the whole held-out split (evaluation.py, the
number evaluate.py reports). A run that fails (a non-finite loss, out of memory, a bad combination such
as n_embd not divisible by n_head) is recorded as failed, with the reason, and the study goes on.

The study lives in a database: SQLite at <sweep_dir>/study.db unless `storage` is given, so a sweep that
was killed resumes when the same command is run again (its interrupted trial is retried), and several
worker processes can share it. n_trials counts the trials of the whole study, not of one run.
With baseline=True the first trial is train_config's own values: the setting to beat.
At the end: the best trial as a ready config file (best_config), the trials against the baseline on
stdout, and optimisation_history.png, param_importances.png and intermediate_values.png in sweep_dir.
"""
import contextlib
import datetime
import fcntl
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import optuna
import sqlalchemy.exc
import torch
from optuna.trial import TrialState

from configurator import KNOB_TYPES, check_key, configure, knobs, overrides, script_defaults
from nanoforge import errors, files, hardware, runlog
from nanoforge.checkpoint import load_model
from nanoforge.errors import UserError
from nanoforge.evaluation import run_data_dir, score_split
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
# the search space: a train.py config key maps to one of
#     ("log", low, high)     a log-uniform float, 0 < low < high
#     ("float", low, high)   a uniform float
#     ("int", low, high)     a uniform integer, both ends included
#     ("choice", [a, b])     one of the values
# checked against train.py's keys and sampled; then which trials count, recovering trials whose worker
# died, and the plots

KINDS = ("log", "float", "int", "choice")
SET_BY_SWEEP = ("out_dir", "init_from", "plot", "time_budget")


def as_args(values):
    """{key: value} as --key=value arguments for configure() or a subprocess (repr round-trips)."""
    return [f"--{k}={v!r}" for k, v in values.items()]


def check_space(space, train_defaults, where):
    """UserError unless every key is one of the script's (with "did you mean"), every spec is well formed,
    and every value has the type the script expects."""
    if not space:
        raise UserError(f"{where} has an empty search space; set space = {{'learning_rate': ('log', 1e-4, 1e-2), ...}}")
    for key, spec in space.items():
        check_key(key, train_defaults, f"the search space of {where}")
        if key in SET_BY_SWEEP:
            raise UserError(f"space['{key}']: the sweep sets {key} itself; search training settings only")
        ok = isinstance(spec, (tuple, list)) and len(spec) > 0 and spec[0] in KINDS
        if ok and spec[0] == "choice":
            ok = len(spec) == 2 and isinstance(spec[1], (list, tuple)) and len(spec[1]) > 0
        elif ok:
            ok = len(spec) == 3 and spec[1] < spec[2] and (spec[0] != "log" or spec[1] > 0)
        if not ok:
            raise UserError(f"space['{key}'] = {spec!r}: write ('log', low, high) with 0 < low < high, ('float', "
                            f"low, high), ('int', low, high) or ('choice', [a, b, ...])")
        for value in (spec[1] if spec[0] == "choice" else spec[1:]):
            configure(train_defaults, as_args({key: value}))  # the type the script expects


def in_space(spec, value):
    kind, *rest = spec
    return value in rest[0] if kind == "choice" else rest[0] <= value <= rest[1]


def suggest(trial, key, spec):
    kind, *rest = spec
    if kind == "choice":
        return trial.suggest_categorical(key, list(rest[0]))
    if kind == "int":
        return trial.suggest_int(key, rest[0], rest[1])
    return trial.suggest_float(key, rest[0], rest[1], log=kind == "log")


# -----------------------------------------------------------------------------------------------------
# trials

def worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


def counted(study):
    """Trials that say something about their settings: completed, pruned, or failed by themselves (not
    interrupted by a stopped or killed sweep)."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False, states=done)
               if not t.user_attrs.get("failure", "").startswith("interrupted"))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_dead_trials(study):
    """Trials left RUNNING by a sweep process of this machine that no longer exists (killed): marked failed
    as interrupted, and their settings queued again. Returns their numbers."""
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = t.user_attrs.get("worker", "").rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
            optuna.trial.Trial(study, t._trial_id).set_user_attr("failure", "interrupted: its sweep process died")
            study.tell(t.number, state=TrialState.FAIL)
            attrs = {"retry_of": t.number, **({"baseline": True} if t.user_attrs.get("baseline") else {})}
            study.enqueue_trial(t.params, user_attrs=attrs)
            recovered.append(t.number)
    return recovered


def save_plots(study, folder, step_seconds):
    """optimisation_history.png, param_importances.png, intermediate_values.png in folder; returns the
    paths written (a plot the study cannot make yet, such as importances before 2 completed trials, is
    skipped with a note)."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="The number of trials is too small")  # importances say it anyway
    written = []
    for name, plot in (("optimisation_history", vis.plot_optimization_history),
                       ("param_importances", vis.plot_param_importances),
                       ("intermediate_values", vis.plot_intermediate_values)):
        try:
            ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            print(f"no {name}.png: {e}")
            continue
        if name == "intermediate_values":
            ax.set_xlabel(f"step (one per {step_seconds:g} s of training)")
        fig = ax.figure
        path = os.path.join(folder, f"{name}.png")
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written

# -----------------------------------------------------------------------------------------------------
study_name = "sweep"
sweep_dir = "out-sweep"  # trial runs, study.db (the default storage) and the plots
storage = ""  # a database URL (postgresql://user:pass@host/db); '' = sqlite in sweep_dir
train_config = ""  # the train.py config file every trial starts from
fixed = {}  # train.py overrides shared by every trial, e.g. {"eval_interval": 100}
time_budget = 60.0  # seconds of training per trial (train.py's time_budget); 0 = none (max_iters decides)
space = {}  # train.py key -> ("log"|"float"|"int", low, high) or ("choice", [values])
enqueue = []  # parameter dicts to try first (after the baseline), e.g. known good settings
baseline = True  # the first trial is train_config's own values for the searched keys
n_trials = 20  # trials in the study (completed, pruned or failed), counting earlier runs
timeout = 0.0  # stop starting trials after this many seconds of this run; 0 = no limit
report_every = 10.0  # seconds of training between intermediate reports (pruning checks)
pruner_startup_trials = 5  # no pruning until this many trials have completed
pruner_warmup = 10.0  # seconds of training before a trial can be pruned
sampler_startup_trials = 10  # random trials before TPE starts modelling the space
seed = 1337
best_config = ""  # where the best trial's config goes; '' = sweep_dir/best_<study_name>.py, beside its study
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals(), KNOB_TYPES + (dict, list))
config = configure(defaults, sys.argv[1:])
globals().update(config)
sweep_files = [a for a in sys.argv[1:] if not a.startswith("--")] or ["the command line"]

TRAIN = os.path.join(files.REPO, "train.py")
train_defaults = script_defaults(TRAIN)
where = f"the sweep config {sweep_files[-1]}"


# the search space and the shared overrides, checked against train.py's keys and types before any trial runs
if not train_config:
    raise UserError(f"train_config is not set in {where}; name the train.py config file trials start from")
for key in fixed:
    check_key(key, train_defaults, f"'fixed' of {where}")
fixed = dict(fixed, time_budget=time_budget)
base = configure(train_defaults, [train_config, *as_args(fixed)])  # what every trial starts from
check_space(space, train_defaults, where)
for params in enqueue:
    for key in params:
        check_key(key, space, f"'enqueue' of {where} (keys of the search space)")
baseline_params = {k: base[k] for k in space}
if baseline:
    outside = [f"{k}={v!r}" for k, v in baseline_params.items() if not in_space(space[k], v)]
    if outside:
        raise UserError(f"the baseline ({train_config}) has {', '.join(outside)}, outside the search space; widen "
                        f"the space or set baseline=False")
# beside the study by default: a file under config/ may be a tracked result that a new sweep must not replace
best_config = best_config or os.path.join(sweep_dir, f"best_{study_name}.py")

# -----------------------------------------------------------------------------------------------------
# the study, in its database

os.makedirs(sweep_dir, exist_ok=True)
url = storage or f"sqlite:///{os.path.abspath(os.path.join(sweep_dir, 'study.db'))}"
# a bare postgresql:// means psycopg2 to some SQLAlchemy versions and psycopg 3 to others: name the one we install
url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
shown = re.sub(r"://([^:/@]+):.*@", r"://\1:***@", url)  # never print a database password
optuna.logging.set_verbosity(optuna.logging.ERROR)  # this script prints one line per trial itself
warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                     n_warmup_steps=math.ceil(pruner_warmup / report_every))


@contextlib.contextmanager
def setup_lock():
    """Workers set the study up one at a time: creating the database tables, enqueueing the baseline and
    recovering interrupted trials must each happen once. On one machine a file lock in sweep_dir does it;
    workers on many machines share a PostgreSQL server, whose advisory lock (held by one connection until
    released) every machine sees."""
    if not url.startswith("postgresql"):
        with open(os.path.join(sweep_dir, "setup.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    try:
        engine = sqlalchemy.create_engine(url)
        conn = engine.connect()
    except (ImportError, sqlalchemy.exc.SQLAlchemyError) as e:  # no psycopg, a wrong host, user or password
        raise UserError(f"cannot open the study storage {shown}: {str(e).splitlines()[0]}") from None
    key = sqlalchemy.text("SELECT hashtext(:name)").bindparams(name=f"nanoforge sweep {study_name}")
    lock_id = conn.execute(key).scalar()
    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:id)"), {"id": lock_id})
    try:
        yield
    finally:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:id)"), {"id": lock_id})
        conn.close()
        engine.dispose()


with setup_lock():
    for attempt in range(5):
        try:
            study = optuna.create_study(study_name=study_name, storage=url, direction="minimize",
                                        load_if_exists=True, pruner=pruner)
            break
        except (ImportError, ValueError) as e:  # a bad URL or a missing database driver (psycopg for PostgreSQL)
            raise UserError(f"cannot open the study storage {shown}: {e}") from None
        except sqlalchemy.exc.SQLAlchemyError:  # another process (another machine) creating the tables just now
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    # a worker seeds its sampler by its place in the study, so workers sharing it draw different settings
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=sampler_startup_trials,
                                               multivariate=True)  # multivariate: lr and batch size go together
    if not study.trials:
        if baseline:
            study.enqueue_trial(baseline_params, user_attrs={"baseline": True})
        for params in enqueue:
            study.enqueue_trial(params)
    for number in recover_dead_trials(study):
        print(f"trial {number} was interrupted (its sweep process died): marked failed, its settings retried")


# -----------------------------------------------------------------------------------------------------
# one trial: a train.py run, watched through its log.jsonl

class TrialFailed(Exception):
    """train.py exited with an error: recorded as a failed trial, and the study goes on."""


def held_out_loss(run_dir):
    """A finished trial's score: its checkpoint's loss over the whole held-out split."""
    device, _ = hardware.resolve_device(base["device"])
    model, tok_spec, meta = load_model(run_dir, map_location=device)
    token_bytes = torch.tensor(load_tokenizer(tok_spec).token_bytes(), dtype=torch.float64)
    shape = (32 * model.config.block_size, model.config.n_embd)  # score_split's batch of 32 windows
    autocast_ctx = hardware.autocast(device, hardware.resolve_dtype(base["dtype"], device, shape)[0])
    scores = score_split(model.to(device), run_data_dir(meta), "val", token_bytes, 32, device, autocast_ctx)
    return scores["loss"]


def stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def objective(trial):
    trial.set_user_attr("worker", worker_id())
    params = {key: suggest(trial, key, spec) for key, spec in space.items()}
    run_dir = os.path.join(sweep_dir, f"trial-{trial.number:04d}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover of a deleted study of the same name
    os.makedirs(run_dir)
    print(f"trial {trial.number}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in params.items()), flush=True)
    args = [sys.executable, TRAIN, train_config, *as_args({**fixed, **params, "out_dir": run_dir, "plot": False})]
    with open(os.path.join(run_dir, "train.out"), "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    # an evaluation at t seconds of training is reported as step floor(t / report_every): trials are compared
    # at the same training time whatever their speed (the median pruner compares equal steps)
    step, seen, last = 0, 0, None
    trial_max_iters = params.get("max_iters", base["max_iters"])
    try:
        while True:
            finished = proc.poll() is not None
            records = runlog.read_log(run_dir)
            for r in records[seen:]:
                if "val_loss" not in r:
                    continue
                last = r
                if math.isfinite(r["val_loss"]) and int(r["train_time"] // report_every) > step:
                    # steps this trial passed without an evaluation take this one's value (a slightly later,
                    # so kinder, number): every trial has a value at every step, so the pruner can compare
                    for step in range(step + 1, int(r["train_time"] // report_every) + 1):
                        trial.report(r["val_loss"], step)
                    # the final evaluation (budget spent or max_iters reached) is scored, never pruned
                    spent = (time_budget and r["train_time"] >= time_budget) or r["iter"] >= trial_max_iters
                    if not spent and trial.should_prune():
                        stop(proc)
                        print(f"trial {trial.number}: pruned at {r['train_time']:.0f}s of training "
                              f"(val loss {r['val_loss']:.4f} on the fixed set)", flush=True)
                        raise optuna.TrialPruned()
            seen = len(records)
            if finished:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop(proc)
        trial.set_user_attr("failure", "interrupted: the sweep was stopped")
        raise
    if proc.returncode != 0:
        with open(os.path.join(run_dir, "train.out")) as f:
            lines = [line.strip() for line in f if line.strip()]
        reason = lines[-1] if lines and proc.returncode > 0 else f"killed by signal {-proc.returncode} (out of memory?)"
        trial.set_user_attr("failure", reason)
        print(f"trial {trial.number}: failed: {reason}", flush=True)
        raise TrialFailed(reason)
    if last is None:  # cannot happen with train.py as it is (it evaluates at the start and the end)
        raise TrialFailed(f"{run_dir}/log.jsonl holds no evaluation")
    value = held_out_loss(run_dir)
    trial.set_user_attr("train_time", last["train_time"] if last else None)
    trial.set_user_attr("iter", last["iter"] if last else None)
    print(f"trial {trial.number}: held-out loss {value:.4f} after {last['train_time']:.0f}s of training "
          f"({last['iter']} iterations)", flush=True)
    return value


def sigterm(signum, frame):
    raise KeyboardInterrupt  # kill the running trial's train.py, mark the trial interrupted, exit


signal.signal(signal.SIGTERM, sigterm)
started = time.time()
print(f"study '{study_name}' in {shown}: {counted(study)} of {n_trials} trials done")
while counted(study) < n_trials:
    if timeout and time.time() - started > timeout:
        print(f"timeout of {timeout:g}s reached")
        break
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))

# -----------------------------------------------------------------------------------------------------
# results: the trials, the best against the baseline, the best config, the plots

trials = study.get_trials(deepcopy=False)
print(f"\n{'trial':>5}  {'state':8}  {'held-out':>8}  settings")
for t in trials:
    note = t.user_attrs.get("failure", "") or ("baseline" if t.user_attrs.get("baseline") else "")
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step = max(t.intermediate_values)
        note = f"pruned (fixed-set val {t.intermediate_values[step]:.4f} at its last check)"
    value = f"{t.value:.4f}" if t.state == TrialState.COMPLETE else "-"
    print(f"{t.number:>5}  {t.state.name:8}  {value:>8}  {t.params}  {note}")
complete = [t for t in trials if t.state == TrialState.COMPLETE]
if not complete:
    print("no trial has completed yet: no best config written")
    sys.exit(0)
best = study.best_trial
base_trial = min((t for t in complete if t.user_attrs.get("baseline")), key=lambda t: t.value, default=None)
line = f"best: trial {best.number}, held-out loss {best.value:.4f}"
if base_trial is not None:
    line += (f"; baseline ({train_config} as is, same budget): trial {base_trial.number}, {base_trial.value:.4f}; "
             f"difference {best.value - base_trial.value:+.4f}")
print(line)

merged = configure(train_defaults, [train_config, *as_args({**fixed, **best.params})])
settings = dict(overrides(train_defaults, merged), **{k: merged[k] for k in space})  # searched keys always shown
settings["out_dir"] = f"out-{study_name}-best"
n_pruned = sum(t.state == TrialState.PRUNED for t in trials)
n_failed = sum(t.state == TrialState.FAIL for t in trials)
header = [f"The best trial of the sweep '{study_name}' ({' '.join(sweep_files)}): trial {best.number}, held-out loss",
          f"{best.value:.4f} over the whole val split"
          + (f" (baseline {base_trial.value:.4f}, trial {base_trial.number})." if base_trial else "."),
          f"{len(trials)} trials: {len(complete)} completed, {n_pruned} pruned, {n_failed} failed. Written by sweep.py "
          f"on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
          f"$ python train.py {os.path.relpath(best_config, files.REPO) if best_config.startswith(files.REPO) else best_config}"]
with files.atomic_path(best_config) as tmp:
    with open(tmp, "w") as f:
        f.write("".join(f"# {h}\n" for h in header) + "\n")
        f.write("".join(f"{k} = {v!r}\n" for k, v in sorted(settings.items())))
print(f"best config: {best_config}")

for path in save_plots(study, sweep_dir, report_every):
    print(f"plot: {path}")
