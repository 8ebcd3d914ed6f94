"""
bench_time_to_loss.py end to end: two tiny train.py configs over two seeds, timed to a loss one of them
reaches, and a second comparison into the same folder refused. Times depend on the machine, so these
assert what is reported and how it follows from the runs' own logs, never how fast.
"""
import json
import statistics

import pytest

from conftest import assert_one_line_error, machine_of, run  # noqa: E402


def run_ttl(*args):
    return run("bench_time_to_loss.py", *args, check=False, timeout=600)


@pytest.mark.slow
def test_time_to_loss_times_each_run_to_the_target_and_compares(char_data, tmp_path):
    shape = (f"config/train_shakespeare_char_nanogpt.py --data_dir={char_data} --n_layer=1 --n_head=2 --n_embd=32 "
             "--block_size=32 --max_iters=24 --eval_interval=6 --eval_iters=2 --log_interval=1 --warmup_iters=2 "
             "--lr_decay_iters=24")
    out, out_json = tmp_path / "ttl", tmp_path / "ttl.json"
    args = [f"--runs=slow: {shape} --learning_rate=1e-3; fast: {shape} --learning_rate=1e-2",
            "--target_loss=3.4", "--seeds=2", f"--out_dir={out}", f"--json_out={out_json}"]
    r = run_ttl(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert machine_of(r.stdout, json.loads(out_json.read_text()))["memory_gb_s"] > 0
    results = json.loads(out_json.read_text())["results"]
    assert set(results) == {"slow", "fast"} and all(len(v) == 2 for v in results.values())
    for name, runs in results.items():
        for seed, res in enumerate(runs):
            with open(out / f"{name}-seed{seed}" / "log.jsonl") as f:
                evals = [json.loads(line) for line in f if "val_loss" in line]
            assert [e["iter"] for e in evals] == [0, 6, 12, 18, 24]
            hit = next((e for e in evals if e["val_loss"] <= 3.4), None)
            assert res["time_to_target"] == (hit["train_time"] if hit else None)
            assert res["val_loss"] == evals[-1]["val_loss"] and res["iters"] == 24
            assert res["tokens_per_s"] == pytest.approx(24 * 12 * 32 / evals[-1]["train_time"])
            with open(out / f"{name}-seed{seed}" / "log.jsonl") as f:
                steps = [json.loads(line)["tokens_per_s"] for line in f if '"tokens_per_s"' in line]
            assert res["step_tokens_per_s"] == statistics.median(steps[1:])  # step 0 (compiling, warming up) left out
    assert all(r["time_to_target"] is not None for r in results["fast"])  # lr 1e-2 gets there in 24 steps
    assert all(r["time_to_target"] is None for r in results["slow"])  # lr 1e-3 does not
    assert "fast vs slow" in r.stdout and "tokens/s" in r.stdout
    # slow never got there: its whole training time over fast's time to the target bounds the speedup
    ratios = json.loads(out_json.read_text())["ratios"]["fast"]
    assert ratios["time_to_target"] == []
    assert ratios["time_to_target_at_least"] == pytest.approx(
        [s["train_time"] / f["time_to_target"] for s, f in zip(results["slow"], results["fast"])])
    assert "at least" in r.stdout
    assert "not reached faster" not in r.stdout  # no time ratio is claimed where no seed had one
    # the runs are kept; a second comparison into the same folder is refused
    again = run_ttl(*args)
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert "machine:" not in again.stdout  # refused before anything runs


def test_time_to_loss_bad_runs_is_one_line_error(tmp_path):
    r = run_ttl("--runs=just-a-name", f"--out_dir={tmp_path / 'ttl'}")
    assert_one_line_error(r, "runs", "name: config.py")
    assert "machine:" not in r.stdout  # refused before anything runs
