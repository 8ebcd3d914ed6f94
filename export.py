"""
Exports a nanoforge model so the rest of the ecosystem runs it: a Hugging Face folder (--to=hf) that
transformers loads with its stock classes, no trust_remote_code, or a GGUF file (--to=gguf) for llama.cpp,
Ollama and LM Studio. The tokenizer (with the chat tokens fine-tuning added) and the chat template travel
with the weights.

$ python export.py --out_dir=out-shakespeare-char-cpu --dest=exported
$ python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"
$ python export.py --out_dir=out-shop-chat --to=gguf --dest=shop.gguf --gguf_type=q8_0
$ python sample.py --init_from=exported          # and back: sample.py, serve.py, finetune.py read the folder

Which stock class holds which architecture (GPT-2's block -> GPT2LMHeadModel; the modern block ->
Apertus, Arcee, Qwen3 or Llama, by mlp and qk_norm) is nanoforge/hf_format.py's table; what no stock class
computes is refused with the setting and the nearest exportable value. The GGUF side is nanoforge/gguf_format.py.
"""
import os
import sys

from configurator import configure, knobs
from nanoforge import errors, files, hf_format
from nanoforge.checkpoint import load_model
from nanoforge.errors import UserError
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
out_dir = "out"  # the run to export (an out_dir, a checkpoint file or an exported folder)
to = "hf"  # 'hf' (a Hugging Face folder) or 'gguf' (one file for llama.cpp, Ollama, LM Studio)
dest = ""  # the folder (hf) or file (gguf) to write; must not exist yet
gguf_type = "f16"  # the GGUF's matrix type: 'f32', 'f16' or 'q8_0' (8-bit, a quarter of f32's size)
check = True  # hf: load the folder back with transformers and compare it with the model (nanoforge_check.json)
check_prompt = "Once upon a time"  # the check's prompt (a vocabulary that lacks its characters uses its own first ones)
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))
if to not in ("hf", "gguf"):
    raise UserError(f"--to={to}: use 'hf' (a Hugging Face folder) or 'gguf' (a file for llama.cpp)")
if to == "gguf":
    from nanoforge import gguf_format
    gguf_format.check_type(gguf_type)
if not dest:
    raise UserError(f"say where to write the {'folder' if to == 'hf' else 'file'}: --dest=...")
modelfile = os.path.splitext(dest)[0] + ".Modelfile"  # Ollama's, beside a GGUF
for path in [dest] + ([modelfile] if to == "gguf" else []):
    if os.path.exists(path):
        raise UserError(f"{path} already exists; pick a new --dest (nothing is overwritten)")

model, spec, _ = load_model(out_dir)
model.eval()
c = model.config
kind = hf_format.family(c)  # refuses, in one line, what no stock class computes
tok = load_tokenizer(spec)
what = f"{c.n_layer} layers, {c.n_embd} wide, context {c.block_size}, vocab {c.vocab_size}, tokenizer {spec['kind']}"
what += f" + {', '.join(spec['added'])}" if spec.get("added") else ""
ends = hf_format.end_ids(tok)

if to == "hf":
    hf, _ = hf_format.to_hf(model, ends)
    with files.atomic_folder(dest) as tmp:  # a half-written folder never replaces a good one
        hf.save_pretrained(tmp)
        hf_format.write_tokenizer(tok, tmp)
        if ends:
            from transformers import GenerationConfig
            GenerationConfig(eos_token_id=ends).save_pretrained(tmp)
        if check:
            try:
                tok.encode(check_prompt)
            except UserError:  # e.g. a character vocabulary without these letters
                check_prompt = tok.decode(list(range(min(10, tok.vocab_size))))
            result = hf_format.check_folder(model, tok, tmp, check_prompt)
            files.write_json(os.path.join(tmp, "nanoforge_check.json"), result)
    print(f"wrote {dest}: {hf_format.HF_CLASS[kind]}, {what}")
    if check:
        print(f"check: transformers' logits within {result['max_logit_diff']:.1e} of ours on {check_prompt!r}, "
              f"{result['greedy_equal']} of {result['greedy_tokens']} greedy tokens equal, prompt ids "
              f"{'the same' if result['same_prompt_ids'] else 'DIFFERENT'}")
else:
    with files.atomic_path(dest) as tmp:
        arch = gguf_format.write(model, tok, tmp, gguf_type, name=os.path.basename(os.path.normpath(out_dir)))
    with files.atomic_path(modelfile) as tmp, open(tmp, "w") as f:
        f.write(gguf_format.modelfile(os.path.basename(dest), tok))
    print(f"wrote {dest}: llama.cpp architecture {arch}, {gguf_type}, {what}; and {modelfile} "
          f"(ollama create NAME -f {modelfile})")
    if not ends:
        print("note: this tokenizer has no end-of-text token, so the GGUF has one that only ends a generation when "
              "every other logit is below 0; llama.cpp's --ignore-eos gives exactly sample.py's distribution")
