"""
Speed of a model shape: training throughput and MFU (forward + backward), generation with and without the
KV cache, and memory. Random weights and random tokens: how fast a shape runs does not depend on what it
learned. Whole training runs timed to a target loss: bench_time_to_loss.py; serve.py under load: bench_serve.py.

    python bench.py                              # GPT-2-124M shape: a train step, then the KV-cache target
    python bench.py --mode=generate              # the target: cache >= 5x faster at 512 tokens, same tokens
    python bench.py --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 --vocab_size=65 --mode=train
    python bench.py config/bench_shakespeare_char.py --dtype=bfloat16    # the same shape, from a file
    python bench.py --init_from=out-shakespeare-char   # a checkpoint, a save_pretrained folder, or gpt2
    python bench.py --mode=generate --json_out=bench.json                # results as JSON, for the README
    python bench.py --mode=memory --batch_size=8 --repeats=3   # gradient checkpointing: peak memory, step time
    torchrun --standalone --nproc_per_node=2 bench.py --mode=fsdp --block_size=128   # memory per rank; also ddp
    python bench.py --mode=machine               # only the machine line: CPU, matmul GFLOP/s, memory GB/s
"""
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from statistics import median

import torch

from configurator import NON_NEGATIVE, POSITIVE_INT, check_ranges, configure, knobs, overrides
from model import GPT, CausalSelfAttention, GPTConfig
from nanoforge import errors, files, hardware, parallel, runlog
from nanoforge.checkpoint import load_model
from nanoforge.lm_head_loss import chunked_lm_head_loss

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
# defaults: the GPT-2-124M shape, 512 new tokens on CPU: where the KV cache's speed-up is measured
# model shape (ignored with init_from, which brings its own)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50257
bias = True
dropout = 0.0
pos_emb = 'learned'
init_from = ''  # '': random weights; or an out_dir, ckpt file, HF folder or gpt2 name
# what to measure
mode = 'all'  # 'train', 'generate' (with vs without KV cache), 'all', 'memory', 'fsdp', 'ddp', 'machine'
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
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
config = configure(defaults, sys.argv[1:])
globals().update(config)
print(f"overrides: {overrides(defaults, config) or 'none'}")

if mode not in ('train', 'generate', 'all', 'memory', 'fsdp', 'ddp', 'machine'):
    raise errors.UserError(f"mode must be 'train', 'generate', 'all', 'memory', 'fsdp', 'ddp' or 'machine', got "
                           f"{mode!r} (time to loss: bench_time_to_loss.py; serving: bench_serve.py)")
positive = ('timed_steps', 'gen_tokens', 'gen_batch', 'prompt_len', 'batch_size', 'repeats')
check_ranges(config, {'warmup_steps': NON_NEGATIVE, **{k: POSITIVE_INT for k in positive}})

# -----------------------------------------------------------------------------------------------------
# configure: the device and the machine it is on (in a fresh process: hardware.machine_line)
device, why = hardware.resolve_device(device)
ddp, rank, world_size = False, 0, 1
if mode in ('fsdp', 'ddp'):
    ddp, rank, _, world_size, device = parallel.setup_distributed('auto', device)
    if not ddp:
        raise errors.UserError(f"--mode={mode} measures ranks: run it under torchrun --nproc_per_node=2")
print(f"device: {device} ({why})")
cuda = device.startswith('cuda')
machine = hardware.machine_line(device) if rank == 0 else None
if ddp:
    torch.distributed.barrier()  # the other ranks wait idle meanwhile: the probe has the cores to itself
if mode == 'machine':  # only the machine line
    if json_out:
        files.write_json(json_out, {'machine': machine})
    sys.exit(0)

# memory: this script in train mode without (A) and with (B) gradient checkpointing, alternating (A B A B)
# so both see the same machine load, each run in a fresh process: a peak RSS only ever grows
if mode == 'memory':
    passed = [a for a in sys.argv[1:] if not a.startswith(('--mode=', '--json_out=', '--gradient_checkpointing='))]
    runs, loads = {False: [], True: []}, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, ckpt in itertools.product(range(repeats), (False, True)):
            out = os.path.join(tmp, f"{i}_{ckpt}.json")
            loads.append(hardware.load_average())
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
    print(f"memory: without checkpointing {mem[False] / 2**20:,.0f} MiB, with {mem[True] / 2**20:,.0f} MiB "
          f"({cut * 100:.1f}% less; {runs[False][0]['peak_memory_source']}, median of {repeats}; "
          f"chunked_loss={chunked_loss} in both)")
    print(f"memory: step time {ms[False]:,.0f} ms without, {ms[True]:,.0f} ms with: {ratio:.2f}x (median of the "
          f"{repeats} back-to-back ratios; 1-min load {min(loads)}-{max(loads)}); CPU time {cpu_ratio:.2f}x")
    if json_out:
        files.write_json(json_out, {'config': config, 'machine': machine, 'without': runs[False], 'with': runs[True],
                                    'memory_cut': cut, 'time_ratio': ratio, 'cpu_time_ratio': cpu_ratio,
                                    'loads': loads})
        print(f"wrote {json_out}")
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------
# configure: precision, compile, the environment and the model
# probed at the shape timed: a train step's rows, or decoding's one row a sequence (roughly, with init_from)
rows = gen_batch if mode == 'generate' else batch_size * block_size
dtype, why = hardware.resolve_dtype(dtype, device, (rows, n_embd))
print(f"dtype: {dtype} ({why})")
CausalSelfAttention.sdpa_backward = hardware.sdpa_backward(device, dtype)  # as train.py
compile, why = hardware.resolve_compile(compile, device)
print(f"compile: {compile} ({why})")
env = runlog.run_info(device)
# on a shared machine other processes steal cores; a load above the core count means low numbers
env['loadavg_start'] = hardware.load_average()
print(f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} cpus, "
      f"1-min load {env['loadavg_start']}, git {env['git_revision'][:10]}{' (dirty)' if env['git_dirty'] else ''}")
torch.manual_seed(seed)  # the model's random weights
if not init_from:
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
results = dict(config=config, resolved=dict(device=device, dtype=dtype, compile=compile), env=env, machine=machine)

# -----------------------------------------------------------------------------------------------------
# the step fsdp, ddp and train run: forward + backward on a random batch, no data loading
B, T = batch_size, mc.block_size
x, y = torch.randint(mc.vocab_size, (2, B, T), device=device)  # (B, T) inputs, (B, T) targets


def train_step(m):
    model.zero_grad(set_to_none=True)  # as train.py does: backward allocates fresh grads every step
    with hardware.autocast(device, dtype):
        loss = m(x, y, head_loss=chunked_lm_head_loss if chunked_loss else None)[1]  # as train.py; logits not kept
    loss.backward()
    return loss.detach()


# fsdp / ddp: what one rank holds after an optimizer step, sharded (FSDP) or replicated (DDP)
if mode in ('fsdp', 'ddp'):
    def local_bytes(tensors):  # a DTensor's own shard only
        return sum(t.to_local().nbytes if hasattr(t, 'to_local') else t.nbytes for t in tensors if t is not None)
    if mode == 'fsdp':
        step_model = parallel.fully_shard_model(model, device, dtype, compile)
    else:  # device_ids only on CUDA, where each rank has its own GPU
        step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    train_step(step_model)
    optimizer.step()
    held = {'params': local_bytes(model.parameters()), 'grads': local_bytes(p.grad for p in model.parameters()),
            'optimizer': local_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))}
    held['peak'], src = hardware.peak_memory(device)
    results.update(ranks=[None] * world_size, peak_memory_source=src)
    torch.distributed.all_gather_object(results['ranks'], held)
    for r, h in enumerate(results['ranks'] if rank == 0 else []):
        print(f"{mode} rank {r}/{world_size}: parameters {h['params'] / 2**20:,.0f} MiB, gradients "
              f"{h['grads'] / 2**20:,.0f} MiB, optimizer state {h['optimizer'] / 2**20:,.0f} MiB; "
              f"peak memory {h['peak'] / 2**20:,.0f} MiB ({src})")
    torch.distributed.barrier()  # leave together, as train.py does
    torch.distributed.destroy_process_group()

# train: the step timed; no optimizer, only the model's work
if mode in ('train', 'all'):
    step_model = model.train()
    if compile:  # as train.py compiles; where compiling fails, eager, and the results say so
        step_model, _ = hardware.compile_model(model, train_step)
        results['resolved']['compile'] = step_model is not model
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []  # wall clock; CPU time of this process (less moved by busy neighbours)
    for i in range(warmup_steps + timed_steps):
        hardware.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = train_step(step_model)
        hardware.synchronize(device)
        if i >= warmup_steps:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    model.zero_grad(set_to_none=True)  # free the grads before generation
    dt = median(times)  # the median step: one slow step from a noisy neighbour does not move it
    tokens_per_s = B * T / dt
    peak, peak_src = hardware.peak_flops(device, dtype)
    mfu = model.estimate_mfu(tokens_per_s, peak, T)
    mem, mem_src = hardware.peak_memory(device)
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
        hardware.synchronize(device)
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
        hardware.synchronize(device)
        return torch.cat(new, dim=1), time.perf_counter() - t0
    for cached in (True, False):  # warm-up: the first calls pay for allocation and kernel choice
        run(cached, min(8, gen_tokens))
    print(f"generate: {gen_tokens} tokens x {gen_batch} rows after a {prompt_len}-token prompt, greedy")
    out_kv, t_kv = run(True, gen_tokens, 'with KV cache')
    out_ref, t_ref = run(False, gen_tokens, 'without KV cache')
    rate_kv, rate_ref = gen_batch * gen_tokens / t_kv, gen_batch * gen_tokens / t_ref  # tokens/s
    speedup, same = rate_kv / rate_ref, torch.equal(out_kv, out_ref)
    print(f"generate: with KV cache {rate_kv:,.1f} tokens/s, without {rate_ref:,.1f} tokens/s, speedup {speedup:.2f}x")
    first = None if same else (out_kv != out_ref).any(dim=0).nonzero()[0].item()  # the first differing new token
    print(f"outputs: identical ({gen_tokens} tokens x {gen_batch} rows)" if same else
          f"outputs: DIFFER from new token {first} (the cached path must give the reference's tokens)")
    # the ceiling of cached generation: each step reads every weight once (the B rows share it), so tokens/s <=
    # bandwidth / weight bytes a token, in the dtype the matmuls read (autocast's bf16 copies; fp32 norm gains
    # are < 0.1%). Left out, so the bound is a little high: the wte/wpe rows looked up and the KV cache reads
    # (given for the mean context). A pure read may stream ~1.2x faster than the copy measured (AMD EPYC).
    compute_dtype = getattr(torch, dtype) if dtype != 'float32' else model.lm_head.weight.dtype
    bytes_per_param = torch.finfo(compute_dtype).bits // 8
    weight_bytes_per_token = model.get_num_params() * bytes_per_param / gen_batch
    mean_context = sum(min(prompt_len + i, mc.block_size) for i in range(gen_tokens)) / gen_tokens
    kv_bytes_per_token = 2 * mc.n_layer * mean_context * mc.n_embd * model.lm_head.weight.element_size()
    bound = machine['memory_gb_s'] * 1e9 / weight_bytes_per_token  # tokens/s; the GPU's bandwidth on CUDA
    print(f"bound: memory bandwidth allows {bound:,.1f} tokens/s ({weight_bytes_per_token / 1e6:,.1f} MB of "
          f"{str(compute_dtype)[6:]} weights a token at {machine['memory_gb_s']:.1f} GB/s); with KV cache "
          f"{rate_kv:,.1f} tokens/s is {rate_kv / bound * 100:.3g}% of it (KV cache reads left out: "
          f"{kv_bytes_per_token / 1e6:,.1f} MB a token at the mean context)"
          + (' (past block_size the cache is refilled every step: the bound does not hold)'
             if prompt_len + gen_tokens > mc.block_size else ''))
    # the target is stated for one shape and device; elsewhere the verdict is only indicative
    shape = (mc.n_layer, mc.n_head, mc.n_embd, mc.vocab_size, gen_tokens)
    on_target = shape == (12, 12, 768, 50257, 512) and device == 'cpu'
    verdict = 'PASS' if same and speedup >= kv_target else 'FAIL'
    print(f"target: KV cache >= {kv_target}x faster with the same tokens: {verdict}"
          + ('' if on_target else ' (the target is for the GPT-2-124M shape, 512 tokens, on CPU; this run is not)'))
    results['generate'] = dict(tokens_per_s_kv_cache=rate_kv, tokens_per_s_no_cache=rate_ref, seconds_kv_cache=t_kv,
                               seconds_no_cache=t_ref, speedup=speedup, identical=same, target=kv_target,
                               verdict=verdict, on_target_shape=on_target, bytes_per_param=bytes_per_param,
                               weight_bytes_per_token=weight_bytes_per_token,
                               kv_cache_bytes_per_token=kv_bytes_per_token, memory_gb_s=machine['memory_gb_s'],
                               bandwidth_bound_tokens_per_s=bound, fraction_of_bound=rate_kv / bound)

env['loadavg_end'] = hardware.load_average()
if json_out and rank == 0:
    files.write_json(json_out, results)
    print(f"wrote {json_out}")
if 'generate' in results and not results['generate']['identical']:
    sys.exit(1)  # wrong tokens are a bug, not a slow run
