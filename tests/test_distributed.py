"""
Many processes on one CPU (gloo, fp32), launched as a user launches them (torchrun): a single process,
DDP, FSDP and a 2-"node" run give the same losses; sharded checkpoints resume exactly, also on another
number of ranks, and consolidate into an ordinary checkpoint; a rank that dies or hangs takes the run
down within a bounded time. Each torchrun launch costs seconds, so the runs are shared by the tests.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from nanoforge import checkpoint, parallel
from conftest import ROOT, TINY, read_log, run, train_losses

COMMON = [*TINY, "--max_iters=6", "--eval_interval=3", "--gradient_accumulation_steps=4"]


def torchrun(*args, nproc=2, node=None, check=True, timeout=300):
    """train.py under torchrun: one node with nproc processes, or one of two "nodes" meeting at a c10d
    rendezvous on localhost (node = port)."""
    where = ["--standalone"] if node is None else ["--nnodes=2", "--rdzv_backend=c10d",
                                                   f"--rdzv_endpoint=localhost:{node}", "--rdzv_id=test"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "train.py"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    if not check:
        return proc
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    return out


def assert_same(a, b, what):
    assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
    for k in a:
        assert abs(a[k] - b[k]) < 1e-5, (what, k, a[k], b[k])


def val_losses(out_dir):
    return {r["iter"]: r["val_loss"] for r in read_log(out_dir) if "val_loss" in r}


@pytest.fixture(scope="module")
def one(char_data, tmp_path_factory):
    """The reference: a single process, 6 iterations, evaluated at 0, 3 and 6."""
    out = str(tmp_path_factory.mktemp("one"))
    os.rmdir(out)
    run("train.py", *COMMON, f"--data_dir={char_data}", f"--out_dir={out}")
    return out


@pytest.mark.slow
def test_ddp_and_two_nodes_equal_one_process(char_data, one, tmp_path):
    ddp, nodes = str(tmp_path / "ddp"), str(tmp_path / "nodes")
    torchrun(*COMMON, f"--data_dir={char_data}", f"--out_dir={ddp}")
    # two torchrun invocations of one process each, as on two machines, meeting at a free port
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [torchrun(*COMMON, f"--data_dir={char_data}", f"--out_dir={nodes}", nproc=1, node=port, check=False)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_same(train_losses(one), train_losses(ddp), "ddp")
    assert_same(train_losses(ddp), train_losses(nodes), "2 nodes")
    assert_same(val_losses(one), val_losses(ddp), "ddp val")
    assert_same(val_losses(ddp), val_losses(nodes), "2 nodes val")


@pytest.mark.slow
def test_fsdp_equals_one_process_and_resumes_sharded_on_another_world_size(char_data, one, tmp_path):
    two, other = str(tmp_path / "two"), str(tmp_path / "other")
    fsdp = [*COMMON, f"--data_dir={char_data}", "--fsdp=True", "--gradient_checkpointing=True"]
    # 2 ranks stop at iteration 3 with a sharded checkpoint; resume on 2 ranks and, from a copy, on 1
    torchrun(*fsdp, f"--out_dir={two}", "--max_iters=3")
    assert os.listdir(os.path.join(two, "ckpt_sharded")) and not os.path.exists(os.path.join(two, "ckpt_sharded.tmp"))
    subprocess.run(["cp", "-r", two, other], check=True)
    torchrun(*fsdp, f"--out_dir={two}", "--init_from=resume")
    torchrun(*fsdp, f"--out_dir={other}", "--init_from=resume", nproc=1)
    for out_dir in (two, other):
        assert_same(train_losses(one), train_losses(out_dir), out_dir)
        assert_same(val_losses(one), val_losses(out_dir), out_dir)
    # the run ends with an ordinary checkpoint: the same weights as the single process's, tied ones too
    ref = checkpoint.load_checkpoint(checkpoint.ckpt_path(one))["model"]
    got = checkpoint.load_checkpoint(checkpoint.ckpt_path(two))
    assert sorted(got["model"]) == sorted(ref) and got["meta"]["iter_num"] == 6
    assert all(torch.allclose(got["model"][k], ref[k], atol=1e-5) for k in ref)
    model, _, _ = checkpoint.load_model(two)
    assert model.transformer.wte.weight is model.lm_head.weight
    # the consolidate command gives the same file's weights; sample.py reads it
    out_path = str(tmp_path / "consolidated.pt")
    run("consolidate.py", two, f"--out={out_path}")
    again = checkpoint.load_checkpoint(out_path)["model"]
    assert all(torch.equal(again[k], got["model"][k]) for k in again)
    sample = run("sample.py", f"--out_dir={two}", "--start=ROMEO:", "--max_new_tokens=20", "--num_samples=1",
                 "--device=cpu")
    assert sample.stdout.startswith("ROMEO:")
    os.remove(checkpoint.ckpt_path(other))  # a run left with only its sharded checkpoint says what to do
    proc = run("sample.py", f"--out_dir={other}", "--device=cpu", check=False)
    assert proc.returncode == 2 and f"python consolidate.py {other}" in proc.stderr, proc.stderr


def worker_pid(launcher_pid, rank):
    """The pid of the torchrun worker with this RANK, found through /proc."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for d in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if ppid == launcher_pid and f"RANK={rank}".encode() in env:
                return int(d)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank}")


def start_and_wait(char_data, out_dir):
    proc = torchrun(*TINY, f"--data_dir={char_data}", f"--out_dir={out_dir}", "--max_iters=100000",
                    "--eval_interval=100000", "--fsdp=True", "--dist_timeout=5", "--gradient_accumulation_steps=2",
                    check=False)
    log_path = os.path.join(out_dir, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log_path) and len(read_log(out_dir)) >= 3):
        time.sleep(0.2)
    return proc, worker_pid(proc.pid, 1)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_a_rank_that_dies_or_hangs_ends_the_run(char_data, tmp_path):
    # killed: its peers lose the connection, torchrun stops the rest and names the dead rank
    proc, victim = start_and_wait(char_data, str(tmp_path / "killed"))
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert f"Signal 9 (SIGKILL) received by PID {victim}" in err, err[-3000:]
    # hung (stopped): rank 0's collective times out after dist_timeout with a one-line reason
    proc, victim = start_and_wait(char_data, str(tmp_path / "hung"))
    rank0 = worker_pid(proc.pid, 0)
    t0 = time.time()
    os.kill(victim, signal.SIGSTOP)
    while os.path.exists(f"/proc/{rank0}") and time.time() - t0 < 120:
        time.sleep(0.2)
    waited = time.time() - t0
    os.kill(victim, signal.SIGCONT)  # let torchrun's SIGTERM reach it, rather than wait out its grace period
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and 5 <= waited < 60, waited
    assert "error: rank 0 lost contact with the other ranks" in err, err[-3000:]


@pytest.mark.slow
def test_fsdp_errors_say_how_to_launch_and_resume(char_data, one, tmp_path):
    proc = run("train.py", *TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'x'}", "--fsdp=True", check=False)
    assert proc.returncode == 2 and "error: fsdp=True shards over torchrun's processes" in proc.stderr
    proc = run("train.py", *COMMON, f"--data_dir={char_data}", f"--out_dir={one}", "--max_iters=9",
               "--init_from=resume", "--fsdp=True", check=False)
    assert proc.returncode == 2 and "error: fsdp=True shards" in proc.stderr  # checked before the checkpoint
    proc = run("consolidate.py", one, check=False)
    assert proc.returncode == 2 and "error: no sharded checkpoint in" in proc.stderr


def test_every_rank_takes_rank_0s_measured_choices(tmp_path):
    """The dtype and compile choices are measured on each rank; the ranks must not act on different
    ones (on a loaded machine two ranks once measured differently and scored different losses)."""
    script = tmp_path / "choose.py"
    script.write_text("import os\nimport torch\nfrom nanoforge import parallel\n"
                      "parallel.setup_distributed('gloo', 'cpu')\n"
                      "rank = int(os.environ['RANK'])\n"
                      "took = parallel.rank0_choice(('bfloat16' if rank == 0 else 'float32', rank))\n"
                      f"open(f'{tmp_path}/rank{{rank}}.txt', 'w').write(repr(took))\n"
                      "torch.distributed.destroy_process_group()\n")  # as train.py: gloo can abort at exit otherwise
    run(str(script), launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    # each rank writes its own file: the two ranks share one stdout, where their prints can interleave
    took = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert took == ["('bfloat16', 0)", "('bfloat16', 0)"], took
    assert parallel.rank0_choice(("float32", "one process")) == ("float32", "one process")
