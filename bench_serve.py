"""
Serving under load: starts serve.py (random weights, GPT-2's tokenizer) for each model shape and streams
the same greedy completions from N clients, one at a time and then all at once; reports tokens/s of each
and their ratio, which is what continuous batching buys; and the time to first token (p50, p95) of the
clients that came together, which batched prefill keeps near one client's.

    python bench_serve.py --vocab_size=50304                     # 4x4x256 and 12x12x768, at 1, 4, 16 clients
    python bench_serve.py --shapes=4x4x256 --clients="1 8" --completion_tokens=64 --json_out=serve.json

Every request is completion_tokens greedy tokens after a prompt_len-token prompt, streamed; aggregate
tokens/s is the completion tokens of all over the wall time from the first request to the last [DONE].
The machine line comes first: a speed means nothing without the machine it came from.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import torch

from configurator import configure, knobs, overrides
from model import GPT, GPTConfig
from nanoforge import errors, files, hardware
from nanoforge.checkpoint import save_checkpoint

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
shapes = "4x4x256,12x12x768"  # model shapes 'n_layer x n_head x n_embd', separated by ','
block_size = 1024
vocab_size = 50257  # at least GPT-2's 50257 tokens: the prompts are GPT-2 token ids
clients = "1 4 16"  # concurrent streaming clients, space-separated; each level is also run one at a time
completion_tokens = 32  # greedy tokens per request
prompt_len = 16  # tokens of each (random) prompt
device = "auto"  # serve.py's: auto, cpu, cuda, cuda:N, mps
dtype = "auto"  # serve.py's: auto, float32, bfloat16, float16
quantize = "none"  # serve.py's: 'int8' serves int8 weights
compile = False  # serve.py's: compile the decode step (its compile, before serving, is not timed)
seed = 1337
json_out = ""  # a path: also write the results there as JSON
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
config = configure(defaults, sys.argv[1:])
globals().update(config)
print(f"overrides: {overrides(defaults, config) or 'none'}")

try:
    dims = {s: tuple(int(x) for x in s.split("x")) for s in shapes.split(",")}  # shape -> (L, H, C)
    levels = [int(c) for c in clients.split()]
except ValueError:
    dims = levels = None
if not dims or not levels or min(levels) < 1 or any(len(d) != 3 or min(d) < 1 for d in dims.values()):
    raise errors.UserError(f"shapes must be like '4x4x256,12x12x768' and clients like '1 4 16'; "
                           f"got {shapes!r} and {clients!r}")
if vocab_size < 50257 or min(completion_tokens, prompt_len) < 1:
    raise errors.UserError("vocab_size must be >= 50257 (GPT-2's tokenizer); completion_tokens, prompt_len >= 1")
machine = hardware.machine_line(hardware.resolve_device(device)[0])


def stream(url, prompt):
    """One greedy streamed completion, read to [DONE]: (its completion tokens, from the usage chunk; seconds
    from sending the request to its first chunk, the time to first token)."""
    t0, first = time.perf_counter(), None
    body = json.dumps({"prompt": prompt, "max_tokens": completion_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    used = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                used = (chunk.get("usage") or {}).get("completion_tokens", used)
                if first is None and chunk.get("choices"):  # text, or the finish of a reply that stopped at once
                    first = time.perf_counter() - t0
    return used, first


def timed(url, prompts, together):
    """(completion tokens of all, seconds from the first request to the last [DONE], each one's time to
    first token)."""
    used = [(0, None)] * len(prompts)
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
    return sum(u for u, _ in used), time.perf_counter() - t0, [f for _, f in used]


def percentile(xs, q):
    """The q-th percentile (0-100) of xs, nearest rank: of 16 times, p95 is the 16th, p50 the 8th."""
    xs = sorted(xs)
    return xs[max(0, -(-len(xs) * q // 100) - 1)]


# -----------------------------------------------------------------------------------------------------
# each shape: a checkpoint of random weights, serve.py on a free port, then every level of clients
serve_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
rows = []
for shape, (L, H, C) in dims.items():
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=block_size, vocab_size=vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(os.path.join(tmp, "ckpt.pt"), model, {"tokenizer": {"kind": "gpt2"}})
        del model
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, serve_py, f"--out_dir={tmp}", f"--port={port}",
                                   f"--device={device}", f"--dtype={dtype}", f"--quantize={quantize}",
                                   f"--compile={compile}", f"--max_batch={max(levels)}", "--log_level=warning"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            while True:  # until /health answers
                if server.poll() is not None:
                    sys.exit(f"error: serve.py exited:\n{server.stdout.read()[-2000:]}")
                try:
                    urllib.request.urlopen(url + "/health", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.2)
            g = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(50257, (prompt_len,), generator=g).tolist() for _ in range(max(levels))]
            timed(url, prompts[:2], True)  # warm-up: first calls pay for allocation and kernel choice
            for c in levels:
                one = timed(url, prompts[:c], False)
                together = timed(url, prompts[:c], True)
                ttft = together[2]
                rows.append(dict(shape=shape, clients=c, tokens=one[0], one_at_a_time_tokens_per_s=one[0] / one[1],
                                 together_tokens_per_s=together[0] / together[1],
                                 speedup=(together[0] / together[1]) / (one[0] / one[1]),
                                 ttft_p50_s=percentile(ttft, 50), ttft_p95_s=percentile(ttft, 95)))
                r = rows[-1]
                print(f"serve: {shape} {c:>2} clients: one at a time {r['one_at_a_time_tokens_per_s']:,.1f} tokens/s, "
                      f"together {r['together_tokens_per_s']:,.1f} tokens/s ({r['speedup']:.2f}x), time to first "
                      f"token p50 {r['ttft_p50_s'] * 1000:,.0f} ms, p95 {r['ttft_p95_s'] * 1000:,.0f} ms", flush=True)
        finally:
            server.terminate()
            server.wait()

print(f"\nserve.py, {completion_tokens} greedy tokens per request after {prompt_len} prompt tokens, streamed "
      f"(block_size {block_size}, vocab {vocab_size}):")
print("| shape (L x H x C) | clients | one at a time (tokens/s) | together (tokens/s) | speedup | "
      "first token p50 / p95 (ms) |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['shape']} | {r['clients']} | {r['one_at_a_time_tokens_per_s']:,.1f} | "
          f"{r['together_tokens_per_s']:,.1f} | {r['speedup']:.2f}x | "
          f"{r['ttft_p50_s'] * 1000:,.0f} / {r['ttft_p95_s'] * 1000:,.0f} |")
if json_out:
    files.write_json(json_out, {"config": config, "machine": machine, "serve": rows})
    print(f"wrote {json_out}")
