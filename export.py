"""
Exports a nanoforge model to a Hugging Face folder that transformers loads as GPT2LMHeadModel:
config.json + model.safetensors, and the tokenizer files when the tokenizer is GPT-2's BPE (with the chat
tokens, if fine-tuning added them).

$ python export.py --out_dir=out-sft-gpt2 --to=hf --dest=exported
$ python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('exported')"

Only the GPT-2 architecture fits: learned absolute positions, LayerNorm, tanh GELU, pre-norm blocks,
tied embeddings, no QK-norm or logit cap (a model trained with pos_emb='rope', mlp='relu2', ... is refused
with the settings that differ). bias=False models are written with zero biases, which GPT-2 computes
to the same logits. For a character or trained-BPE tokenizer, transformers has no matching tokenizer
class: the folder gets the weights, config.json and nanoforge_tokenizer.json (the spec that nanoforge's
tokenizer.load_tokenizer reads), and a note says so.
"""
import os
import sys

import torch

from configurator import configure, knobs
from nanoforge import errors, files
from nanoforge.checkpoint import load_model
from nanoforge.errors import UserError
from nanoforge.tokenizer import _bytes_to_unicode, load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
out_dir = "out"  # the run to export (an out_dir or a checkpoint file)
to = "hf"  # the only format so far
dest = ""  # the folder to write; must not exist yet
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))
if to != "hf":
    raise UserError(f"--to={to}: only 'hf' (a Hugging Face GPT-2 folder) is supported")
if not dest:
    raise UserError("say where to write the folder: --dest=folder")
if os.path.exists(dest):
    raise UserError(f"{dest} already exists; pick a new --dest (nothing is overwritten)")

model, spec, _ = load_model(out_dir)
c = model.config
if c.not_gpt2():
    raise UserError(f"{out_dir} is not GPT-2's architecture ({', '.join(c.not_gpt2())}), so GPT2LMHeadModel cannot "
                    f"hold it; train with GPT-2's settings (the defaults) to export")


def gpt2_state_dict(model):
    """nanoforge's weights under GPT-2's names and layouts: the four projection matrices transposed into
    Conv1D's (in, out); the biases a bias=False model lacks written as zeros (the same function)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for k in list(sd):
        if k.endswith(transposed):
            sd[k] = sd[k].t().contiguous()
    if not model.config.bias:
        for k in list(sd):
            if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) or k.endswith(transposed):
                sd[k[:-len("weight")] + "bias"] = torch.zeros(sd[k].shape[-1] if k.endswith(transposed) else sd[k].shape[0])
    return sd


def gpt2_vocab_merges(tok):
    """GPT-2's vocab ({token text: id}) and merges ([(a, b), ...] in order) rebuilt from tiktoken's ranks:
    each merged token's two parts are what BPE makes of its bytes using only the merges learned before it.
    (They equal GPT-2's original encoder.json and vocab.bpe.)"""
    ranks = tok.enc._mergeable_ranks
    to_text = _bytes_to_unicode()
    text = {t: "".join(to_text[b] for b in t) for t in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            r, i = min(pairs)
            assert r < rank, f"token {token!r} is not a merge of earlier tokens"
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((text[parts[0]], text[parts[1]]))
    vocab = {text[t]: r for t, r in ranks.items()}
    vocab["<|endoftext|>"] = tok.eot_id
    return vocab, merges


from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402  (only now: the checks above are fast)

tok = load_tokenizer(spec)
gpt2_bpe = spec["kind"] == "gpt2"
eot = tok.eot_id if tok.eot_id is not None else 0
config = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                    n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    bos_token_id=eot, eos_token_id=eot, tie_word_embeddings=True)
hf = GPT2LMHeadModel(config)
missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
assert not missing and not unexpected, (missing[:3], unexpected[:3])

with files.atomic_folder(dest) as tmp:  # a half-written folder never replaces a good one
    hf.save_pretrained(tmp)
    if gpt2_bpe:
        from transformers import GPT2TokenizerFast
        vocab, merges = gpt2_vocab_merges(tok)
        hf_tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")
        added = spec.get("added", [])
        if added:  # in order, so they take the ids after GPT-2's 50,257, as they do here
            hf_tok.add_special_tokens({"additional_special_tokens": added})
        assert [hf_tok.convert_tokens_to_ids(t) for t in added] == [tok.special_tokens[t] for t in added]
        hf_tok.save_pretrained(tmp)
        note = "tokenizer: GPT-2's BPE" + (f" + {', '.join(added)}" if added else "")
    else:
        files.write_json(os.path.join(tmp, "nanoforge_tokenizer.json"), spec)
        note = (f"tokenizer: {spec['kind']} is not one transformers can load; wrote nanoforge_tokenizer.json "
                f"(read it with nanoforge's tokenizer.load_tokenizer) and no Hugging Face tokenizer files")
print(f"wrote {dest}: GPT2LMHeadModel, {c.n_layer} layers, {c.n_embd} wide, context {c.block_size}, "
      f"vocab {c.vocab_size}{'' if c.bias else ' (zero biases: trained without)'}; {note}")
