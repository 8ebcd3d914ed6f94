"""
The pieces of a hyperparameter search that are not the sweep's loop (sweep.py): the search space (checked
against the trained script's keys, and sampled), which trials count, recovering trials whose worker died,
and the plots.

A search space maps a train.py config key to one of:
    ("log", low, high)     a log-uniform float, 0 < low < high
    ("float", low, high)   a uniform float
    ("int", low, high)     a uniform integer, both ends included
    ("choice", [a, b])     one of the values
"""
import os
import socket

import optuna
from optuna.trial import TrialState

import runtime
from configurator import check_key, configure
from runtime import UserError

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
        with runtime.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
