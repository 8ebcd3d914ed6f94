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


@pytest.fixture
def postgres():
    """A real PostgreSQL server in a temporary folder, on a free local port, trusting local connections:
    Debian's postgresql package (.ci/run installs it; a missing one fails, never skips). The server
    refuses to run as root, so as root it runs as the package's `postgres` user. Yields a database URL."""
    import glob
    import shutil as sh
    import socket
    import tempfile
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert bins, "the PostgreSQL sweep test needs a PostgreSQL server: apt-get install postgresql"
    bindir = os.path.dirname(bins[-1])
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = tempfile.mkdtemp(prefix="nanoforge-pg-")  # not under pytest's tmp_path: only root may enter that
    if as_user:
        sh.chown(home, "postgres")
    data = os.path.join(home, "data")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(as_user + [f"{bindir}/initdb", "-D", data, "-U", "sweeper", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(home, "log"), "-w", "-o",
                              f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        subprocess.run(as_user + [f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "sweeper",
                                  "sweeps"], check=True, capture_output=True)
        yield f"postgresql://sweeper@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        sh.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_workers_on_two_machines_share_one_study_on_a_real_postgresql(tmp_path, data_dir, postgres):
    """Two sweep.py processes, each with its own sweep_dir (as on two machines: no shared file or file lock),
    one study on a PostgreSQL server, started at the same moment: the study is set up once (each queued
    setting runs once), the trials are split between them, none runs twice, and both write the same best."""
    config, settings = write_configs(tmp_path, data_dir, n_trials=4, baseline=False, time_budget=1.0,
                                     pruner_startup_trials=10, storage=postgres, best_config=None,
                                     enqueue=[{"learning_rate": 3e-3, "batch_size": 8},
                                              {"learning_rate": 1e-3, "batch_size": 16}])
    dirs = [str(tmp_path / f"machine{i}") for i in range(2)]
    workers = [subprocess.Popen(sweep_cmd(config, f"--sweep_dir={d}"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for d in dirs]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert "postgresql+psycopg://sweeper@127.0.0.1" in outputs[0]  # it said where the study is
    storage = postgres.replace("postgresql:", "postgresql+psycopg:")
    done = optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)
    assert len(done) >= 4 and [t.number for t in done] == list(range(len(done)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in done), [t.state for t in done]
    queued = [t.params for t in done if t.system_attrs.get("fixed_params")]
    assert len(queued) == 2  # the two enqueued settings, enqueued once: not once per worker
    # each trial ran in exactly one worker's folder, and each worker ran some
    ran = [{int(n[6:]) for n in os.listdir(d) if n.startswith("trial-")} for d in dirs]
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == {t.number for t in done} and all(ran)
    best = [open(os.path.join(d, "best_tiny.py")).read().split("\n", 1)[0] for d in dirs]
    assert best[0] == best[1] and f"trial {min(done, key=lambda t: t.value).number}," in best[0]
