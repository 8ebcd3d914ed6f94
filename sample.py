"""
Samples text from a trained model, streaming it to stdout as it is generated.

$ python sample.py --out_dir=out-shakespeare-char-cpu   # the quick start's model (-sprint: the sprint's)
$ python sample.py --init_from=gpt2 --start="What is the answer to life?" --max_new_tokens=100
$ python sample.py --init_from=path/to/hf_gpt2_folder --start=FILE:prompt.txt --top_p=0.9

A chat with a model fine-tuned by finetune.py: type a message per line, the reply streams back; the whole
conversation is rendered with the template it was trained on (nanoforge.chat_template.render). Ctrl-D ends it.
$ python sample.py --out_dir=out-sft-shop --chat
$ printf 'Where is my lamp?\nThanks!\n' | python sample.py --out_dir=out-sft-shop --chat   # scripted

The tokenizer comes from the checkpoint's metadata (a character vocabulary, GPT-2's BPE, ...).
"""
import json
import sys

import torch

from configurator import configure, knobs
from nanoforge import errors, files, hardware
from nanoforge.chat_template import CHAT_TOKENS, render
from nanoforge.checkpoint import load_model
from nanoforge.errors import UserError
from nanoforge.quantize import decoding_weights
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (the checkpoint in out_dir), a GPT-2 name, a HF folder or a checkpoint file
out_dir = "out"  # used when init_from='resume'
start = "\n"  # the prompt; or "FILE:prompt.txt" to read it from a file
num_samples = 3
max_new_tokens = 500
temperature = 0.8  # 1.0 samples the model's distribution; lower is more conservative; 0 is greedy
top_k = 200  # keep only the top_k most likely tokens (0 or None: all; 1: greedy)
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens holding top_p of the probability
use_kv_cache = True
stop_at_eot = True  # end a sample at the end-of-text token, if the tokenizer has one
seed = 1337
samples_file = ""  # also write the samples here, one JSON line each ({"prompt", "text"})
device = "auto"
dtype = "auto"
compile = False
quantize = "none"  # 'bf16' or 'int8': the Linear layers' and head's weights in 2 or 1 bytes (nanoforge/quantize.py)
chat = False  # interactive multi-turn chat on stdin/stdout (a model from finetune.py)
system = ""  # chat: an optional system message opening the conversation
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))

device, _ = hardware.resolve_device(device)
if not 0.0 < top_p <= 1.0:
    raise UserError(f"top_p must be in (0, 1], got {top_p}")
if temperature < 0:
    raise UserError(f"temperature must be >= 0, got {temperature}")

model, tok_spec, meta = load_model(out_dir if init_from == "resume" else init_from, map_location=device)
model = decoding_weights(model.eval().to(device), quantize)
# decoding multiplies one row at a time: the precision is measured at that shape (bf16 rarely pays there)
dtype, _ = hardware.resolve_dtype(dtype, device, (1, model.config.n_embd))
if compile:  # pays for its compile (~6 s; ~35 s with inductor's cache cold) on long generations (dev/LOG.md)
    hardware.compile_decoding(model)
tok = load_tokenizer(tok_spec)

generator = torch.Generator(device=device).manual_seed(seed)


def stream(ids, stops):
    """Generates after ids, writing the text to stdout as it comes, until a token in `stops`; returns the
    new ids (without the stop)."""
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    out, pending = [], []  # pending: BPE ids whose bytes do not yet form whole UTF-8 characters
    with hardware.autocast(device, dtype):
        for nxt in model.generate_stream(x, max_new_tokens, temperature, top_k or None, top_p, use_kv_cache,
                                         None, generator):
            i = nxt.item()
            if i in stops:
                break
            out.append(i)
            pending.append(i)
            text = tok.decode(pending)
            if "\ufffd" not in text:  # a multi-byte character split across tokens waits for its rest
                sys.stdout.write(text)
                sys.stdout.flush()
                pending = []
    sys.stdout.write(tok.decode(pending))
    return out


if chat:
    if any(t not in tok.special_tokens for t in CHAT_TOKENS):
        raise UserError("this model has no chat tokens (<|user|>, <|assistant|>, ...): fine-tune it for chat "
                        "with finetune.py first, or sample it without --chat")
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        sys.stdout.write("user> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            sys.stdout.write("\n")
            break
        if not line.strip():
            continue
        try:
            ids, _ = render(tok, messages + [{"role": "user", "content": line.rstrip("\n")}], add_generation_prompt=True)
        except UserError as e:  # e.g. a character a character-level model does not know: say so, go on
            print(f"error: {e}")
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        if len(ids) > model.config.block_size:
            print(f"(note: the conversation is {len(ids)} tokens; the model sees its last {model.config.block_size})")
        sys.stdout.write("assistant> ")
        # a reply ends at <|end|>, or at any other special token (a weak model may open a new turn instead)
        reply = stream(ids, set(tok.special_tokens.values()))
        messages.append({"role": "assistant", "content": tok.decode(reply)})
        sys.stdout.write("\n")
    sys.exit(0)

start = files.text_arg(start, "prompt")
start_ids = tok.encode(start)
if not start_ids:  # an empty prompt: begin a fresh document
    if tok.eot_id is None:
        raise UserError("the prompt is empty and this tokenizer has no end-of-text token to start from; pass --start")
    start_ids = [tok.eot_id]
if len(start_ids) > model.config.block_size:
    print(f"note: the prompt is {len(start_ids)} tokens; the model sees its last {model.config.block_size}",
          file=sys.stderr)

if busy := hardware.busy_line(device):
    print(busy, file=sys.stderr)
samples = []
for k in range(num_samples):
    sys.stdout.write(start)
    samples.append({"prompt": start, "text": tok.decode(stream(start_ids, {tok.eot_id} if stop_at_eot else set()))})
    sys.stdout.write("\n---------------\n")
    sys.stdout.flush()
if samples_file:
    with files.atomic_path(samples_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(sample) + "\n" for sample in samples)
