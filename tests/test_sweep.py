"""
sweep.py run as a user runs it: a 3-trial study on a tiny model whose planted bad trial is pruned, that
resumes after its process is killed mid-trial, records a failing run as failed, and writes its best config
and plots; and one-line errors for a bad search space.
"""
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from conftest import ROOT  # noqa: E402


@pytest.fixture
def data_dir(sharded_char_data):
    """The sweeps train on a sharded dataset: each finished trial's score reads its val shards."""
    return sharded_char_data


def write_configs(tmp_path, data_dir, **sweep):
    """A tiny train config and a sweep config over it; `sweep` overrides the sweep's keys."""
    train = tmp_path / "train_tiny.py"
    train.write_text(f"data_dir = {data_dir!r}\ndevice = 'cpu'\ncompile = False\nn_layer = 1\nn_head = 2\n"
                     f"n_embd = 32\nblock_size = 32\nbatch_size = 8\ngradient_accumulation_steps = 1\n"
                     f"eval_iters = 2\neval_interval = 10\nlog_interval = 10\nmax_iters = 100000\n"
                     f"lr_decay_iters = 100000\nwarmup_iters = 0\nlearning_rate = 3e-3\n")
    settings = dict(study_name="tiny", sweep_dir=str(tmp_path / "sweep"), train_config=str(train),
                    time_budget=2.5, n_trials=3, report_every=0.5, pruner_startup_trials=1,
                    pruner_warmup=0.0, best_config=str(tmp_path / "best.py"),
                    space={"learning_rate": ("log", 1e-7, 1e-2), "batch_size": ("choice", [8, 16])},
                    # the second trial's learning rate is too small to learn anything: it must be pruned
                    enqueue=[{"learning_rate": 1e-7, "batch_size": 8}])
    settings.update(sweep)
    if settings["best_config"] is None:  # the default: beside the study, never under config/
        del settings["best_config"]
    path = tmp_path / "sweep_tiny.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    settings.setdefault("best_config", os.path.join(settings["sweep_dir"], "best_tiny.py"))
    return str(path), settings


def sweep_cmd(config, *args):
    return [sys.executable, os.path.join(ROOT, "sweep.py"), config, *args]


def trials(settings):
    study = optuna.load_study(study_name=settings["study_name"],
                              storage=f"sqlite:///{os.path.join(settings['sweep_dir'], 'study.db')}")
    return study.get_trials(deepcopy=False)


@pytest.mark.slow
def test_sweep_prunes_resumes_after_kill_and_writes_best_config(tmp_path, data_dir):
    config, settings = write_configs(tmp_path, data_dir)
    # start the sweep, and kill it (and its train.py) once the baseline is done and trial 1 is running
    proc = subprocess.Popen(sweep_cmd(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        states = []
        if os.path.exists(os.path.join(settings["sweep_dir"], "trial-0000")):  # the study is set up
            try:
                states = [t.state for t in trials(settings)]
            except KeyError:  # the database is there, the study not yet
                pass
        if states[:2] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    else:
        raise AssertionError("the first trial did not complete in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(settings["best_config"])
    # the same command resumes: the killed trial is marked failed and its settings retried
    again = subprocess.run(sweep_cmd(config), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trial 1 was interrupted" in again.stdout
    done = trials(settings)
    S = optuna.trial.TrialState
    assert done[0].state == S.COMPLETE and done[0].user_attrs["baseline"]  # kept from the first run
    assert done[1].state == S.FAIL and done[1].user_attrs["failure"].startswith("interrupted")
    assert done[2].params == done[1].params and done[2].state == S.PRUNED  # the retry, pruned
    assert len(done) == 4 and done[3].state in (S.COMPLETE, S.PRUNED)  # 3 counted trials in all
    assert "pruned at" in again.stdout
    # the best config is a ready train.py config holding the best trial's settings
    best = min((t for t in done if t.state == S.COMPLETE), key=lambda t: t.value)
    scope = {}
    with open(settings["best_config"]) as f:
        text = f.read()
    exec(text, scope)
    assert scope["learning_rate"] == best.params["learning_rate"] and scope["batch_size"] == best.params["batch_size"]
    assert scope["time_budget"] == 2.5 and scope["n_embd"] == 32 and f"held-out loss\n# {best.value:.4f}" in text
    assert "baseline" in again.stdout
    for name in ("optimisation_history", "intermediate_values"):
        assert os.path.getsize(os.path.join(settings["sweep_dir"], f"{name}.png")) > 1000
    # a finished study reruns as a no-op
    rerun = subprocess.run(sweep_cmd(config), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and len(trials(settings)) == 4


@pytest.mark.slow
def test_failed_trial_is_recorded_and_two_workers_share_the_study(tmp_path, data_dir):
    # n_head=3 does not divide n_embd=32: train.py fails; the study records it and goes on. Two workers start
    # at once on the new study (they once raced to create its tables), and share its two queued trials
    config, settings = write_configs(tmp_path, data_dir, n_trials=2, baseline=False, pruner_startup_trials=5,
                                     space={"n_head": ("choice", [2, 3])}, enqueue=[{"n_head": 3}, {"n_head": 2}],
                                     time_budget=1.0, best_config=None)
    workers = [subprocess.Popen(sweep_cmd(config), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    done = trials(settings)
    assert sorted(t.params["n_head"] for t in done[:2]) == [2, 3]  # each queued setting ran once
    states = {t.params["n_head"]: t.state for t in done[:2]}
    assert states == {3: optuna.trial.TrialState.FAIL, 2: optuna.trial.TrialState.COMPLETE}
    failed = next(t for t in done if t.params["n_head"] == 3)
    assert "must split into n_head=3 heads" in failed.user_attrs["failure"]
    assert os.path.exists(settings["best_config"])


@pytest.mark.parametrize("change, message", [
    (dict(space={"lerning_rate": ("log", 1e-4, 1e-2)}), "unknown config key 'lerning_rate'"),
    (dict(space={"learning_rate": ("log", 0.0, 1e-2)}), "space['learning_rate']"),
    (dict(space={"dropout": ("uniform", 0.0, 0.2)}), "space['dropout']"),
    (dict(space={"batch_size": ("choice", [8, 0.5])}), "batch_size"),
    (dict(fixed={"max_iter": 10}), "did you mean 'max_iters'"),
    (dict(space={"learning_rate": ("log", 1e-2, 1e-1)}, baseline=True), "outside the search space"),
])
def test_bad_sweep_config_is_a_one_line_error(tmp_path, data_dir, change, message):
    config, settings = write_configs(tmp_path, data_dir, enqueue=[], **change)
    proc = subprocess.run(sweep_cmd(config), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not os.path.exists(settings["sweep_dir"])  # nothing started


def test_script_defaults_reads_train_py_keys_without_running_it():
    from configurator import script_defaults
    keys = script_defaults(os.path.join(ROOT, "train.py"))
    assert keys["learning_rate"] == 6e-4 and keys["time_budget"] == 0.0 and keys["init_from"] == "scratch"
    assert keys["gradient_accumulation_steps"] == 5 * 8  # arithmetic on constants counts
    assert "defaults" not in keys and "config" not in keys and "ddp" not in keys  # nothing after the defaults


def test_the_shipped_sweep_starts_from_the_quick_start_inside_its_space():
    # config/sweep_shakespeare_char.py: its baseline (trial 0) is the quick start at the sweep's budget, and
    # every setting it can draw is a model train.py builds (n_head stays the quick start's)
    from configurator import configure, run_config_file, script_defaults
    sweep = run_config_file(os.path.join(ROOT, "config", "sweep_shakespeare_char.py"))
    assert sweep["train_config"] == "config/train_shakespeare_char_cpu.py" and "best_config" not in sweep
    defaults = script_defaults(os.path.join(ROOT, "train.py"))
    fixed = [f"--{k}={v!r}" for k, v in {**sweep["fixed"], "time_budget": sweep["time_budget"]}.items()]
    base = configure(defaults, [os.path.join(ROOT, sweep["train_config"]), *fixed])
    assert base["lr_clock"] == "time" and base["time_budget"] == 60.0 and base["n_head"] == 3
    for key, (kind, *rest) in sweep["space"].items():
        assert key in defaults and (base[key] in rest[0] if kind == "choice" else rest[0] <= base[key] <= rest[1]), key
    assert all(w % base["n_head"] == 0 and (w // base["n_head"]) % 2 == 0 for w in sweep["space"]["n_embd"][1])
