"""
The record of a run, in its out_dir, with one writer and one reader for every script:
- run.json, written at the start: the config, the values derived from it, the machine and the data;
- log.jsonl, one JSON object a line, appended as the run goes: a training step has `loss` (iter, loss,
  lr, ms, tokens_per_s, mfu, train_time), an evaluation has `val_loss` (iter, val_loss, val_bpb,
  train_eval_loss, train_time);
- loss.png, the curve drawn from log.jsonl at the end.
"""
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

from nanoforge import hardware
from nanoforge.files import REPO, atomic_path, write_json


def run_info(device):
    """Git revision and environment, written beside every run's checkpoints."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    info = {
        "git_revision": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": hardware.cpu_info(),
        "device": device,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_run_json(out_dir, config, derived, data, device):
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "run.json"),
               {"config": config, "derived": derived, "run": run_info(device), "data": data})


def read_run_json(out_dir):
    with open(os.path.join(out_dir, "run.json")) as f:
        return json.load(f)


def log_path(out_dir):
    return os.path.join(out_dir, "log.jsonl")


def read_log(out_dir):
    """The records of out_dir's log.jsonl ([] if there is none yet). Only complete lines: a run still
    writing its last line (a sweep watches its trials this way) shows it at the next read."""
    path = log_path(out_dir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().split("\n")[:-1] if line.strip()]


def evaluations(records):
    return [r for r in records if "val_loss" in r]


class RunLog:
    """Appends records to out_dir/log.jsonl (and to wandb, given its run). A fresh run starts an empty log
    (`resume_iter=None`); a resumed run rewrites history from its checkpoint on, so the log keeps what came
    before iteration `resume_iter` and that iteration's evaluation, and drops what the stopped run logged
    after its checkpoint. `keep=True` appends to the log as it is (finetune.py's --eval_only)."""

    def __init__(self, out_dir, resume_iter=None, keep=False, wandb_run=None):
        os.makedirs(out_dir, exist_ok=True)
        self.wandb_run = wandb_run
        if not keep:
            kept = []
            if resume_iter is not None:
                kept = [r for r in read_log(out_dir)
                        if r["iter"] < resume_iter or ("val_loss" in r and r["iter"] == resume_iter)]
            with atomic_path(log_path(out_dir)) as tmp:
                with open(tmp, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(log_path(out_dir), "a")

    def record(self, entry):
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(entry, step=entry["iter"])

    def close(self):
        self.file.close()


def plot_losses(out_dir):
    """Draws out_dir/loss.png from its log: each training step's batch loss and each evaluation's val loss.
    Returns the path."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    records = read_log(out_dir)
    train = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    val = [(r["iter"], r["val_loss"]) for r in evaluations(records)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train (batch)")
    if val:
        ax.plot(*zip(*val), "o-", label="val (fixed set)")
    ax.set(xlabel="iteration", ylabel="loss (nats/token)", title=out_dir)
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
