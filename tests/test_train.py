"""
End-to-end behaviour of train.py and sample.py, run as a user runs them (subprocesses): the
prepare -> train -> sample pipeline, exact resume (DDP against 1 process: test_distributed.py), stopping on a
signal or a non-finite loss, and a one-line error for each kind of bad input.
"""
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nanoforge import tokens
from conftest import ROOT, SHAKESPEARE, TICK, TINY, assert_one_line_error, read_log, run, run_fake_clock, train_losses


@pytest.mark.slow
def test_prepare_train_sample_pipeline(char_data, tmp_path):
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=15",
        "--plot=True")
    for name in ("ckpt.pt", "log.jsonl", "run.json", "loss.png"):
        assert os.path.exists(os.path.join(out, name)), name
    log = read_log(out)
    evals = [r for r in log if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learns
    assert all(r["val_bpb"] > 0 for r in evals)
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(30))
    assert {"lr", "ms", "tokens_per_s", "mfu"} <= steps[0].keys()
    with open(os.path.join(out, "run.json")) as f:
        info = json.load(f)
    assert info["config"]["max_iters"] == 30 and info["run"]["torch"] and info["derived"]["world_size"] == 1
    sample = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=50",
                 "--device=cpu")
    texts = sample.stdout.split("---------------\n")
    assert len(texts) == 3 and texts[0].startswith("ROMEO:") and len(texts[0]) >= len("ROMEO:") + 50
    # same seed, same text; the cache does not change what is sampled
    again = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=50",
                "--device=cpu", "--use_kv_cache=False")
    assert again.stdout == sample.stdout


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(char_data, tmp_path):
    # dropout on: the resumed run must also draw the same dropout masks
    # (8 micro-steps: enough compute that neither run shrinks its evaluation set, so both score the same windows)
    common = [*TINY, f"--data_dir={char_data}", "--dropout=0.1", "--eval_interval=5", "--gradient_accumulation_steps=8"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run("train.py", *common, f"--out_dir={full}", "--max_iters=16")
    run("train.py", *common, f"--out_dir={part}", "--max_iters=10")
    run("train.py", *common, f"--out_dir={part}", "--max_iters=16", "--init_from=resume")
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == list(range(16))
    for it in range(16):
        assert abs(a[it] - b[it]) < 1e-5, (it, a[it], b[it])
    val_a = [(r["iter"], r["val_loss"]) for r in read_log(full) if "val_loss" in r]
    val_b = [(r["iter"], r["val_loss"]) for r in read_log(part) if "val_loss" in r]
    assert [i for i, _ in val_a] == [i for i, _ in val_b] == [0, 5, 10, 15, 16]
    assert all(abs(x[1] - y[1]) < 1e-5 for x, y in zip(val_a, val_b))


def test_resume_needs_only_the_out_dir_and_names_what_it_changes(char_data, tmp_path):
    # the run's own settings come from its out_dir: no config file, no arguments repeated; a knob given on
    # resume that differs from the run is said, or refused where the run would not continue as it was
    common = [*TINY, f"--data_dir={char_data}", "--dropout=0.1", "--eval_interval=5"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run("train.py", *common, f"--out_dir={full}", "--max_iters=12")
    run("train.py", *common, f"--out_dir={part}", "--max_iters=6")
    proc = run("train.py", "--init_from=resume", f"--out_dir={part}", "--max_iters=12")
    assert "resume: the run's settings, except max_iters=12 (was 6)" in proc.stdout
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == list(range(12))
    assert all(abs(a[it] - b[it]) < 1e-5 for it in a), (a, b)
    refused = run("train.py", "--init_from=resume", f"--out_dir={part}", "--max_iters=20", "--batch_size=8", check=False)
    assert_one_line_error(refused, "--init_from=resume: batch_size=4 there, 8 here", "drop --batch_size")


BUSY = """
import os, runpy, sys, torch
os.getloadavg = lambda: (3.0, 3.0, 3.0)  # another job keeps one of the 2 cores busy
os.cpu_count = lambda: 2
torch.set_num_threads(2)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_busy_machine_is_said_with_its_fix(char_data, tmp_path):
    proc = run("-c", BUSY, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={char_data}",
               f"--out_dir={tmp_path / 'o'}", "--max_iters=4")
    assert proc.stdout.count("warning: this machine is busy") == 1, proc.stdout
    assert "rerun with OMP_NUM_THREADS=1" in proc.stdout


def test_time_budget_stops_evaluates_and_saves(char_data, tmp_path):
    out = str(tmp_path / "out")
    run_fake_clock("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=1000000",
                   "--eval_interval=1000000", "--time_budget=0.5")
    log = read_log(out)
    steps = [r for r in log if "loss" in r]
    last = log[-1]
    assert "val_loss" in last and last["iter"] == len(steps)  # a final evaluation where it stopped
    assert all(r["ms"] == pytest.approx(2 * TICK * 1000) for r in steps)  # the clock is the fake one
    # the step during which the budget ran out was the last
    assert steps[-2]["train_time"] <= 0.5 < steps[-1]["train_time"] == last["train_time"]
    assert last["train_time"] == pytest.approx(len(steps) * 2 * TICK, abs=1e-3)  # the log keeps 3 decimals
    assert os.path.exists(os.path.join(out, "ckpt.pt"))


def test_max_epochs_caps_a_timed_run_and_its_lr_decays_by_then(char_data, tmp_path):
    # 180,000 train tokens, 128 a step: 0.01 passes is 15 steps, however much time is left; the time clock's
    # cosine then reaches min_lr at the 15th step, not at the (far) end of the time budget
    out = str(tmp_path / "out")
    proc = run_fake_clock("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=1000000",
                          "--eval_interval=1000000", "--time_budget=1000", "--lr_clock=time", "--max_epochs=0.01",
                          "--min_lr=0")
    assert "max_epochs=0.01: at most 15 iterations (128 tokens each)" in proc.stdout
    steps = [r for r in read_log(out) if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(15)) and read_log(out)[-1]["iter"] == 15
    lrs = [r["lr"] for r in steps]
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.02 * 3e-3  # 12/13 down the cosine


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["train_shakespeare_char_cpu.py", "train_shakespeare_char_cpu_sprint.py"])
def test_cpu_recipes_train_until_their_time_budget(char_data, tmp_path, recipe):
    # the README's CPU recipes as shipped (architecture, Muon, measured precision, the time clock), with a
    # 1.5 s budget on the fake clock (49 steps on any machine, past the 20 of warmup): 'auto' does not compile
    # so short a run, the budget ends it, the lr decays to min_lr=0 on the time clock, and the model learns.
    # (A quarter of the batch: the same steps at a quarter of the cost.)
    from nanoforge.checkpoint import load_checkpoint
    out = str(tmp_path / "out")
    proc = run_fake_clock("train.py", f"config/{recipe}", f"--data_dir={char_data}", f"--out_dir={out}",
                          "--time_budget=1.5", "--eval_iters=4", "--log_interval=1", "--plot=False", "--batch_size=4")
    assert "compile: False (" in proc.stdout  # the sprint says False; the quick start leaves it to auto
    log = read_log(out)
    steps, evals = [r for r in log if "loss" in r], [r for r in log if "val_loss" in r]
    assert steps[-2]["train_time"] <= 1.5 < steps[-1]["train_time"] and len(steps) == 49
    assert steps[-1]["train_time"] == pytest.approx(len(steps) * 2 * TICK, abs=1e-3)
    assert evals[-1]["iter"] == steps[-1]["iter"] + 1  # stopped by the budget
    lrs = [r["lr"] for r in steps]
    assert lrs[:20] == sorted(lrs[:20]) and lrs[-1] < 0.01 * max(lrs)  # warmup, then cosine to 0 on the clock
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    cfg = load_checkpoint(os.path.join(out, "ckpt.pt"))["meta"]["config"]
    assert (cfg["optimizer_name"], cfg["pos_emb"], cfg["mlp"], cfg["dtype"]) == ("muon", "rope", "relu2", "auto")


@pytest.mark.slow
def test_resume_goes_on_from_the_time_already_spent(char_data, tmp_path):
    # a time_budget (and the lr's time clock) counts the training time before the stop: the resumed run
    # starts its clock where the checkpoint left it, and stops at the new budget, not a whole budget later
    out = str(tmp_path / "out")
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=1000000", "--eval_interval=1000000",
            "--lr_clock=time", "--warmup_iters=0"]
    run_fake_clock("train.py", *args, "--time_budget=0.5")
    before = [r for r in read_log(out) if "loss" in r]
    assert before[-2]["train_time"] <= 0.5 < before[-1]["train_time"]
    run_fake_clock("train.py", *args, "--time_budget=1", "--init_from=resume")
    after = [r for r in read_log(out) if "loss" in r and r["iter"] > before[-1]["iter"]]
    assert after[0]["train_time"] == pytest.approx(before[-1]["train_time"] + 2 * TICK, abs=1e-3)  # a restarted clock would start at 0
    assert after[-2]["train_time"] <= 1.0 < after[-1]["train_time"]
    # the lr's time clock went on too: the first resumed step is half way down the cosine, not at its top
    progress = len(before) * 2 * TICK / 1.0  # exact: the log rounds train_time to 3 decimals
    assert after[0]["lr"] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * (3e-3 - 3e-4))


@pytest.mark.slow
def test_muon_and_architecture_options_resume_exactly(char_data, tmp_path):
    # Muon + AdamW save and resume as one optimizer; the options are rebuilt from the checkpoint
    common = [*TINY, f"--data_dir={char_data}", "--eval_interval=4", "--optimizer_name=muon", "--mlp=relu2",
              "--norm=rmsnorm", "--pos_emb=rope", "--qk_norm=True", "--tie_embeddings=False", "--zero_init=True",
              "--lr_schedule=wsd", "--lr_cooldown=0.5", "--lr_decay_iters=8"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run("train.py", *common, f"--out_dir={full}", "--max_iters=8")
    run("train.py", *common, f"--out_dir={part}", "--max_iters=4")
    run("train.py", *common, f"--out_dir={part}", "--max_iters=8", "--init_from=resume")
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == list(range(8))
    assert all(abs(a[i] - b[i]) < 1e-5 for i in a), (a, b)
    lrs = {r["iter"]: r["lr"] for r in read_log(full) if "lr" in r}
    assert lrs[2] == lrs[5] == 3e-3 and lrs[7] < lrs[6] < 3e-3  # wsd: flat, then down over the last half
    assert a[7] < a[0] - 0.2  # and it learns
    # resuming with the other optimizer is refused in one line (left out, the run's own is taken)
    adamw = [a for a in common if a != "--optimizer_name=muon"]
    proc = run("train.py", *adamw, "--optimizer_name=adamw", f"--out_dir={part}", "--max_iters=9",
               "--init_from=resume", check=False)
    assert_one_line_error(proc, "optimizer_name='muon' there, 'adamw' here", "--optimizer")


@pytest.mark.slow
def test_target_loss_stops_at_the_first_evaluation_below_it_on_the_whole_val_split(char_data, tmp_path):
    import torch
    from nanoforge.checkpoint import load_model
    from nanoforge.evaluation import score_split
    from nanoforge.tokenizer import load_tokenizer
    from nanoforge.tokens import read_meta
    out = str(tmp_path / "out")
    run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=200", "--eval_interval=5",
        "--target_loss=3.5", "--eval_whole_val=True", "--always_save_checkpoint=False", "--gradient_accumulation_steps=8")
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert evals[-1]["val_loss"] <= 3.5 < min(r["val_loss"] for r in evals[:-1]) and len(evals) > 2
    assert evals[-1]["iter"] < 200 and evals[-1]["iter"] % 5 == 0
    # the number it stopped on is the whole val split's loss, as evaluate.py computes it from the checkpoint
    model, spec, meta = load_model(out)
    token_bytes = torch.tensor(load_tokenizer(read_meta(char_data)["tokenizer"]).token_bytes(), dtype=torch.float64)
    whole = score_split(model, char_data, "val", token_bytes, 4, "cpu", torch.autocast("cpu", enabled=False), 32)
    assert abs(whole["loss"] - evals[-1]["val_loss"]) < 1e-5


def test_error_time_clock_without_a_time_budget(char_data, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path}", "--lr_clock=time", check=False)
    assert_one_line_error(proc, "lr_clock='time'", "--time_budget")


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same(char_data, tmp_path):
    common = [*TINY, f"--data_dir={char_data}", "--max_iters=5", "--eval_interval=5", "--dropout=0.1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run("train.py", *common, f"--out_dir={a}")
    run("train.py", *common, f"--out_dir={b}", "--gradient_checkpointing=True")
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(5))
    assert all(abs(la[i] - lb[i]) < 1e-5 for i in la)


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(char_data, tmp_path):
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={char_data}",
                             f"--out_dir={out}", "--max_iters=100000", "--eval_interval=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log_path = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log_path) and len(read_log(out)) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "stop requested" in stdout
    last = max(train_losses(out))
    from nanoforge.checkpoint import load_checkpoint
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["meta"]["iter_num"] == last + 1
    run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", f"--max_iters={last + 3}",
        "--eval_interval=100000", "--init_from=resume")
    assert sorted(train_losses(out)) == list(range(last + 3))


# SIGTERM delivered inside the third step's torch.stack, after the stop flag was read into the all-reduced
# tensor and before the step reads it back: the window where a Ctrl-C under load used to be lost
LATE_SIGNAL = """
import os, runpy, signal, sys, torch
real, steps = torch.stack, []
def stack(*args, **kwargs):
    out = real(*args, **kwargs)
    if sys._getframe(1).f_code.co_filename.endswith("train.py"):  # the training step's, not an evaluation's
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs before this returns
    return out
torch.stack = stack
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_stop_asked_between_a_steps_all_reduce_and_its_end_is_kept(char_data, tmp_path):
    out = str(tmp_path / "out")
    proc = run("-c", LATE_SIGNAL, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={char_data}", f"--out_dir={out}",
               "--max_iters=40", "--eval_interval=1000")
    assert "stop requested" in proc.stdout, proc.stdout[-1500:]
    assert sorted(train_losses(out)) == list(range(4))  # the step it landed in, then the next, which carries it


def test_sigterm_during_the_first_evaluation_stops_at_once_and_claims_no_file(char_data, tmp_path):
    # an evaluation is dropped when a stop is asked for during it: the run ends there, not minutes later,
    # and with no training done yet it saves nothing and says so (it used to claim a checkpoint it never wrote)
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={char_data}",
                             f"--out_dir={out}", "--eval_iters=20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(os.path.join(out, "run.json")):
        time.sleep(0.1)
    time.sleep(1.0)  # into the first evaluation: 2 x 80,000 windows, far longer than this test waits
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "stop requested during the evaluation at iteration 0" in stdout
    assert f"nothing to save, nothing was saved to {out}" in stdout
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


@pytest.mark.slow
def test_sigterm_during_a_later_evaluation_saves_the_training_done(char_data, tmp_path):
    # a stop during a long evaluation keeps every finished step: ckpt.pt holds the model as of the last one,
    # it loads and resumes, and the log says what was saved
    data = tmp_path / "big_val"  # char_data with a val split of ~4M tokens, so evaluating it takes seconds
    data.mkdir()
    for name in ("train.bin", "meta.json"):
        shutil.copy(os.path.join(char_data, name), data / name)
    train = np.asarray(tokens.open_tokens(os.path.join(char_data, "train.bin")))
    tokens.write_tokens(str(data / "val.bin"), np.tile(train, 24), tokens.read_meta(char_data)["vocab_size"])
    out = str(tmp_path / "out")
    args = [*TINY, f"--data_dir={data}", f"--out_dir={out}"]
    run("train.py", *args, "--max_iters=3", "--eval_interval=3")  # a checkpoint at iteration 3
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--init_from=resume",
                             "--max_iters=100000", "--eval_interval=5", "--eval_whole_val=True"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and 4 not in train_losses(out):
        time.sleep(0.1)
    time.sleep(1.0)  # into the evaluation at iteration 5, of the whole ~4M-token val split
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "stop requested during the evaluation at iteration 5" in stdout
    assert f"saved checkpoint to {out} at iteration 5 (stop requested)" in stdout
    from nanoforge.checkpoint import load_checkpoint
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["meta"]["iter_num"] == 5
    # (the resumed run keeps eval_whole_val from run.json; scoring the ~4M tokens again would only cost time)
    run("train.py", *args, "--init_from=resume", "--max_iters=7", "--eval_interval=5", "--eval_whole_val=False")
    assert sorted(train_losses(out)) == list(range(7))


@pytest.mark.slow
def test_two_runs_on_one_out_dir_the_second_is_refused(char_data, tmp_path):
    # two train.py on the same --out_dir: the second stops in one line naming the first's process id
    # (before, both ran and one's checkpoint and log silently replaced the other's); once the first is
    # killed, its lock is gone with it, and a leftover half-written checkpoint is cleaned up
    out = str(tmp_path / "out")
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--eval_interval=4"]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--max_iters=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(os.path.join(out, "ckpt.pt")):
            time.sleep(0.2)
        second = run("train.py", *args, "--max_iters=100000", "--init_from=resume", check=False)
        assert_one_line_error(second, f"{out} is in use by another run (process {first.pid})", "--out_dir")
    finally:
        first.kill()
        first.wait()
    leftover = os.path.join(out, "ckpt.pt.tmp999999")
    with open(leftover, "wb") as f:
        f.write(b"half a checkpoint")
    run("train.py", *args, "--max_iters=2", "--init_from=resume")  # the killed run's lock does not block
    assert not os.path.exists(leftover)


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(char_data, tmp_path):
    out = str(tmp_path / "out")
    common = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--eval_interval=2"]
    run("train.py", *common, "--max_iters=4")
    ckpt = os.path.join(out, "ckpt.pt")
    good = open(ckpt, "rb").read()
    # continue at an absurd learning rate: the weights blow up and the loss stops being finite
    proc = run("train.py", *common, "--max_iters=200", "--init_from=resume", "--learning_rate=1e30",
               "--grad_clip=0.0", "--decay_lr=False", check=False)
    assert_one_line_error(proc, "loss is", "at iteration 5", "last good checkpoint")
    assert open(ckpt, "rb").read() == good  # the checkpoint from iteration 4 is untouched
    from nanoforge.checkpoint import load_checkpoint
    assert load_checkpoint(ckpt)["meta"]["iter_num"] == 4


# ---------------------------------------------------------------------------------------------------
# bad input: one line that says what to do, exit status 2

def test_error_missing_dataset(tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_line_error(proc, "meta.json not found", "prepare.py")


def test_error_dataset_shorter_than_block(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "input.txt").write_text("To be, or not to be: that is the question.\n" * 3)
    run("data/shakespeare_char/prepare.py", f"--input={d / 'input.txt'}", f"--out_dir={d}")
    proc = run("train.py", *TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_line_error(proc, "fewer than block_size")


@pytest.mark.slow
def test_error_config_typo_key_and_value(char_data, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={char_data}", "--batch_sise=4", check=False)
    assert_one_line_error(proc, "batch_sise", "did you mean 'batch_size'")
    proc = run("train.py", *TINY, f"--data_dir={char_data}", "--max_iters=ten", check=False)
    assert_one_line_error(proc, "max_iters", "expects int")
    cfg = tmp_path / "cfg.py"
    cfg.write_text("learning_rat = 1e-3\n")
    proc = run("train.py", str(cfg), check=False)
    assert_one_line_error(proc, "learning_rat", "learning_rate")


def test_error_unknown_device(char_data, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'o'}", "--device=gpu", check=False)
    assert_one_line_error(proc, "unknown device 'gpu'")


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained") / "out")
    run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2")
    return out


def test_error_out_dir_holds_another_run(char_data, trained):
    before = os.path.getmtime(os.path.join(trained, "ckpt.pt"))
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={trained}", "--max_iters=4", check=False)
    assert_one_line_error(proc, "already holds", "--init_from=resume")
    assert os.path.getmtime(os.path.join(trained, "ckpt.pt")) == before  # nothing overwritten


def test_error_resume_with_another_shape(char_data, trained):
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={trained}", "--max_iters=6",
               "--init_from=resume", "--n_layer=3", check=False)
    assert_one_line_error(proc, "n_layer=2 there, 3 here")


def test_error_resume_with_another_vocabulary(trained, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "input.txt").write_text("abcdefghij" * 2000)  # a 10-character vocabulary
    run("data/shakespeare_char/prepare.py", f"--input={d / 'input.txt'}", f"--out_dir={d}")
    proc = run("train.py", *TINY, f"--data_dir={d}", f"--out_dir={trained}", "--max_iters=6",
               "--init_from=resume", check=False)
    assert_one_line_error(proc, "vocab_size")


def test_error_truncated_checkpoint(char_data, trained, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    ckpt = broken / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={broken}", "--max_iters=6",
               "--init_from=resume", check=False)
    assert_one_line_error(proc, "truncated or corrupt")
    proc = run("sample.py", f"--out_dir={broken}", "--device=cpu", check=False)
    assert_one_line_error(proc, "truncated or corrupt")


def test_error_corrupt_token_file(char_data, tmp_path):
    import shutil
    d = tmp_path / "d"
    shutil.copytree(char_data, d)
    train_bin = d / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:-7])
    proc = run("train.py", *TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_line_error(proc, "truncated or corrupt", "prepare.py")


def test_error_corrupt_meta_or_a_3_byte_token_file_names_a_script_that_exists(char_data, tmp_path):
    import shutil
    d = tmp_path / "trunc_val"  # no data/trunc_val/prepare.py exists: the hint must not invent one
    shutil.copytree(char_data, d)
    (d / "val.bin").write_bytes(b"abc")
    proc = run("train.py", *TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_line_error(proc, "val.bin", "data/shakespeare_char/prepare.py")
    assert "trunc_val/prepare.py" not in proc.stderr
    (d / "meta.json").write_text('{"vocab_size": 65, "tokeni')
    proc = run("train.py", *TINY, f"--data_dir={d}", f"--out_dir={tmp_path / 'o'}", check=False)
    assert_one_line_error(proc, "meta.json is not valid JSON")


@pytest.mark.parametrize("bad,fragment", [
    ("--n_layer=0", "'n_layer' expects an int >= 1; got 0"),
    ("--n_layer=-1", "'n_layer' expects an int >= 1; got -1"),
    ("--batch_size=0", "'batch_size' expects an int >= 1; got 0"),
    ("--learning_rate=-1", "'learning_rate' expects a number > 0; got -1.0"),
    ("--dropout=1.5", "'dropout' expects a number in [0, 1); got 1.5"),
    ("--n_head=5", "n_embd=32 must split into n_head=5 heads"),
])
def test_error_knob_out_of_range(char_data, tmp_path, bad, fragment):
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'o'}", bad, check=False)
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(tmp_path / "o")  # checked before anything ran


def test_a_step_no_machine_can_hold_is_refused_before_it_runs(char_data, tmp_path):
    # estimated at petabytes: refused in one line with the estimate and what to lower, before any step
    # allocates (it used to warn, then thrash the machine for minutes); nothing is left behind
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'o'}", "--block_size=16000",
            "--batch_size=100000", "--dtype=float32"]
    proc = run("train.py", *args, check=False)
    assert_one_line_error(proc, "a step of 100000 x 16000 tokens is estimated to need", "lower batch_size or block_size",
                          "memory_check=False")
    assert not os.path.exists(tmp_path / "o")


def test_error_prompt_outside_vocabulary(trained):
    proc = run("sample.py", f"--out_dir={trained}", "--start=Ωmega", "--device=cpu", check=False)
    assert_one_line_error(proc, "not in this model's vocabulary", "Ω")


def test_error_sample_from_missing_out_dir(tmp_path):
    proc = run("sample.py", f"--out_dir={tmp_path / 'never-trained'}", "--device=cpu", check=False)
    assert_one_line_error(proc, "nothing at", "never-trained", "out_dir holding ckpt.pt")


def test_sample_prompt_from_file(trained, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:")
    proc = run("sample.py", f"--out_dir={trained}", f"--start=FILE:{prompt}", "--num_samples=1",
               "--max_new_tokens=5", "--device=cpu")
    assert proc.stdout.startswith("KING:")
    proc = run("sample.py", f"--out_dir={trained}", f"--start=FILE:{tmp_path / 'missing.txt'}", check=False)
    assert_one_line_error(proc, "cannot read the prompt file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("KING: caf\u00e9".encode("latin-1"))
    proc = run("sample.py", f"--out_dir={trained}", f"--start=FILE:{latin1}", check=False)
    assert_one_line_error(proc, f"the prompt file {latin1} is not UTF-8 text (byte 9 is 0xe9)", "iconv")


# ---------------------------------------------------------------------------------------------------
# GPT-2 weights from a local Hugging Face folder (what the hub download gives, made offline here)

@pytest.fixture(scope="module")
def hf_gpt2_full_vocab(tmp_path_factory):
    """A tiny random GPT-2 with GPT-2's real vocabulary, so the GPT-2 BPE's ids fit it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128)).eval()
    folder = tmp_path_factory.mktemp("hf_gpt2_full")
    hf.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_sample_from_hf_folder(hf_gpt2_full_vocab):
    proc = run("sample.py", f"--init_from={hf_gpt2_full_vocab}", "--start=Hello world", "--num_samples=1",
               "--max_new_tokens=20", "--device=cpu", "--stop_at_eot=False")
    assert proc.stdout.startswith("Hello world") and proc.stdout.endswith("---------------\n")
    cached = proc.stdout
    proc = run("sample.py", f"--init_from={hf_gpt2_full_vocab}", "--start=Hello world", "--num_samples=1",
               "--max_new_tokens=20", "--device=cpu", "--stop_at_eot=False", "--use_kv_cache=False")
    assert proc.stdout == cached


@pytest.mark.slow
def test_gpt2_eval_commands_from_hf_folder(hf_gpt2_full_vocab, tmp_path):
    # the README's commands for GPT-2's own held-out loss (they replaced one config file per GPT-2 size), with a
    # local save_pretrained folder for the hub name and a small GPT-2 BPE dataset for openwebtext's
    d = tmp_path / "d"
    d.mkdir()
    with open(SHAKESPEARE, encoding="utf-8") as f:
        (d / "input.txt").write_text(f.read()[:50_000], encoding="utf-8")
    run("data/shakespeare/prepare.py", f"--input={d / 'input.txt'}", f"--out_dir={d}")
    # python evaluate.py --init_from=gpt2 --dataset=openwebtext --out_dir=eval-gpt2
    run("evaluate.py", f"--init_from={hf_gpt2_full_vocab}", "--dataset=openwebtext", f"--out_dir={tmp_path / 'ev'}",
        f"--data_dir={d}", "--block_size=64", "--device=cpu")
    whole = json.loads((tmp_path / "ev" / "eval.jsonl").read_text().splitlines()[-1])
    # python train.py --init_from=gpt2 --eval_only=True --dataset=openwebtext --batch_size=8 --eval_iters=500
    #     --out_dir=out-eval-gpt2   (the deleted files' exact settings: 500 x 8 fixed windows a split)
    run("train.py", f"--init_from={hf_gpt2_full_vocab}", "--eval_only=True", "--dataset=openwebtext",
        "--batch_size=8", "--eval_iters=2", f"--out_dir={tmp_path / 'tr'}", f"--data_dir={d}", "--block_size=64",
        "--device=cpu", "--compile=False")
    log = read_log(tmp_path / "tr")
    assert len(log) == 1 and log[0]["iter"] == 0 and not os.path.exists(tmp_path / "tr" / "ckpt.pt")  # no training
    # a random GPT-2 predicts about uniformly over its 50,257 tokens, by either count
    for loss in (log[0]["val_loss"], whole["loss"]):
        assert abs(loss - math.log(50257)) < 0.05, (loss, whole)


@pytest.mark.slow
def test_finetune_from_hf_folder(hf_gpt2_full_vocab, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with open(SHAKESPEARE, encoding="utf-8") as f:
        (d / "input.txt").write_text(f.read()[:50_000], encoding="utf-8")
    run("data/shakespeare/prepare.py", f"--input={d / 'input.txt'}", f"--out_dir={d}")
    out = str(tmp_path / "ft")
    run("train.py", "config/train_shakespeare_from_gpt2.py", f"--init_from={hf_gpt2_full_vocab}", f"--data_dir={d}",
        f"--out_dir={out}", "--block_size=64", "--gradient_accumulation_steps=2", "--batch_size=4",
        "--max_iters=6", "--eval_interval=3", "--eval_iters=2", "--learning_rate=1e-3", "--device=cpu",
        "--compile=False")
    evals = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    from nanoforge.checkpoint import load_checkpoint
    meta = load_checkpoint(os.path.join(out, "ckpt.pt"))["meta"]
    assert meta["model_args"]["block_size"] == 64 and meta["tokenizer"] == {"kind": "gpt2"}
    # the fine-tuned checkpoint samples through the same loader, decoding with GPT-2's BPE
    proc = run("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=8",
               "--device=cpu", "--stop_at_eot=False")
    assert proc.stdout.startswith("ROMEO:")


def test_wandb_logging_records_the_run_offline(char_data, tmp_path):
    """wandb_log=True with WANDB_MODE=offline (no account, no network): the run's config and the same
    records as log.jsonl go into wandb's local run folder, ready for `wandb sync`."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'o'}", "--max_iters=2",
        "--eval_interval=2", "--wandb_log=True", "--wandb_run_name=tiny-run", env=env)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(tmp_path)
    with open(runs[0], "rb") as f:
        data = f.read()
    for logged in (b"val_loss", b"tokens_per_s", b"tiny-run", b"n_embd"):  # metrics, the run's name, its config
        assert logged in data, logged


@pytest.mark.slow
def test_compiled_run_saves_plain_weights_and_resumes_eager(char_data, tmp_path):
    out = str(tmp_path / "out")
    common = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--eval_interval=2"]
    run("train.py", *common, "--max_iters=2", "--compile=True")
    from nanoforge.checkpoint import load_checkpoint
    keys = load_checkpoint(os.path.join(out, "ckpt.pt"))["model"].keys()
    assert not [k for k in keys if k.startswith(("_orig_mod.", "module."))]
    run("train.py", *common, "--max_iters=4", "--init_from=resume", "--compile=False")
    assert sorted(train_losses(out)) == [0, 1, 2, 3]


@pytest.mark.slow
def test_compile_without_a_cpp_compiler_trains_eager(char_data, tmp_path):
    # a fresh laptop has no g++: torch.compile fails at its first call; the run says so in one line and
    # trains eager, with the same losses as a run that never tried
    common = [*TINY, f"--data_dir={char_data}", "--max_iters=3", "--eval_interval=3"]
    env = {**os.environ, "CXX": "/nonexistent/g++"}
    proc = run("train.py", *common, f"--out_dir={tmp_path / 'a'}", "--compile=True", env=env)
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stdout.splitlines() if "torch.compile failed" in line]
    assert len(failed) == 1 and "training eager instead" in failed[0]
    run("train.py", *common, f"--out_dir={tmp_path / 'b'}", "--compile=False")
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_bf16_where_it_is_emulated_runs_and_says_how_slow(char_data, tmp_path):
    # ONEDNN_MAX_CPU_ISA=AVX2 makes this CPU, whatever it is, one without native bf16 (the Zen 3 class):
    # an explicit --dtype=bfloat16 still runs, and its dtype line gives the measured slowdown
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1",
               "--dtype=bfloat16", env=env)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("device: "))
    assert "dtype: bfloat16 (as configured, but" in line and "x slower than fp32" in line, line
    assert "bf16 emulated" in line and "--dtype=auto picks float32" in line
    assert "MFU against 0.00" not in proc.stdout and "GFLOP/s (measured bfloat16" in proc.stdout


def test_loading_the_sprint_recipe_measures_nothing(monkeypatch):
    # a config is read, never run against the machine: its fp32 shape waits for train.py's resolved dtype
    from configurator import configure, script_defaults
    from nanoforge import hardware

    def probe(*args, **kwargs):
        raise AssertionError("loading a config measured the machine")
    monkeypatch.setattr(hardware, "resolve_dtype", probe)
    monkeypatch.setattr(hardware, "measure_matmul_flops", probe)
    c = configure(script_defaults(os.path.join(ROOT, "train.py")),
                  [os.path.join(ROOT, "config", "train_shakespeare_char_cpu_sprint.py")])
    assert (c["n_layer"], c["time_budget"], c["dtype"]) == (3, 17.0, "auto")
    assert c["float32_overrides"] == "--n_layer=2 --time_budget=20.0"


@pytest.mark.slow
@pytest.mark.parametrize("isa_cap, args, expected", [
    ("", [], None),  # this machine, whichever class it is: the shape agrees with its precision
    ("AVX2", [], (2, 20.0, "float32")),  # bf16 emulated (oneDNN's cap): dtype auto picks fp32
    ("", ["--dtype=float32"], (2, 20.0, "float32")),
    ("", ["--dtype=float32", "--n_layer=4"], (4, 20.0, "float32")),  # the command line still wins
    ("", ["--dtype=bfloat16"], (3, 17.0, "bfloat16"))])
def test_sprint_recipe_picks_its_shape_by_the_runs_precision(char_data, tmp_path, isa_cap, args, expected):
    # where training runs in fp32 (bf16 emulated), the sprint trains 2 layers for 20 s; in bf16, 3 layers
    # for 17 s: train.py applies the recipe's float32_overrides once dtype is resolved, and says so
    from nanoforge.checkpoint import load_checkpoint
    out = tmp_path / "out"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa_cap} if isa_cap else None
    proc = run("train.py", "config/train_shakespeare_char_cpu_sprint.py", f"--data_dir={char_data}",
               f"--out_dir={out}", "--max_iters=1", "--eval_iters=1", "--plot=False", *args,
               env=env)
    cfg = json.load(open(out / "run.json"))["config"]
    got = (cfg["n_layer"], cfg["time_budget"], "bfloat16" if "dtype: bfloat16" in proc.stdout else "float32")
    if expected is None:
        expected = (3, 17.0, "bfloat16") if got[2] == "bfloat16" else (2, 20.0, "float32")
    assert got == expected, proc.stdout
    assert ("float32_overrides apply" in proc.stdout) == (expected[2] == "float32")
    assert load_checkpoint(str(out / "ckpt.pt"))["meta"]["model_args"]["n_layer"] == expected[0]


def test_evaluations_take_a_bounded_share_of_a_short_run():
    """A 60 s BPE run once spent 3x its training on its fixed evaluation set: the set shrinks (in whole
    batches) until the run's evaluations take at most a third of its compute, and a run long enough
    keeps eval_iters as asked."""
    from nanoforge.training import EVAL_SHARE, eval_windows
    # GPT-2 124M on OpenWebText (config/train_gpt2.py): 200 x 12 windows every 1000 of 600,000 iterations
    windows, line = eval_windows(200, 12, 1024, 1000, 600_000, 40 * 12 * 1024)
    assert windows == 200 * 12 and "capped" not in line and "~0% of the run" in line
    # a short run: 100 iterations of 12 x 1024 tokens with two evaluations of 200 x 12 windows each
    windows, line = eval_windows(200, 12, 1024, 2000, 100, 12 * 1024)
    assert 0 < windows < 200 * 12 and windows % 12 == 0 and "capped" in line
    scored = 2 * 2 * windows * 1024
    assert scored / (3 * 100 * 12 * 1024 + scored) <= EVAL_SHARE
    windows, line = eval_windows(200, 12, 1024, 2000, 1, 12 * 1024)
    assert windows == 12  # never below one batch
    # where even one batch is over the share the line says so: no "at most 33%" beside a bigger figure
    assert "capped to 1, the fewest, still over the 33% aimed at" in line and "at most" not in line
