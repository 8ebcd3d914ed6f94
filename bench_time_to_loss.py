"""
Time to a target val loss: whole train.py runs of several configs, over seeds, and how much faster each
reaches the target than the first (the baseline). By default nanoGPT's CPU recipe against the sprint.

    python bench_time_to_loss.py          # time to val loss 1.886: nanoGPT's CPU recipe vs the sprint, 3 seeds
    python bench_time_to_loss.py --target_loss=1.55 --runs="nanogpt: config/train_shakespeare_char_nanogpt.py \
        --time_budget=300 --lr_clock=time --max_iters=1000000 --eval_interval=1000; \
        ours: config/train_shakespeare_char_cpu.py"                                      # 5 minutes each
    python bench_time_to_loss.py --seeds=1 --extra="--max_iters=600" --json_out=ttl.json   # results as JSON

The runs go one after the other: each config of `runs` once per seed, alternating, so all see the same
machine. Every run scores the whole val split at each of its evaluations (--eval_whole_val=True), and
reports the training time (evaluations excluded) at its first evaluation at or below target_loss, its
last val loss, tokens/s over the whole run (compilation included) and per step (the median logged step:
steady-state speed), and median MFU; then min/median/max per config and the ratios to the baseline,
seed by seed. The machine line comes first: a time means nothing without the machine it came from.
"""
import os
import statistics
import subprocess
import sys

from configurator import configure, knobs, overrides
from nanoforge import errors, files, hardware, runlog

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
runs = "nanogpt: config/train_shakespeare_char_nanogpt.py; ours: config/train_shakespeare_char_cpu_sprint.py"
# 'name: train.py config [--overrides]' runs separated by ';', the baseline first
target_loss = 1.886  # val loss (nats/char on shakespeare_char) whose first crossing is timed
seeds = 3  # seeds 1337, 1338, ...
extra = ""  # overrides given to every run, e.g. '--time_budget=300 --lr_clock=time'
out_dir = "out-bench-ttl"  # the runs' out_dirs go here; must not exist yet
device = "auto"  # the machine line's device; the runs pick theirs as train.py does, from their configs
json_out = ""  # a path: also write the results there as JSON
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
config = configure(defaults, sys.argv[1:])
globals().update(config)
print(f"overrides: {overrides(defaults, config) or 'none'}")

commands = {}  # name -> train.py arguments
for spec in filter(str.strip, runs.split(";")):
    name, sep, args = spec.partition(":")
    if not sep or not args.split():
        raise errors.UserError(f"runs: {spec.strip()!r} is not 'name: config.py [--key=value ...]'")
    commands[name.strip()] = args.split() + extra.split()
if seeds < 1:
    raise errors.UserError(f"seeds must be >= 1, got {seeds}")
if os.path.exists(out_dir):  # checked before anything runs
    raise errors.UserError(f"{out_dir} exists (an earlier comparison); remove it or pick another --out_dir")
machine = hardware.machine_line(hardware.resolve_device(device)[0])


def summarise(out):
    """One run's figures, read from its log.jsonl and run.json."""
    records = runlog.read_log(out)
    tokens_per_iter = runlog.read_run_json(out)["derived"]["tokens_per_iter"]
    evals = runlog.evaluations(records)
    hit = next((r for r in evals if r["val_loss"] <= target_loss), None)
    last = evals[-1]
    return {"time_to_target": hit["train_time"] if hit else None,
            "tokens_to_target": hit["iter"] * tokens_per_iter if hit else None,
            "val_loss": last["val_loss"], "train_time": last["train_time"], "iters": last["iter"],
            "tokens_per_s": last["iter"] * tokens_per_iter / max(last["train_time"], 1e-9),
            # steady state: the median logged step, so compilation (in the first step) is left out
            "step_tokens_per_s": statistics.median([r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
                                                   or [float("nan")]),
            "mfu": statistics.median([r["mfu"] for r in records if "mfu" in r] or [float("nan")])}


# -----------------------------------------------------------------------------------------------------
# the runs, alternating configs within each seed
train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
results = {name: [] for name in commands}
for seed_i in range(seeds):
    for name, args in commands.items():
        out = os.path.join(out_dir, f"{name}-seed{seed_i}")
        load = hardware.load_average()
        proc = subprocess.run([sys.executable, train_py, *args, f"--seed={1337 + seed_i}", f"--out_dir={out}",
                               "--eval_whole_val=True", "--plot=False"], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: the run {name} (seed {seed_i}) failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        r = summarise(out)
        r["load"] = load
        results[name].append(r)
        ttt = f"{r['time_to_target']:.1f}s" if r["time_to_target"] is not None else "not reached"
        print(f"{name} seed {seed_i}: time to {target_loss} {ttt}; val {r['val_loss']:.4f} after "
              f"{r['train_time']:.1f}s ({r['iters']} iters); {r['tokens_per_s']:,.0f} tok/s over the run, "
              f"{r['step_tokens_per_s']:,.0f} per step (median), MFU {r['mfu'] * 100:.1f}%; load {load}", flush=True)


# -----------------------------------------------------------------------------------------------------
# the summary: median [min-max] over seeds per config, then each config against the baseline
def spread(xs, fmt):
    xs = [x for x in xs if x is not None]
    return f"{fmt(statistics.median(xs))} [{fmt(min(xs))}-{fmt(max(xs))}]" if xs else "not reached"


print(f"\n{'run':<10} {'time to ' + str(target_loss):<30} {'last val loss':<26} {'tokens/s (run)':<26} "
      f"{'tokens/s (step)':<26} MFU")
for name, rs in results.items():
    hits = sum(r["time_to_target"] is not None for r in rs)
    print(f"{name:<10} {spread([r['time_to_target'] for r in rs], '{:.1f}s'.format) + f' ({hits}/{len(rs)})':<30} "
          f"{spread([r['val_loss'] for r in rs], '{:.4f}'.format):<26} "
          f"{spread([r['tokens_per_s'] for r in rs], '{:,.0f}'.format):<26} "
          f"{spread([r['step_tokens_per_s'] for r in rs], '{:,.0f}'.format):<26} "
          f"{spread([r['mfu'] * 100 for r in rs], '{:.1f}%'.format)}")
base_name, base = next(iter(results.items()))
ratios = {}
for name, rs in list(results.items())[1:]:
    speed = [b["time_to_target"] / r["time_to_target"] for b, r in zip(base, rs)
             if b["time_to_target"] and r["time_to_target"]]
    # where the baseline never got there, its whole training time bounds the ratio from below
    at_least = [b["train_time"] / r["time_to_target"] for b, r in zip(base, rs)
                if not b["time_to_target"] and r["time_to_target"]]
    tok = [r["tokens_per_s"] / b["tokens_per_s"] for b, r in zip(base, rs)]
    step_tok = [r["step_tokens_per_s"] / b["step_tokens_per_s"] for b, r in zip(base, rs)]
    ratios[name] = {"time_to_target": speed, "time_to_target_at_least": at_least, "tokens_per_s": tok,
                    "step_tokens_per_s": step_tok}
    if at_least:
        print(f"{name} vs {base_name}: reaches {target_loss} at least {spread(at_least, '{:.2f}x'.format)} faster "
              f"in the {len(at_least)} seed(s) where {base_name} did not reach it at all (its whole run's time / ours)")
    # the time ratio only where both runs of a seed got there; else that line would read "not reached faster"
    reached = f"reaches {target_loss} {spread(speed, '{:.2f}x'.format)} faster; " if speed else ""
    print(f"{name} vs {base_name}: {reached}tokens/s {spread(tok, '{:.2f}x'.format)} over the run, "
          f"{spread(step_tok, '{:.2f}x'.format)} per step (median [min-max] over seeds)")
if json_out:
    files.write_json(json_out, {"config": config, "machine": machine, "runs": commands, "results": results,
                                "ratios": ratios})
    print(f"wrote {json_out}")
