"""
Serving under load: starts serve.py (random weights, GPT-2's tokenizer) for each model shape and streams
the same greedy completions from N clients, one at a time and then all at once; reports tokens/s of each
and their ratio, which is what continuous batching buys; and the time to first token (p50, p95) of the
clients that came together, which batched prefill keeps near one client's.

With llama.cpp's llama-server in $LLAMA_CPP_BIN or on PATH, the same weights are also served by it (exported
to GGUF: f32, f16 beside --quantize=bf16, q8_0 beside int8; as many slots as clients, each block_size long, continuous
batching) and asked the same, the two servers taking turns at every level of clients; serve.py's rows then
give their rate against llama-server's at the same level.

    python bench_serve.py --vocab_size=50304                     # 4x4x256 and 12x12x768, at 1, 4, 16 clients
    python bench_serve.py --shapes=4x4x256 --clients="1 8" --completion_tokens=64 --json_out=serve.json
    LLAMA_CPP_BIN=~/llama.cpp/build/bin python bench_serve.py --shapes=12x12x768 --vocab_size=50304 --quantize=int8

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
from nanoforge import errors, files, gguf_format, hardware
from nanoforge.checkpoint import save_checkpoint
from nanoforge.tokenizer import load_tokenizer

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
quantize = "none"  # serve.py's: 'bf16' or 'int8' serves weights in 2 or 1 bytes
compile = False  # serve.py's: compile the decode step (its compile, before serving, is not timed)
engines = "serve.py,llama-server"  # the servers to run, in turn; llama-server only when it is found
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
wanted = [e for e in engines.split(",") if e]
if not wanted or set(wanted) - {"serve.py", "llama-server"}:
    raise errors.UserError(f"engines must be serve.py, llama-server or both, separated by ','; got {engines!r}")
llama_server = gguf_format.llama_cpp_program("llama-server") if "llama-server" in wanted else None
if "llama-server" in wanted and not llama_server:
    if wanted == ["llama-server"]:
        raise errors.UserError("llama-server is not in $LLAMA_CPP_BIN or on PATH: build llama.cpp and point "
                               "LLAMA_CPP_BIN at the folder that holds it, or leave it out of --engines")
    print("llama-server: not in $LLAMA_CPP_BIN or on PATH: skipped")
    wanted.remove("llama-server")
gguf_type = gguf_format.AT_QUANTIZE.get(quantize, "f32")  # beside serve.py's (which refuses a bad one)
machine = hardware.machine_line(hardware.resolve_device(device)[0])


def stream(url, prompt, extra):
    """One greedy streamed completion, read to [DONE]: (its completion tokens, from the usage chunk; seconds
    from sending the request to its first chunk, the time to first token). extra: more fields of the body."""
    t0, first = time.perf_counter(), None
    body = json.dumps({"prompt": prompt, "max_tokens": completion_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}, **extra}).encode()
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


def timed(url, prompts, together, extra):
    """(completion tokens of all, seconds from the first request to the last [DONE], each one's time to
    first token)."""
    used = [(0, None)] * len(prompts)
    t0 = time.perf_counter()
    if together:
        threads = [threading.Thread(target=lambda i=i: used.__setitem__(i, stream(url, prompts[i], extra)))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        used = [stream(url, p, extra) for p in prompts]
    return sum(u for u, _ in used), time.perf_counter() - t0, [f for _, f in used]


def percentile(xs, q):
    """The q-th percentile (0-100) of xs, nearest rank: of 16 times, p95 is the 16th, p50 the 8th."""
    xs = sorted(xs)
    return xs[max(0, -(-len(xs) * q // 100) - 1)]


def start(cmd, url, log_path):
    """Starts a server, its output to log_path; returns it once its /health answers 200 (llama-server's
    answers 503 while it loads)."""
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()  # the child has its own copy
    while True:
        if server.poll() is not None:
            with open(log_path) as f:
                sys.exit(f"error: {os.path.basename(cmd[0])} exited:\n{f.read()[-2000:]}")
        try:
            urllib.request.urlopen(url + "/health", timeout=1).read()
            return server
        except OSError:
            time.sleep(0.2)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -----------------------------------------------------------------------------------------------------
# each shape: a checkpoint of random weights (and its GGUF), the servers on free ports, then every level of
# clients, each server in turn: a machine whose speed drifts moves both alike
serve_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
# llama-server fills a slot's KV cache again for a prompt it has seen unless told not to; serve.py keeps no
# prompts, and the levels ask the same prompts again
extras = {"serve.py": {}, "llama-server": {"cache_prompt": False}}
rows = []
for shape, (L, H, C) in dims.items():
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=block_size, vocab_size=vocab_size))
    with tempfile.TemporaryDirectory() as tmp:
        commands = {}
        if "serve.py" in wanted:
            save_checkpoint(os.path.join(tmp, "ckpt.pt"), model, {"tokenizer": {"kind": "gpt2"}})
            commands["serve.py"] = lambda port: [
                sys.executable, serve_py, f"--out_dir={tmp}", f"--port={port}", f"--device={device}", f"--dtype={dtype}",
                f"--quantize={quantize}", f"--compile={compile}", f"--max_batch={max(levels)}", "--log_level=warning"]
        if "llama-server" in wanted:
            gguf = os.path.join(tmp, f"model-{gguf_type}.gguf")
            gguf_format.write(model, load_tokenizer({"kind": "gpt2"}), gguf, gguf_type)
            commands["llama-server"] = lambda port: [
                llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(torch.get_num_threads()),
                "-np", str(max(levels)), "-c", str(max(levels) * block_size), "-cb"]
        del model
        servers, urls = {}, {}
        try:
            for engine, command in commands.items():
                port = free_port()
                urls[engine] = f"http://127.0.0.1:{port}"
                servers[engine] = start(command(port), urls[engine], os.path.join(tmp, f"{engine}.log"))
            g = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(50257, (prompt_len,), generator=g).tolist() for _ in range(max(levels))]
            for engine, url in urls.items():
                timed(url, prompts[:2], True, extras[engine])  # warm-up: first calls pay for allocation, kernel choice
            for c in levels:
                for engine, url in urls.items():
                    one = timed(url, prompts[:c], False, extras[engine])
                    together = timed(url, prompts[:c], True, extras[engine])
                    ttft = together[2]
                    rows.append(dict(engine=engine, shape=shape, clients=c, tokens=one[0],
                                     one_at_a_time_tokens_per_s=one[0] / one[1],
                                     together_tokens_per_s=together[0] / together[1],
                                     speedup=(together[0] / together[1]) / (one[0] / one[1]),
                                     ttft_p50_s=percentile(ttft, 50), ttft_p95_s=percentile(ttft, 95)))
                    r = rows[-1]
                    print(f"{engine}: {shape} {c:>2} clients: one at a time {r['one_at_a_time_tokens_per_s']:,.1f} "
                          f"tokens/s, together {r['together_tokens_per_s']:,.1f} tokens/s ({r['speedup']:.2f}x), "
                          f"time to first token p50 {r['ttft_p50_s'] * 1000:,.0f} ms, p95 {r['ttft_p95_s'] * 1000:,.0f} ms",
                          flush=True)
                if len(urls) == 2:  # serve.py's rates against llama-server's, both ways of asking
                    mine, theirs = rows[-2], rows[-1]
                    mine["vs_llama_server"] = {k: mine[k] / theirs[k] for k in
                                               ("one_at_a_time_tokens_per_s", "together_tokens_per_s")}
        finally:
            for server in servers.values():
                server.terminate()
                server.wait()

both = "llama-server" in wanted and "serve.py" in wanted  # serve.py's rows then give their ratios to it
peer = f", llama-server on the same weights in GGUF {gguf_type}" if "llama-server" in wanted else ""
print(f"\n{' and '.join(wanted)}, {completion_tokens} greedy tokens per request after {prompt_len} prompt tokens, "
      f"streamed (block_size {block_size}, vocab {vocab_size}{peer}):")
print("| server | shape (L x H x C) | clients | one at a time (tokens/s) | together (tokens/s) | speedup | "
      "first token p50 / p95 (ms) |" + (" vs llama-server (one / together) |" if both else ""))
print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if both else ""))
for r in rows:
    vs = r.get("vs_llama_server")
    vs = f" {vs['one_at_a_time_tokens_per_s']:.2f}x / {vs['together_tokens_per_s']:.2f}x |" if vs else " |" if both else ""
    print(f"| {r['engine']} | {r['shape']} | {r['clients']} | {r['one_at_a_time_tokens_per_s']:,.1f} | "
          f"{r['together_tokens_per_s']:,.1f} | {r['speedup']:.2f}x | "
          f"{r['ttft_p50_s'] * 1000:,.0f} / {r['ttft_p95_s'] * 1000:,.0f} |{vs}")
if json_out:
    files.write_json(json_out, {"config": config, "machine": machine, "serve": rows})
    print(f"wrote {json_out}")
