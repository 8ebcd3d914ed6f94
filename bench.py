"""
Speed of a model shape: training throughput (forward + backward) and generation with and without the
KV cache. Random weights and random tokens: how fast a shape runs does not depend on what it learned.

    python bench.py                              # GPT-2-124M shape: a train step, then the KV-cache target
    python bench.py --mode=generate              # the target: cache >= 5x faster at 512 tokens, same tokens
    python bench.py --mode=machine               # only the machine line: CPU, matmul GFLOP/s, memory GB/s
    python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --vocab_size=65 --mode=train
    python bench.py config/bench_shakespeare_char.py --dtype=bfloat16    # the same shape, from a file
    python bench.py --init_from=out-shakespeare-char   # a checkpoint, a save_pretrained folder, or gpt2
    python bench.py --mode=generate --json_out=bench.json                # results as JSON, for the README
    python bench.py --mode=memory --batch_size=8 --repeats=3   # gradient checkpointing: peak memory, step time
    torchrun --standalone --nproc_per_node=2 bench.py --mode=fsdp --block_size=128   # memory per rank; also ddp
    python bench.py --mode=ttl                   # time to val loss 1.886: nanoGPT's CPU recipe vs the sprint, 3 seeds
    python bench.py --mode=serve --vocab_size=50304   # serve.py: tokens/s at 1, 4, 16 streaming clients vs one at a time
    python bench.py --mode=ttl --ttl_target=1.55 --ttl_runs="nanogpt: config/bench_nanogpt_cpu.py --time_budget=300 \
        --lr_clock=time --max_iters=1000000 --eval_interval=1000; ours: config/train_shakespeare_char_cpu.py"   # 5 minutes

--mode=ttl (time to loss) trains whole train.py runs, one after the other: each config of ttl_runs once
per seed, alternating, so all see the same machine. Every run scores the whole val split at each of its
evaluations (--eval_whole_val=True), and reports the training time (evaluations excluded) at its first
evaluation at or below ttl_target, its last val loss, tokens/s over the whole run (compilation included)
and per step (the median logged step: steady-state speed), and median MFU; then min/median/max per
config and the ratios to the first config (the baseline), seed by seed.

--mode=memory runs --mode=train in fresh subprocesses, without and with gradient checkpointing,
alternating (A B A B ...) so both see the same machine load, and reports the median peak memory and
step time of each and their ratios: a process's peak RSS only ever grows, so each variant needs its own.
--mode=fsdp / --mode=ddp (under torchrun) take one AdamW step of batch_size x block_size tokens and report,
per rank, the bytes of parameters, gradients and optimizer state that rank holds, and its peak memory.

--mode=serve starts serve.py (random weights, GPT-2's tokenizer) for each shape of serve_shapes and sends it
the same greedy streaming requests (serve_tokens tokens after a prompt_len-token prompt) twice per level of
serve_clients: one at a time, then all at once; aggregate tokens/s is the completion tokens of all over the
wall time from the first request to the last [DONE]. Together / one at a time is what continuous batching buys.

Every mode first prints the machine line (its figures are in --json_out's "machine" too): the CPU's name
and class (vector unit, native or emulated bf16), its measured fp32 and bf16 matmul GFLOP/s and memory
bandwidth; on CUDA the GPU's name and figures. A speed means nothing without the machine it came from.
Generation reports its cached tokens/s beside the memory-bandwidth bound (each new token reads every
weight once) and prints a progress line every 64 tokens, or every 10 s where they come slower.

Overrides are --key=value, usually the shape keys. Config files are bench.py's own (config/bench_*.py):
train.py's configs carry keys this script does not have, and unknown keys are errors.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import configurator
import model as model_module
from model import GPT, GPTConfig
from nanoforge import errors, files, hardware, parallel, runlog
from nanoforge.checkpoint import load_model, save_checkpoint
from nanoforge.lm_head_loss import chunked_lm_head_loss

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
# defaults: the GPT-2-124M shape generating 512 tokens on CPU, where the KV cache's speed-up is measured
# model shape (ignored with init_from, which brings its own)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50257
bias = True
dropout = 0.0
pos_emb = 'learned'
init_from = None  # None: random weights of the shape above; else an out_dir, ckpt file, HF folder or gpt2 name
# what to measure
mode = 'all'  # 'train' (forward + backward), 'generate' (with vs without KV cache), 'all', 'memory', 'fsdp', 'ddp',
# 'ttl', 'machine' (only the machine line)
gradient_checkpointing = False  # train: recompute block activations in backward (parallel.gradient_checkpointing)
chunked_loss = True  # train: LM head + loss in row chunks (nanoforge/lm_head_loss.py), as train.py; False: plain
repeats = 3  # memory: runs of each variant
batch_size = 1  # train: sequences of block_size tokens per step
warmup_steps = 2  # untimed: the first steps pay for allocation, kernel choice and compilation
timed_steps = 5
gen_tokens = 512  # new tokens per generation
gen_batch = 1
prompt_len = 16
kv_target = 5.0  # the speedup the cache must give (stated for the 124M shape, 512 tokens, on CPU)
# system
device = 'auto'  # auto, cpu, cuda, cuda:N, mps
dtype = 'auto'  # auto, float32, bfloat16, float16
compile = 'auto'  # torch.compile the train step; generation always runs eager (its shapes change per step)
seed = 1337
json_out = ''  # a path: also write the results there as JSON
# time to loss (mode='ttl'): 'name: train.py config [--overrides]' runs separated by ';', the baseline first
ttl_runs = 'nanogpt: config/bench_nanogpt_cpu.py; ours: config/train_shakespeare_char_cpu_sprint.py'
ttl_target = 1.886  # val loss (nats/char on shakespeare_char) whose first crossing is timed
ttl_seeds = 3  # seeds 1337, 1338, ...
ttl_extra = ''  # overrides given to every run, e.g. '--time_budget=300 --lr_clock=time'
ttl_out = 'out-bench-ttl'  # the runs' out_dirs go here; must not exist yet
# serve (mode='serve'): model shapes 'n_layer x n_head x n_embd' (block_size, vocab_size from the keys above)
serve_shapes = '4x4x256,12x12x768'
serve_clients = '1 4 16'  # concurrent streaming clients, space-separated; each level is also run one at a time
serve_tokens = 32  # completion tokens per request
# -----------------------------------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str, type(None)))]
defaults = {k: globals()[k] for k in config_keys}
config = configurator.configure(defaults, sys.argv[1:])
globals().update(config)
print(f"overrides: {configurator.overrides(defaults, config) or 'none'}")

if mode not in ('train', 'generate', 'all', 'memory', 'fsdp', 'ddp', 'ttl', 'machine', 'serve'):
    raise errors.UserError(f"mode must be 'train', 'generate', 'all', 'memory', 'fsdp', 'ddp', 'ttl', 'machine' or "
                            f"'serve', got {mode!r}")
if min(timed_steps, gen_tokens, gen_batch, prompt_len, batch_size, repeats) < 1 or warmup_steps < 0:
    raise errors.UserError("timed_steps, gen_tokens, gen_batch, prompt_len, batch_size, repeats must be >= 1; "
                            "warmup_steps >= 0")


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


# -----------------------------------------------------------------------------------------------------
# the machine: a tokens/s figure means nothing without the CPU (or GPU) it came from, so every mode
# prints this line first and puts its figures in the JSON

def measure_memory_bandwidth(device, mib=256, repeats=10):
    """Bytes/s between `device` and its memory: the best of `repeats` copies of a `mib` MiB float32
    tensor into another, far bigger than any cache, so every byte comes from and goes to DRAM. Counted:
    what the copy asks for, the mib MiB read plus the mib MiB written, as STREAM's copy counts them; the
    line a CPU may read before overwriting it (write-allocate) is not counted. The best and not the median:
    a busy neighbour only ever lowers it."""
    def sync():
        if device.startswith('cuda'):
            torch.cuda.synchronize(device)
    src = torch.ones(mib * 2**20 // 4, device=device)  # (n,) float32
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: the first copy also faults dst's pages in, which is not bandwidth
    best = float('inf')
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def measure_machine(device):
    """The machine's name, class and measured figures, in this process (about a second), as a dict whose
    'line' is the one-line summary. A CPU: its matmul GFLOP/s at 1024^3, but 256^3 for bf16 where it is
    emulated (0.2-2 GFLOP/s: a 1024^3 one takes seconds; hardware.peak_probe_size). On CUDA
    the GPU is what runs, so its name and figures stand in place of the CPU's; on MPS the CPU's are given."""
    info = hardware.cpu_info()
    probe = device if device.startswith('cuda') else 'cpu'
    if probe == 'cpu':
        name = hardware.describe_cpu(info)
        sizes = {dt: hardware.peak_probe_size('cpu', dt) for dt in ('float32', 'bfloat16')}
    else:
        name = f"{torch.cuda.get_device_name(probe)} ({probe})"
        sizes = {'float32': 1024, 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16': 1024}
    gflops = {dt: hardware.measure_matmul_flops(probe, dt, (n, n, n)) / 1e9 for dt, n in sizes.items()}
    gb_s = measure_memory_bandwidth(probe) / 1e9
    short = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}
    rates = ', '.join(f"{short[dt]} {hardware.format_flops(gflops[dt] * 1e9)}"
                      + ('' if n == 1024 else f" ({n}^3, emulated)") for dt, n in sizes.items())
    threads = torch.get_num_threads()  # 1 under torchrun and in the tests (OMP_NUM_THREADS=1): one core's figures
    line = (f"machine: {name} | {threads} thread{'s' if threads > 1 else ''}, matmul 1024^3: {rates} | "
            f"memory {gb_s:.1f} GB/s (copy)")
    return {'line': line, 'device': probe, 'name': name, 'cpu': info, 'threads': threads,
            'matmul_gflops': gflops, 'matmul_n': sizes, 'memory_gb_s': gb_s}


def machine_line(device):
    """measure_machine(device) in a fresh process (this script, --mode=machine), printed, and its dict:
    the bandwidth probe holds 512 MiB, which would stay in this process's peak memory (a peak RSS only
    ever grows), and train, memory and fsdp modes report that peak."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'machine.json')
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--mode=machine', f'--device={device}',
                               f'--json_out={out}'], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: measuring the machine failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        with open(out) as f:
            m = json.load(f)['machine']
    print(m['line'], flush=True)
    return m


if mode == 'machine':
    m = measure_machine(hardware.resolve_device(device)[0])
    print(m['line'])
    if json_out:
        files.write_json(json_out, {'machine': m})
    sys.exit(0)


# -----------------------------------------------------------------------------------------------------
# ttl: whole training runs of train.py, timed to a target val loss
if mode == 'ttl':
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}  # name -> train.py arguments
    for spec in filter(str.strip, ttl_runs.split(';')):
        name, sep, args = spec.partition(':')
        if not sep or not args.split():
            raise errors.UserError(f"ttl_runs: {spec.strip()!r} is not 'name: config.py [--key=value ...]'")
        runs[name.strip()] = args.split() + ttl_extra.split()
    if os.path.exists(ttl_out):  # both checked before anything runs
        raise errors.UserError(f"{ttl_out} exists (an earlier comparison); remove it or pick another --ttl_out")
    machine = machine_line(hardware.resolve_device(device)[0])  # train.py's runs pick the device the same way

    def summarise(out):
        records = runlog.read_log(out)
        tokens_per_iter = runlog.read_run_json(out)['derived']['tokens_per_iter']
        evals = runlog.evaluations(records)
        hit = next((r for r in evals if r['val_loss'] <= ttl_target), None)
        last = evals[-1]
        return {'time_to_target': hit['train_time'] if hit else None,
                'tokens_to_target': hit['iter'] * tokens_per_iter if hit else None,
                'val_loss': last['val_loss'], 'train_time': last['train_time'], 'iters': last['iter'],
                'tokens_per_s': last['iter'] * tokens_per_iter / max(last['train_time'], 1e-9),
                # steady state: the median logged step, so compilation (in the first step) is left out
                'step_tokens_per_s': median([r['tokens_per_s'] for r in records if 'tokens_per_s' in r][1:]
                                            or [float('nan')]),
                'mfu': median([r['mfu'] for r in records if 'mfu' in r] or [float('nan')])}

    results = {name: [] for name in runs}
    for seed_i in range(ttl_seeds):
        for name, args in runs.items():
            out = os.path.join(ttl_out, f"{name}-seed{seed_i}")
            load = round(os.getloadavg()[0], 2)
            proc = subprocess.run([sys.executable, os.path.join(here, 'train.py'), *args, f'--seed={1337 + seed_i}',
                                   f'--out_dir={out}', '--eval_whole_val=True', '--plot=False'],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"error: the run {name} (seed {seed_i}) failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
            r = summarise(out)
            r['load'] = load
            results[name].append(r)
            ttt = f"{r['time_to_target']:.1f}s" if r['time_to_target'] is not None else 'not reached'
            print(f"{name} seed {seed_i}: time to {ttl_target} {ttt}; val {r['val_loss']:.4f} after {r['train_time']:.1f}s "
                  f"({r['iters']} iters); {r['tokens_per_s']:,.0f} tok/s over the run, {r['step_tokens_per_s']:,.0f} "
                  f"per step (median), MFU {r['mfu'] * 100:.1f}%; load {load}", flush=True)

    def spread(xs, fmt):
        xs = [x for x in xs if x is not None]
        return f"{fmt(median(xs))} [{fmt(min(xs))}-{fmt(max(xs))}]" if xs else 'not reached'

    print(f"\n{'run':<10} {'time to ' + str(ttl_target):<30} {'last val loss':<26} {'tokens/s (run)':<26} "
          f"{'tokens/s (step)':<26} MFU")
    for name, rs in results.items():
        hits = sum(r['time_to_target'] is not None for r in rs)
        print(f"{name:<10} {spread([r['time_to_target'] for r in rs], '{:.1f}s'.format) + f' ({hits}/{len(rs)})':<30} "
              f"{spread([r['val_loss'] for r in rs], '{:.4f}'.format):<26} "
              f"{spread([r['tokens_per_s'] for r in rs], '{:,.0f}'.format):<26} "
              f"{spread([r['step_tokens_per_s'] for r in rs], '{:,.0f}'.format):<26} "
              f"{spread([r['mfu'] * 100 for r in rs], '{:.1f}%'.format)}")
    base_name, base = next(iter(results.items()))
    ratios = {}
    for name, rs in list(results.items())[1:]:
        speed = [b['time_to_target'] / r['time_to_target'] for b, r in zip(base, rs)
                 if b['time_to_target'] and r['time_to_target']]
        # where the baseline never got there, its whole training time bounds the ratio from below
        at_least = [b['train_time'] / r['time_to_target'] for b, r in zip(base, rs)
                    if not b['time_to_target'] and r['time_to_target']]
        tok = [r['tokens_per_s'] / b['tokens_per_s'] for b, r in zip(base, rs)]
        step_tok = [r['step_tokens_per_s'] / b['step_tokens_per_s'] for b, r in zip(base, rs)]
        ratios[name] = {'time_to_target': speed, 'time_to_target_at_least': at_least, 'tokens_per_s': tok,
                        'step_tokens_per_s': step_tok}
        if at_least:
            print(f"{name} vs {base_name}: reaches {ttl_target} at least {spread(at_least, '{:.2f}x'.format)} faster in "
                  f"the {len(at_least)} seed(s) where {base_name} did not reach it at all (its whole run's time / ours)")
        # the time ratio only where both runs of a seed got there; else that line would read "not reached faster"
        reached = f"reaches {ttl_target} {spread(speed, '{:.2f}x'.format)} faster; " if speed else ''
        print(f"{name} vs {base_name}: {reached}tokens/s {spread(tok, '{:.2f}x'.format)} over the run, "
              f"{spread(step_tok, '{:.2f}x'.format)} per step (median [min-max] over seeds)")
    if json_out:
        files.write_json(json_out, {'config': config, 'machine': machine, 'runs': runs, 'results': results,
                                      'ratios': ratios})
        print(f"wrote {json_out}")
    sys.exit(0)


# -----------------------------------------------------------------------------------------------------
# serve: serve.py's continuous batching, measured from outside as its clients see it
if mode == 'serve':
    import socket
    import threading
    import urllib.request
    machine = machine_line(hardware.resolve_device(device)[0])
    levels = [int(c) for c in serve_clients.split()]

    def stream(url, prompt):
        """One greedy streamed completion, read to [DONE]: its completion tokens (from the usage chunk)."""
        body = json.dumps({'prompt': prompt, 'max_tokens': serve_tokens, 'temperature': 0, 'stream': True,
                           'stream_options': {'include_usage': True}}).encode()
        req = urllib.request.Request(url + '/v1/completions', body, {'Content-Type': 'application/json'})
        used = 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b'data: {'):
                    used = (json.loads(line[6:]).get('usage') or {}).get('completion_tokens', used)
        return used

    def timed(url, prompts, together):
        """(completion tokens of all, seconds from the first request to the last [DONE])."""
        used = [0] * len(prompts)
        t0 = time.perf_counter()
        if together:
            threads = [threading.Thread(target=lambda i=i: used.__setitem__(i, stream(url, prompts[i])))
                       for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            used = [stream(url, p) for p in prompts]
        return sum(used), time.perf_counter() - t0

    rows = []
    for shape in serve_shapes.split(','):
        L, H, C = (int(x) for x in shape.split('x'))
        torch.manual_seed(seed)
        model = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=block_size, vocab_size=vocab_size))
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(os.path.join(tmp, 'ckpt.pt'), model, {'tokenizer': {'kind': 'gpt2'}})
            del model
            with socket.socket() as sock:
                sock.bind(('127.0.0.1', 0))
                port = sock.getsockname()[1]
            server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.py'),
                                       f'--out_dir={tmp}', f'--port={port}', f'--device={device}', f'--dtype={dtype}',
                                       f'--max_batch={max(levels)}', '--log_level=warning'],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            url = f'http://127.0.0.1:{port}'
            try:
                while True:  # until /health answers
                    if server.poll() is not None:
                        sys.exit(f"error: serve.py exited:\n{server.stdout.read()[-2000:]}")
                    try:
                        urllib.request.urlopen(url + '/health', timeout=1).read()
                        break
                    except OSError:
                        time.sleep(0.2)
                g = torch.Generator().manual_seed(seed)
                prompts = [torch.randint(50257, (prompt_len,), generator=g).tolist() for _ in range(max(levels))]
                timed(url, prompts[:2], True)  # warm-up: first calls pay for allocation and kernel choice
                for c in levels:
                    one = timed(url, prompts[:c], False)
                    together = timed(url, prompts[:c], True)
                    rows.append(dict(shape=shape, clients=c, tokens=one[0], one_at_a_time_tokens_per_s=one[0] / one[1],
                                     together_tokens_per_s=together[0] / together[1],
                                     speedup=(together[0] / together[1]) / (one[0] / one[1])))
                    r = rows[-1]
                    print(f"serve: {shape} {c:>2} clients: one at a time {r['one_at_a_time_tokens_per_s']:,.1f} tokens/s, "
                          f"together {r['together_tokens_per_s']:,.1f} tokens/s ({r['speedup']:.2f}x)", flush=True)
            finally:
                server.terminate()
                server.wait()
    print(f"\nserve.py, {serve_tokens} greedy tokens per request after {prompt_len} prompt tokens, streamed "
          f"(block_size {block_size}, vocab {vocab_size}):")
    print("| shape (L x H x C) | clients | one at a time (tokens/s) | together (tokens/s) | speedup |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['clients']} | {r['one_at_a_time_tokens_per_s']:,.1f} | "
              f"{r['together_tokens_per_s']:,.1f} | {r['speedup']:.2f}x |")
    if json_out:
        files.write_json(json_out, {'config': config, 'machine': machine, 'serve': rows})
        print(f"wrote {json_out}")
    sys.exit(0)


# -----------------------------------------------------------------------------------------------------
# memory: this script in train mode, in a fresh process per run, without (A) and with (B) checkpointing
if mode == 'memory':
    machine = machine_line(hardware.resolve_device(device)[0])
    passed = [a for a in sys.argv[1:] if not a.startswith(('--mode=', '--json_out=', '--gradient_checkpointing='))]
    runs = {False: [], True: []}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for ckpt in (False, True):
                out = os.path.join(tmp, f"{i}_{ckpt}.json")
                loads.append(round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None)
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, '--mode=train',
                                       f'--gradient_checkpointing={ckpt}', f'--json_out={out}'],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"error: the train run failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
                with open(out) as f:
                    train = json.load(f)['train']
                runs[ckpt].append(train)
                print(f"run {i + 1}/{repeats}, gradient_checkpointing={ckpt}: {train['ms_per_step']:,.0f} ms/step, "
                      f"peak memory {train['peak_memory_bytes'] / 2**20:,.0f} MiB, load {loads[-1]}")
    mem = {k: median([r['peak_memory_bytes'] for r in v]) for k, v in runs.items()}
    ms = {k: median([r['ms_per_step'] for r in v]) for k, v in runs.items()}
    # each repeat's B/A time ratio, then the median: neighbours' load changes slower than one pair
    ratio = median([b['ms_per_step'] / a['ms_per_step'] for a, b in zip(runs[False], runs[True])])
    cpu_ratio = median([b['cpu_ms_per_step'] / a['cpu_ms_per_step'] for a, b in zip(runs[False], runs[True])])
    cut = 1 - mem[True] / mem[False]
    print(f"memory: chunked_loss={config['chunked_loss']} in both")
    print(f"memory: without checkpointing {mem[False] / 2**20:,.0f} MiB, with {mem[True] / 2**20:,.0f} MiB "
          f"({cut * 100:.1f}% less; {runs[False][0]['peak_memory_source']}, median of {repeats})")
    print(f"memory: step time {ms[False]:,.0f} ms without, {ms[True]:,.0f} ms with: {ratio:.2f}x "
          f"(median of the {repeats} back-to-back ratios; 1-min load {min(loads)}-{max(loads)}); CPU time {cpu_ratio:.2f}x")
    if json_out:
        files.write_json(json_out, {'config': config, 'machine': machine, 'without': runs[False], 'with': runs[True],
                                      'memory_cut': cut, 'time_ratio': ratio, 'cpu_time_ratio': cpu_ratio,
                                      'loads': loads})
        print(f"wrote {json_out}")
    sys.exit(0)
device, why = hardware.resolve_device(device)
if mode in ('fsdp', 'ddp'):
    ddp, rank, _, world_size, device = parallel.setup_distributed('auto', device)
    if not ddp:
        raise errors.UserError(f"--mode={mode} measures ranks: run it under torchrun --nproc_per_node=2")
print(f"device: {device} ({why})")
# measured at the shape of what is timed: a train step's rows, or decoding's one row a sequence (with
# init_from, the shape keys may differ from the model's; the probe only needs them roughly right)
rows = gen_batch if mode == 'generate' else batch_size * block_size
dtype, why = hardware.resolve_dtype(dtype, device, (rows, n_embd))
print(f"dtype: {dtype} ({why})")
model_module.CausalSelfAttention.sdpa_backward = hardware.sdpa_backward(device, dtype)  # as train.py
compile, why = hardware.resolve_compile(compile, device)
print(f"compile: {compile} ({why})")
env = runlog.run_info(device)
# on a shared machine other processes steal cores; a load above the core count means low numbers
env['loadavg_start'] = round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None
print(f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} cpus, "
      f"1-min load {env['loadavg_start']}, git {env['git_revision'][:10]}{' (dirty)' if env['git_dirty'] else ''}")
machine = machine_line(device) if mode not in ('fsdp', 'ddp') or rank == 0 else None
if mode in ('fsdp', 'ddp'):
    torch.distributed.barrier()  # the other ranks wait idle meanwhile: the probe has the cores to itself
torch.manual_seed(seed)

if init_from is None:
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=vocab_size, bias=bias, dropout=dropout, pos_emb=pos_emb))
else:
    model, _, _ = load_model(init_from)
    print(f"model from {init_from}: its own shape, the shape keys are ignored")
model.to(device)
if gradient_checkpointing:
    parallel.gradient_checkpointing(model)
mc = model.config
print(f"model: {model.get_num_params() / 1e6:.1f}M params, n_layer={mc.n_layer} n_head={mc.n_head} "
      f"n_embd={mc.n_embd} block_size={mc.block_size} vocab_size={mc.vocab_size} pos_emb={mc.pos_emb}")


def sync():
    """Wait for queued GPU work, so the clock measures the work and not only its launch."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elif device == 'mps':
        torch.mps.synchronize()


results = {'config': config, 'resolved': {'device': device, 'dtype': dtype, 'compile': compile}, 'env': env,
           'machine': machine}

def peak_memory():
    """(bytes, what was measured): the device's peak allocation on CUDA, else the process's peak RSS."""
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated(device), 'torch.cuda.max_memory_allocated'
    import resource  # not on Windows; only needed here
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the whole process's peak since it started
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024), \
        'peak RSS of this process'


# -----------------------------------------------------------------------------------------------------
# fsdp / ddp: what one rank holds after an optimizer step, sharded (FSDP) or replicated (DDP)
if mode in ('fsdp', 'ddp'):
    import torch.distributed as dist

    def local_bytes(tensors):  # a DTensor's own shard only
        return sum(t.to_local().nbytes if hasattr(t, 'to_local') else t.nbytes for t in tensors if t is not None)

    if mode == 'fsdp':
        step_model = parallel.fully_shard_model(model, device, dtype, compile)
    else:
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith('cuda') else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith('cuda'))
    x = torch.randint(mc.vocab_size, (batch_size, mc.block_size), device=device)  # (B, T)
    with hardware.autocast(device, dtype):
        _, loss = step_model(x, x, head_loss=chunked_lm_head_loss if chunked_loss else None)
    loss.backward()
    optimizer.step()
    held = {'params': local_bytes(model.parameters()), 'grads': local_bytes(p.grad for p in model.parameters()),
            'optimizer': local_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))}
    held['peak'], src = peak_memory()
    rows = [None] * world_size
    dist.all_gather_object(rows, held)
    if rank == 0:
        for r, h in enumerate(rows):
            print(f"{mode} rank {r}/{world_size}: parameters {h['params'] / 2**20:,.0f} MiB, gradients "
                  f"{h['grads'] / 2**20:,.0f} MiB, optimizer state {h['optimizer'] / 2**20:,.0f} MiB; "
                  f"peak memory {h['peak'] / 2**20:,.0f} MiB ({src})")
        if json_out:
            files.write_json(json_out, {'config': config, 'machine': machine, 'ranks': rows,
                                          'peak_memory_source': src})
    dist.barrier()  # leave together, as train.py does
    dist.destroy_process_group()
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------
# train: forward + backward on random batches; no optimizer and no data loading, only the model's work
if mode in ('train', 'all'):
    if compile:
        hardware.prepare_to_compile(model)  # as hardware.compile_model does
    step_model = torch.compile(model) if compile else model
    model.train()
    B, T = batch_size, mc.block_size
    x = torch.randint(mc.vocab_size, (B, T), device=device)  # (B, T) inputs
    y = torch.randint(mc.vocab_size, (B, T), device=device)  # (B, T) targets
    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []  # wall clock; CPU time of this process (less moved by busy neighbours)
    for i in range(warmup_steps + timed_steps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        model.zero_grad(set_to_none=True)  # as train.py does: backward allocates fresh grads every step
        with hardware.autocast(device, dtype):
            loss = step_model(x, y, head_loss=chunked_lm_head_loss if chunked_loss else None)[1]  # as train.py
        loss.backward()
        sync()
        if i >= warmup_steps:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    model.zero_grad(set_to_none=True)  # free the grads before generation
    dt = median(times)  # the median step: one slow step from a noisy neighbour does not move it
    tokens_per_s = B * T / dt
    peak, peak_src = hardware.peak_flops(device, dtype)
    mfu = model.estimate_mfu(tokens_per_s, peak, T)
    mem, mem_src = peak_memory()
    print(f"train: {dt * 1000:.1f} ms/step (median of {timed_steps}), {tokens_per_s:,.0f} tokens/s, "
          f"batch {B} x {T} tokens, loss {loss.item():.3f}")
    print(f"train: MFU {mfu * 100:.1f}% of {peak / 1e12:.3f} TFLOP/s ({peak_src}); "
          f"peak memory {mem / 2**20:,.0f} MiB ({mem_src})")
    if mfu > 1:
        print("train: MFU above 100% means the measured peak came out low (a busy machine?); rerun when idle")
    results['train'] = dict(ms_per_step=dt * 1000, tokens_per_s=tokens_per_s, mfu=mfu, peak_flops=peak,
                            peak_flops_source=peak_src, peak_memory_bytes=mem, peak_memory_source=mem_src,
                            step_times_ms=[t * 1000 for t in times], cpu_ms_per_step=median(cpu_times) * 1000)

# -----------------------------------------------------------------------------------------------------
# generate: the same greedy continuation with the KV cache and with the plain reference path
if mode in ('generate', 'all'):
    model.eval()
    g = torch.Generator().manual_seed(seed)  # the prompt depends on the seed only, not on what ran before
    prompt = torch.randint(mc.vocab_size, (gen_batch, prompt_len), generator=g).to(device)  # (B, prompt_len)

    def run(use_kv_cache, n, label=''):
        """Greedy (top_k=1) generation of n tokens -> ((B, n) new ids, seconds). With a label, a progress
        line every 64 tokens, or after 10 s without one: the uncached 124M shape takes minutes."""
        new = []
        sync()
        t0 = last = time.perf_counter()
        with hardware.autocast(device, dtype):  # one context for the whole run: autocast keeps its bf16 weights
            stream = model.generate_stream(prompt, n, top_k=1, use_kv_cache=use_kv_cache)
            for i, nxt in enumerate(stream):  # nxt: (B, 1)
                new.append(nxt)
                now = time.perf_counter()
                if label and i + 1 < n and ((i + 1) % 64 == 0 or now - last > 10):
                    print(f"progress: {label} {i + 1}/{n} tokens, {now - t0:.1f} s, "
                          f"{gen_batch * (i + 1) / (now - t0):,.1f} tokens/s so far", flush=True)
                    last = now
        sync()
        return torch.cat(new, dim=1), time.perf_counter() - t0

    run(True, min(8, gen_tokens))  # warm-up: the first calls pay for allocation and kernel choice
    run(False, min(8, gen_tokens))
    print(f"generate: {gen_tokens} tokens x {gen_batch} rows after a {prompt_len}-token prompt, greedy")
    out_kv, t_kv = run(True, gen_tokens, 'with KV cache')
    out_ref, t_ref = run(False, gen_tokens, 'without KV cache')
    rate_kv, rate_ref = gen_batch * gen_tokens / t_kv, gen_batch * gen_tokens / t_ref
    speedup = rate_kv / rate_ref
    same = torch.equal(out_kv, out_ref)
    print(f"generate: with KV cache {rate_kv:,.1f} tokens/s, without {rate_ref:,.1f} tokens/s, "
          f"speedup {speedup:.2f}x")
    if same:
        print(f"outputs: identical ({gen_tokens} tokens x {gen_batch} rows)")
    else:
        first = (out_kv != out_ref).any(dim=0).nonzero()[0].item()
        print(f"outputs: DIFFER from new token {first} (the cached path must give the reference's tokens)")
    # the ceiling of cached generation: each step reads every weight once from memory (the B rows share
    # that read), and a small model does little else, so tokens/s <= bandwidth / weight bytes per token.
    # Weights count in the dtype the matmuls read: under bf16 autocast the bf16 copies it makes once per
    # run() and keeps (2 bytes; the norms' gains, left in fp32, are < 0.1% of them), else the
    # parameters' own. The one row of wte/wpe a token looks up is left out, and so are the KV cache reads
    # (2 x n_layer x context x n_embd values a row, given below for the mean context), which makes the bound
    # a little high; a pure read may stream a little faster than the copy measured (~1.2x on an AMD EPYC),
    # which makes it a little low. Past block_size the cache is refilled every step and it does not hold.
    compute_dtype = getattr(torch, dtype) if dtype != 'float32' else model.lm_head.weight.dtype
    bytes_per_param = torch.finfo(compute_dtype).bits // 8
    weight_bytes_per_token = model.get_num_params() * bytes_per_param / gen_batch
    mean_context = sum(min(prompt_len + i, mc.block_size) for i in range(gen_tokens)) / gen_tokens
    kv_bytes_per_token = 2 * mc.n_layer * mean_context * mc.n_embd * model.lm_head.weight.element_size()
    bandwidth = machine['memory_gb_s'] * 1e9  # bytes/s: the GPU's on CUDA, else the CPU's (MPS shares it)
    bound = bandwidth / weight_bytes_per_token  # tokens/s
    print(f"bound: memory bandwidth allows {bound:,.1f} tokens/s ({weight_bytes_per_token / 1e6:,.1f} MB of "
          f"{str(compute_dtype)[6:]} weights a token at {machine['memory_gb_s']:.1f} GB/s); with KV cache "
          f"{rate_kv:,.1f} tokens/s is {rate_kv / bound * 100:.3g}% of it (KV cache reads left out: "
          f"{kv_bytes_per_token / 1e6:,.1f} MB a token at the mean context)"
          + (' (past block_size the cache is refilled every step: the bound does not hold)'
             if prompt_len + gen_tokens > mc.block_size else ''))
    # the target is stated for one shape and device; elsewhere the verdict is only indicative
    on_target = (mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, gen_tokens, device) == (12, 12, 768, 50257, 512, 'cpu')
    verdict = 'PASS' if same and speedup >= kv_target else 'FAIL'
    print(f"target: KV cache >= {kv_target}x faster with the same tokens: {verdict}"
          + ('' if on_target else ' (the target is for the GPT-2-124M shape, 512 tokens, on CPU; this run is not)'))
    results['generate'] = dict(tokens_per_s_kv_cache=rate_kv, tokens_per_s_no_cache=rate_ref,
                               seconds_kv_cache=t_kv, seconds_no_cache=t_ref, speedup=speedup,
                               identical=same, target=kv_target, verdict=verdict, on_target_shape=on_target,
                               bytes_per_param=bytes_per_param, weight_bytes_per_token=weight_bytes_per_token,
                               kv_cache_bytes_per_token=kv_bytes_per_token, memory_gb_s=machine['memory_gb_s'],
                               bandwidth_bound_tokens_per_s=bound, fraction_of_bound=rate_kv / bound)

env['loadavg_end'] = round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None
if json_out:
    files.write_json(json_out, results)
    print(f"wrote {json_out}")
if 'generate' in results and not results['generate']['identical']:
    sys.exit(1)  # wrong tokens are a bug, not a slow run
