"""
Decoding speed of one set of weights in every engine at hand, in one run: nanoforge in float32, with
bfloat16 and with int8 weights (--quantize=none, bf16 and int8 of sample.py and serve.py: on a CPU all
multiply through nanoforge/cpu_kernels.c), nanoforge-torch (float32 on torch's matmuls alone: the reference
the kernels are held to), transformers' stock class on the same weights, and llama.cpp's llama-bench on them
exported to GGUF (f32, f16 and q8_0) when llama-bench is on PATH or in $LLAMA_CPP_BIN, and nanoforge-compiled and
nanoforge-int8-compiled (sample.py --compile: the decoding step compiled, ~6 s each with inductor's cache
warm, ~35 s cold, not timed).
Batch 1, greedy, after a short prompt, counting the decoding steps after the prompt's prefill (as
llama-bench's tg does); random weights unless init_from (speed does not depend on what a model learned).
The engines take turns, repeat after repeat, so a machine whose speed drifts moves them all alike; each row
gives its median. Ratios are against nanoforge float32 and, for nanoforge's rows, against llama.cpp at the
same precision (the median of each repeat's own ratio, with their range), and nanoforge's rows give the rate
its weights were read at beside the machine's measured copy bandwidth; the machine line comes first.

    python bench_decode.py                                # GPT-2-124M shape with GPT-2's vocabulary
    python bench_decode.py --init_from=out-shakespeare-char-cpu --gen_tokens=256
    LLAMA_CPP_BIN=~/llama.cpp/build/bin python bench_decode.py --json_out=decode.json
"""
import copy
import json
import os
import statistics
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
engines = ('nanoforge,nanoforge-bf16,nanoforge-int8,nanoforge-compiled,nanoforge-int8-compiled,nanoforge-torch,'
           'transformers,llama.cpp-f32,llama.cpp-f16,llama.cpp-q8_0')  # those to run, when present
seed = 1337
json_out = ''
# -----------------------------------------------------------------------------------------------------
config = configure(knobs(globals()), sys.argv[1:])
globals().update(config)
check_ranges(config, {**{k: POSITIVE_INT for k in ('prompt_len', 'repeats')},
                      'gen_tokens': (lambda v: v >= 2, "an int >= 2 (the rate counts the steps after the first)")})
wanted = [e for e in engines.split(',') if e]
known = ('nanoforge', 'nanoforge-bf16', 'nanoforge-int8', 'nanoforge-torch', 'transformers', 'llama.cpp-f32',
         'llama.cpp-f16', 'llama.cpp-q8_0', 'nanoforge-compiled', 'nanoforge-bf16-compiled',
         'nanoforge-int8-compiled')  # the last three: sample.py --compile (~6 s to compile each; ~35 s cold)
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


# Each engine is a function of n returning (tokens/s, the n new ids or None): the rate counts the n - 1
# decoding steps after the first new token, as llama-bench's tg does (it decodes with no prompt), so a
# prompt's prefill is in no engine's rate.

def ours(m):
    def generate(n):
        ids, times = [], []
        for nxt in m.generate_stream(prompt, n, top_k=1):
            ids.append(nxt.item())
            times.append(time.perf_counter())
        return (n - 1) / (times[-1] - times[0]), ids
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


def llama_bench(gguf_type, folder):
    """llama.cpp's own benchmark on our weights exported to GGUF in folder: an engine whose run is one of
    llama-bench's, n tokens generated (no prompt); None without llama-bench."""
    found = gguf_format.llama_cpp_program("llama-bench")
    if not found:
        return None
    path = os.path.join(folder, f"model-{gguf_type}.gguf")
    gguf_format.write(model, tok, path, gguf_type)
    def generate(n):
        out = subprocess.run([found, "-m", path, "-p", "0", "-n", str(n), "-t", str(torch.get_num_threads()),
                              "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
        return json.loads(out)[0]["avg_ts"], None
    return generate


def transformers_engine():
    hf, kind = hf_format.to_hf(model, [])
    def generate(n):
        clock = Clock()
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              streamer=clock)
        return (n - 1) / (clock.times[-1] - clock.times[1]), out[0, prompt_len:].tolist()
    return generate, hf_format.HF_CLASS[kind]


def quantize_of(engine):
    """The --quantize a nanoforge engine's name stands for."""
    return next((q for q in ('int8', 'bf16') if q in engine), 'none')


engines, results, tmp = {}, {}, tempfile.TemporaryDirectory()
for engine in wanted:
    if engine.startswith('nanoforge'):
        m = decoding_weights(copy.deepcopy(model), quantize_of(engine)) if engine != 'nanoforge-torch' else model
        if engine.endswith('-compiled'):
            hardware.compile_decoding(m)  # compiled by the warm-up run below: the compile is not in the rate
        engines[engine], results[engine] = ours(m), {"weight_bytes": weight_bytes(m)}
    elif engine == 'transformers':
        engines[engine], hf_class = transformers_engine()
        results[engine] = {"class": hf_class}
    elif (generate := llama_bench(engine.split('-')[1], tmp.name)) is not None:
        engines[engine], results[engine] = generate, {}
    else:
        print(f"{engine}: llama-bench is not on PATH or in $LLAMA_CPP_BIN: skipped")

# every engine once untimed (warm caches, compiles), then the repeats in turn, engine after engine: a machine
# whose speed drifts (a shared host) moves them all alike, and each repeat's ratios are taken within it
rates, ids = {e: [] for e in engines}, {}
for engine, generate in engines.items():
    if not engine.startswith('llama.cpp'):  # llama-bench warms up itself
        generate(4)
for _ in range(repeats):
    for engine, generate in engines.items():
        rate, ids[engine] = generate(gen_tokens)
        rates[engine].append(rate)
tmp.cleanup()


reference = ids.get('nanoforge')
for engine, r in results.items():
    r["tokens_per_s"] = statistics.median_high(rates[engine])
    r["tokens_per_s_repeats"] = rates[engine]  # in the order run: a host whose speed jumps shows here
    r["same_tokens"] = hf_format.leading_agreement(ids[engine], reference) \
        if ids[engine] is not None and reference is not None and engine != 'nanoforge' else None
    if "weight_bytes" in r:
        r["weight_gb_s"] = r["tokens_per_s"] * r.pop("weight_bytes") / 1e9
    peer = f"llama.cpp-{gguf_format.AT_QUANTIZE[quantize_of(engine)]}"
    if engine.startswith('nanoforge') and peer in rates:  # the median of the repeats' own ratios
        own = [a / b for a, b in zip(rates[engine], rates[peer])]
        r["vs_llama_cpp"], r["vs_llama_cpp_range"] = statistics.median_high(own), [min(own), max(own)]
        r["llama_cpp_peer"] = peer

base = results.get('nanoforge', {}).get('tokens_per_s')
for engine, r in results.items():
    agree = "" if r["same_tokens"] is None else f", its first {r['same_tokens']} of {gen_tokens} greedy tokens equal to nanoforge's"
    ratio = f" ({r['tokens_per_s'] / base:.2f}x nanoforge float32)" if base and engine != 'nanoforge' else ""
    peer = f", {r['vs_llama_cpp']:.2f}x llama.cpp's {r['llama_cpp_peer'].split('-')[1]}" if "vs_llama_cpp" in r else ""
    if peer and repeats > 1:  # the spread of the repeats' own ratios: how far one median can be trusted
        peer += " ({:.2f}-{:.2f}x in {} repeats)".format(*r["vs_llama_cpp_range"], repeats)
    read = f", weights read at {r['weight_gb_s']:.1f} GB/s" if "weight_gb_s" in r else ""
    print(f"{engine:>23}: {r['tokens_per_s']:7.1f} tokens/s{ratio}{peer}{read}{agree}")
print(f"(the machine copies memory at {machine['memory_gb_s']:.1f} GB/s)")
if json_out:
    files.write_json(json_out, {"config": config, "machine": machine, "results": results})
    print(f"wrote {json_out}")
