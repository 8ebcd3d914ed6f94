"""
Decoding speed of one set of weights in every engine at hand, in one run: nanoforge in float32 and with
int8 weights (--quantize=none and int8 of sample.py and serve.py: on a CPU both multiply through
nanoforge/cpu_kernels.c), nanoforge-torch (float32 on torch's matmuls alone: the reference the kernels
are held to), transformers' stock class on the same weights, and llama.cpp's llama-bench on them exported
to GGUF (f32 and q8_0) when llama-bench is on PATH or in $LLAMA_CPP_BIN; on request, nanoforge-compiled
and nanoforge-int8-compiled (sample.py --compile: the decoding step compiled, the compile not timed).
Batch 1, greedy, after a short prompt, counting the decoding steps after the prompt's prefill (as llama-bench's
tg does); random weights unless init_from (speed does not depend on what a
model learned). Ratios are against nanoforge float32, and nanoforge's rows give the rate
its weights were read at beside the machine's measured copy bandwidth; the machine line comes first.

    python bench_decode.py                                # GPT-2-124M shape with GPT-2's vocabulary
    python bench_decode.py --init_from=out-shakespeare-char-cpu --gen_tokens=256
    LLAMA_CPP_BIN=~/llama.cpp/build/bin python bench_decode.py --json_out=decode.json
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from configurator import POSITIVE_INT, check_ranges, configure, knobs
from model import GPT, GPTConfig
from nanoforge import errors, files, gguf_format, hardware, hf_format
from nanoforge.checkpoint import load_model
from nanoforge import cpu_kernels
from nanoforge.quantize import CPULinear, Int8Linear, decoding_weights
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
n_layer, n_head, n_embd, block_size, vocab_size = 12, 12, 768, 1024, 50257  # GPT-2-124M (ignored with init_from)
init_from = ''  # '': random weights of that shape with GPT-2's tokenizer; or an out_dir, checkpoint or HF folder
gen_tokens = 128  # new tokens a run (the rate counts the gen_tokens - 1 after the first)
prompt_len = 16
repeats = 3  # timed runs of each engine: the median is reported
engines = 'nanoforge,nanoforge-int8,nanoforge-torch,transformers,llama.cpp-f32,llama.cpp-q8_0'  # those to run, when present
seed = 1337
json_out = ''
# -----------------------------------------------------------------------------------------------------
config = configure(knobs(globals()), sys.argv[1:])
globals().update(config)
check_ranges(config, {**{k: POSITIVE_INT for k in ('prompt_len', 'repeats')},
                      'gen_tokens': (lambda v: v >= 2, "an int >= 2 (the rate counts the steps after the first)")})
wanted = [e for e in engines.split(',') if e]
known = ('nanoforge', 'nanoforge-int8', 'nanoforge-torch', 'transformers', 'llama.cpp-f32', 'llama.cpp-q8_0',
         'nanoforge-compiled', 'nanoforge-int8-compiled')  # the last two: sample.py --compile (~1 min to compile each)
if unknown := [e for e in wanted if e not in known]:
    raise errors.UserError(f"engines: {unknown[0]!r} is not one of {', '.join(known)}")

machine = hardware.machine_line('cpu')
torch.manual_seed(seed)
if init_from:
    model, tok_spec, _ = load_model(init_from)
else:
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                          vocab_size=vocab_size, bias=True))
    tok_spec = {"kind": "gpt2"}
model.eval()
tok = load_tokenizer(tok_spec)
prompt = torch.randint(min(tok.vocab_size, model.config.vocab_size), (1, prompt_len),
                       generator=torch.Generator().manual_seed(seed))  # (1, prompt_len)
print(f"model: {model.get_num_params() / 1e6:.1f}M parameters, {model.config.n_layer} layers, "
      f"{model.config.n_embd} wide, vocab {model.config.vocab_size}; {gen_tokens} new tokens after {prompt_len}, "
      f"batch 1, greedy, {torch.get_num_threads()} threads; nanoforge multiplies on {cpu_kernels.status()}")


def timed(generate):
    """(median tokens/s over repeats, the last run's new ids). generate(n) returns (n new ids, the seconds from
    the first new token to the last): the rate counts the n - 1 decoding steps after the prompt's prefill,
    as llama-bench's tg does (it decodes with no prompt). A short untimed run first warms it up."""
    generate(4)
    rates, ids = [], None
    for _ in range(repeats):
        ids, seconds = generate(gen_tokens)
        rates.append((gen_tokens - 1) / seconds)
    return sorted(rates)[len(rates) // 2], ids


def ours(m):
    def generate(n):
        ids, times = [], []
        for nxt in m.generate_stream(prompt, n, top_k=1):
            ids.append(nxt.item())
            times.append(time.perf_counter())
        return ids, times[-1] - times[0]
    return generate


class Clock:
    """A transformers streamer that notes when each new token arrives (put gets the prompt first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def weight_bytes(m):
    """Bytes of the matrices a token multiplies by (every Linear and the head; the embedding is looked up):
    what decoding one token must read, at the least."""
    mats = {}
    for x in m.modules():
        if isinstance(x, (torch.nn.Linear, CPULinear, Int8Linear)):
            w = x.packed_weight if isinstance(x, CPULinear) and x.packed else x.weight  # what the products read
            mats[id(w)] = w
    return sum(w.numel() * w.element_size() for w in mats.values())


def llama_bench(gguf_type):
    """llama.cpp's own benchmark on our weights in GGUF: its tokens/s for gen_tokens generated (no prompt)."""
    found = shutil.which("llama-bench", path=os.environ.get("LLAMA_CPP_BIN") or None)
    if not found:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        gguf_format.write(model, tok, path, gguf_type)
        out = subprocess.run([found, "-m", path, "-p", "0", "-n", str(gen_tokens), "-t", str(torch.get_num_threads()),
                              "-r", str(repeats), "-o", "json"], capture_output=True, text=True, check=True).stdout
    return {"tokens_per_s": json.loads(out)[0]["avg_ts"], "same_tokens": None}


results, reference = {}, None
for engine in wanted:
    if engine == 'nanoforge':
        fp32 = decoding_weights(copy.deepcopy(model), "none")
        rate, reference = timed(ours(fp32))
        results[engine] = {"tokens_per_s": rate, "same_tokens": None,  # the reference the others are held to
                           "weight_gb_s": rate * weight_bytes(fp32) / 1e9}
    elif engine in ('nanoforge-int8', 'nanoforge-torch', 'nanoforge-compiled', 'nanoforge-int8-compiled'):
        m = decoding_weights(copy.deepcopy(model), "int8" if 'int8' in engine else "none") if engine != 'nanoforge-torch' else model
        if engine.endswith('-compiled'):
            hardware.compile_decoding(m)  # timed() warms it up: the compile is not in the rate
        rate, ids = timed(ours(m))
        results[engine] = {"tokens_per_s": rate, "same_tokens": hf_format.leading_agreement(ids, reference)
                           if reference else None, "weight_gb_s": rate * weight_bytes(m) / 1e9}
    elif engine == 'transformers':
        hf, kind = hf_format.to_hf(model, [])
        def hf_generate(n):
            clock = Clock()
            with torch.no_grad():
                out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  streamer=clock)
            return out[0, prompt_len:].tolist(), clock.times[-1] - clock.times[1]
        rate, ids = timed(hf_generate)
        results[engine] = {"tokens_per_s": rate, "same_tokens": hf_format.leading_agreement(ids, reference)
                           if reference else None, "class": hf_format.HF_CLASS[kind]}
    elif (r := llama_bench(engine.split('-')[1])) is not None:
        results[engine] = r
    else:
        print(f"{engine}: llama-bench is not on PATH or in $LLAMA_CPP_BIN: skipped")

base = results.get('nanoforge', {}).get('tokens_per_s')
for engine, r in results.items():
    agree = "" if r["same_tokens"] is None else f", its first {r['same_tokens']} of {gen_tokens} greedy tokens equal to nanoforge's"
    ratio = f" ({r['tokens_per_s'] / base:.2f}x nanoforge float32)" if base and engine != 'nanoforge' else ""
    read = f", weights read at {r['weight_gb_s']:.1f} GB/s" if "weight_gb_s" in r else ""
    print(f"{engine:>23}: {r['tokens_per_s']:7.1f} tokens/s{ratio}{read}{agree}")
print(f"(the machine copies memory at {machine['memory_gb_s']:.1f} GB/s)")
if json_out:
    files.write_json(json_out, {"config": config, "machine": machine, "results": results})
    print(f"wrote {json_out}")
