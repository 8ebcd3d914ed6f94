"""
Our models as Hugging Face folders, and back: which stock transformers class computes each architecture
train.py builds, the weights under that class's names, and the tokenizer files (tokenizer.json, the chat
template, generation_config.json) that make a folder usable on its own. export.py writes folders with it;
checkpoint.load_model reads them back. GGUF (gguf_format.py) reuses the class choice and the tokenizer.

    GPT-2's block (learned positions, LayerNorm, GELU, tied)  -> GPT2LMHeadModel
    the modern block (rope, rmsnorm, bias=False, no softcap):
        mlp='relu2', qk_norm=True                              -> ApertusForCausalLM (hidden_act relu2)
        mlp='relu2', qk_norm=False                             -> ArceeForCausalLM
        mlp='swiglu', qk_norm=True                             -> Qwen3ForCausalLM
        mlp='swiglu', qk_norm=False                            -> LlamaForCausalLM

Each was checked, logits against logits (tests/test_export.py), to compute what model.py computes:
pre-norm blocks, RMSNorm with a gain and eps 1e-5, QK-norm per head before the rotation, rotary base
10000, no norm after the embedding, the head tied or not as trained. Two layouts
differ and are converted here: our rotary pairs channels (2i, 2i+1) of a head, theirs (i, i + hs/2), so
the query and key rows of every head are permuted (scores are unchanged: q and k move alike); our QK-norm
has no gain, theirs has one, written as ones. NanoChatForCausalLM was the first candidate but normalises
the embeddings before the first block and has no norm gains, which model.py does not do.
"""
import json
import os
import shutil

import torch

from nanoforge import chat_template
from nanoforge.errors import UserError
from nanoforge.files import REPO, write_json
from nanoforge.tokenizer import CharTokenizer, UnigramTokenizer, _bytes_to_unicode

# the modern block that stock classes compute, and the class for each (mlp, qk_norm)
MODERN = dict(pos_emb="rope", norm="rmsnorm", bias=False, logit_softcap=0.0)
CLASSES = {("relu2", True): "apertus", ("relu2", False): "arcee", ("swiglu", True): "qwen3", ("swiglu", False): "llama"}
HF_CLASS = dict(gpt2="GPT2LMHeadModel", apertus="ApertusForCausalLM", arcee="ArceeForCausalLM",
                qwen3="Qwen3ForCausalLM", llama="LlamaForCausalLM")
SPEC_FILE = "nanoforge_tokenizer.json"  # our tokenizer's description, so a folder comes back unchanged
ROPE_BASE = 10000.0  # model.py's Rotary default
EPS = 1e-5  # model.py's norms


def family(config):
    """The stock architecture (a key of HF_CLASS) that computes this model, or a UserError naming the first
    setting that no stock class computes and the nearest value that one does."""
    gpt2_misses = config.not_gpt2()
    if not gpt2_misses:
        return "gpt2"
    modern_misses = [(k, v) for k, v in MODERN.items() if getattr(config, k) != v]
    if config.mlp == "gelu":
        modern_misses.append(("mlp", "relu2"))
    if len(gpt2_misses) < len(modern_misses):  # closer to GPT-2's block: say what to change back
        key = gpt2_misses[0].split("=")[0]
        raise UserError(f"{gpt2_misses[0]} with GPT-2's other settings is computed by no stock transformers "
                        f"class; the nearest exportable value is {key}={config.GPT2[key]!r}")
    if modern_misses:
        key, nearest = modern_misses[0]
        raise UserError(f"{key}={getattr(config, key)!r} in the modern block (pos_emb='rope', norm='rmsnorm') is "
                        f"computed by no stock transformers class; the nearest exportable value is {key}={nearest!r}")
    return CLASSES[config.mlp, config.qk_norm]


def rotate_half_order(n_head, hs):
    """Row order that turns our rotary layout (pairs 2i, 2i+1 of each head) into rotate_half's (i, i + hs/2)."""
    within = torch.cat((torch.arange(0, hs, 2), torch.arange(1, hs, 2)))  # (hs,)
    return (torch.arange(n_head)[:, None] * hs + within).flatten()  # (nh * hs,)


def modern_weight_map(config, kind, rotate_half=True):
    """[(our name, our rows, their name, row order)]: their tensor is those rows of ours (None: all), taken in
    that order (None: as they are). Apertus calls its two norms attention_layernorm and feedforward_layernorm.
    rotate_half=False keeps our rotary layout (llama.cpp's 'llama' and 'arcee' rotate pairs as we do)."""
    c, H = config, model_hidden(config)
    C, order = c.n_embd, rotate_half_order(c.n_head, c.n_embd // c.n_head) if rotate_half else None
    norms = ("attention_layernorm", "feedforward_layernorm") if kind == "apertus" else ("input_layernorm", "post_attention_layernorm")
    m = [("transformer.wte.weight", None, "model.embed_tokens.weight", None),
         ("transformer.ln_f.weight", None, "model.norm.weight", None)]
    if not c.tie_embeddings:
        m.append(("lm_head.weight", None, "lm_head.weight", None))
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        m += [(ours + "attn.c_attn.weight", slice(0, C), theirs + "self_attn.q_proj.weight", order),  # c_attn: q, k, v
              (ours + "attn.c_attn.weight", slice(C, 2 * C), theirs + "self_attn.k_proj.weight", order),
              (ours + "attn.c_attn.weight", slice(2 * C, 3 * C), theirs + "self_attn.v_proj.weight", None),
              (ours + "attn.c_proj.weight", None, theirs + "self_attn.o_proj.weight", None),
              (ours + "ln_1.weight", None, theirs + f"{norms[0]}.weight", None),
              (ours + "ln_2.weight", None, theirs + f"{norms[1]}.weight", None),
              (ours + "mlp.c_proj.weight", None, theirs + "mlp.down_proj.weight", None)]
        if c.mlp == "swiglu":  # c_fc holds gate and up side by side
            m += [(ours + "mlp.c_fc.weight", slice(0, H), theirs + "mlp.gate_proj.weight", None),
                  (ours + "mlp.c_fc.weight", slice(H, 2 * H), theirs + "mlp.up_proj.weight", None)]
        else:
            m.append((ours + "mlp.c_fc.weight", None, theirs + "mlp.up_proj.weight", None))
    return m


def qk_norm_names(config):
    """Their QK-norm gains, which ours lacks: written as ones, and must be ones to come back."""
    names = ("self_attn.q_norm.weight", "self_attn.k_norm.weight") if config.qk_norm else ()
    return [f"model.layers.{i}.{n}" for i in range(config.n_layer) for n in names]


def modern_state_dict(model, kind, rotate_half=True):
    """Our modern-block weights under the Llama family's names and layouts (float32)."""
    sd = model.state_dict()
    out = {}
    for ours, rows, theirs, order in modern_weight_map(model.config, kind, rotate_half):
        w = sd[ours].detach().float()
        w = w[rows] if rows is not None else w
        out[theirs] = (w[order] if order is not None else w).clone()
    hs = model.config.n_embd // model.config.n_head
    return out | {name: torch.ones(hs) for name in qk_norm_names(model.config)}


def gpt2_state_dict(model):
    """Our GPT-2-block weights under GPT2LMHeadModel's names and layouts: the four projection matrices
    transposed into Conv1D's (in, out); the biases a bias=False model lacks written as zeros (the same function)."""
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    for k in list(sd):
        if k.endswith(transposed):
            sd[k] = sd[k].t().contiguous()
    if not model.config.bias:
        for k in list(sd):
            if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) or k.endswith(transposed):
                sd[k[:-len("weight")] + "bias"] = torch.zeros(sd[k].shape[-1] if k.endswith(transposed) else sd[k].shape[0])
    return sd


def hf_config(config, kind, eos_ids):
    """The transformers config that builds the stock class for this model. eos_ids: the ids that end a
    generation (hf_format.end_ids), none for a tokenizer without them (a character model runs on)."""
    import transformers
    c = config
    bos = eos_ids[-1] if eos_ids else None
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                       n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                                       layer_norm_epsilon=EPS, bos_token_id=bos, eos_token_id=bos,
                                       tie_word_embeddings=True)
    cls = getattr(transformers, HF_CLASS[kind].replace("ForCausalLM", "Config"))
    return cls(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=model_hidden(c), num_hidden_layers=c.n_layer,
               num_attention_heads=c.n_head, num_key_value_heads=c.n_head, head_dim=c.n_embd // c.n_head,
               max_position_embeddings=c.block_size, rms_norm_eps=EPS, attention_bias=False,
               rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE}, tie_word_embeddings=c.tie_embeddings,
               hidden_act="relu2" if c.mlp == "relu2" else "silu", bos_token_id=bos,
               eos_token_id=eos_ids or None, pad_token_id=None)


def model_hidden(config):
    """The MLP's hidden width as model.py builds it (swiglu's is 8/3 x, rounded up to 32), read off an MLP
    built on the meta device: no memory, and the rule stays in model.py."""
    from model import MLP
    with torch.device("meta"):
        return MLP(config).c_proj.in_features


def to_hf(model, eos_ids):
    """(the stock transformers model holding our weights, its family)."""
    import transformers
    kind = family(model.config)
    hf = getattr(transformers, HF_CLASS[kind])(hf_config(model.config, kind, eos_ids))
    sd = gpt2_state_dict(model) if kind == "gpt2" else modern_state_dict(model, kind)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    return hf.eval(), kind


def from_hf(folder, dropout=0.0):
    """(model, tokenizer spec) from a folder export.py wrote, of any family, or any GPT-2 folder (whose
    tokenizer is GPT-2's unless the folder says otherwise). Settings model.py lacks are refused in one line."""
    from model import GPT, GPTConfig
    with open(os.path.join(folder, "config.json")) as f:
        hc = json.load(f)
    kind = hc.get("model_type")
    if kind == "gpt2":
        model = GPT.from_pretrained(folder, dropout=dropout)
    elif kind in CLASSES.values():
        model = GPT(modern_config(GPTConfig, hc, kind, folder, dropout))
        load_modern_weights(model, kind, folder)
    else:
        raise UserError(f"{folder}: model_type {kind!r} is not one nanoforge computes "
                        f"(it reads {', '.join(HF_CLASS)} folders, as export.py writes them)")
    spec_path = os.path.join(folder, SPEC_FILE)
    if not os.path.exists(spec_path):
        if kind != "gpt2":
            raise UserError(f"{folder} has no {SPEC_FILE}: only folders written by export.py say which tokenizer they use")
        return model.eval(), {"kind": "gpt2"}
    with open(spec_path) as f:
        spec = json.load(f)
    if spec["kind"] in ("bpe", "unigram"):  # the trained tokenizer travels inside the folder
        spec["path"] = os.path.abspath(os.path.join(folder, spec["path"]))
    return model.eval(), spec


def modern_config(GPTConfig, hc, kind, folder, dropout):
    """Our GPTConfig for a Llama-family config.json, refusing what model.py does not compute."""
    heads, width = hc["num_attention_heads"], hc["hidden_size"]
    rope = hc.get("rope_parameters") or {"rope_type": "default", "rope_theta": hc.get("rope_theta")}
    act = {"apertus": "relu2", "arcee": "relu2"}.get(kind, "silu")
    checks = [("num_key_value_heads", hc.get("num_key_value_heads") or heads, heads),
              ("head_dim", hc.get("head_dim") or width // heads, width // heads),
              ("rope_parameters", (rope.get("rope_type"), rope.get("rope_theta")), ("default", ROPE_BASE)),
              ("rms_norm_eps", hc.get("rms_norm_eps"), EPS), ("hidden_act", hc.get("hidden_act"), act),
              ("attention_bias", hc.get("attention_bias", False), False), ("mlp_bias", hc.get("mlp_bias", False), False)]
    for key, got, want in checks:
        if got != want:
            raise UserError(f"{folder}: {key}={got!r}, but nanoforge computes only {key}={want!r}")
    config = GPTConfig(block_size=hc["max_position_embeddings"], vocab_size=hc["vocab_size"],
                       n_layer=hc["num_hidden_layers"], n_head=heads, n_embd=width, bias=False, pos_emb="rope",
                       norm="rmsnorm", mlp="relu2" if act == "relu2" else "swiglu", qk_norm=kind in ("apertus", "qwen3"),
                       tie_embeddings=hc.get("tie_word_embeddings", False), dropout=dropout)
    if model_hidden(config) != hc["intermediate_size"]:
        raise UserError(f"{folder}: intermediate_size={hc['intermediate_size']}, but model.py builds "
                        f"{model_hidden(config)} for a {width}-wide {config.mlp} MLP")
    return config


def load_modern_weights(model, kind, folder):
    """Fills `model` from the folder's safetensors: the inverse of modern_state_dict."""
    from safetensors.torch import load_file
    theirs = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            theirs |= load_file(os.path.join(folder, name))
    if model.config.tie_embeddings:
        theirs.pop("lm_head.weight", None)  # a tied copy, if written
    for name in qk_norm_names(model.config):
        if not torch.all(theirs.pop(name) == 1):
            raise UserError(f"{folder}: {name} has learned gains; nanoforge's QK-norm has none")
    sd = model.state_dict()
    with torch.no_grad():
        for ours, rows, name, order in modern_weight_map(model.config, kind):
            w = theirs.pop(name)
            target = sd[ours][rows] if rows is not None else sd[ours]  # a view: writing it fills the model
            target[order if order is not None else slice(None)] = w.to(target.dtype)
    assert not theirs, f"weights left over: {sorted(theirs)[:3]}"


# -----------------------------------------------------------------------------------------------------
# tokenizers

END_TOKENS = (chat_template.END, "<|endoftext|>")  # what ends a generation: a chat turn, a document


def end_tokens(tok):
    """The END_TOKENS the tokenizer has, in that order."""
    return [t for t in END_TOKENS if t in tok.special_tokens]


def end_ids(tok):
    """Their ids."""
    return [tok.special_tokens[t] for t in end_tokens(tok)]


def byte_level_bpe(tok):
    """(vocab, merges) of a tiktoken-backed tokenizer (GPT-2's, or a trained BPE) in Hugging Face's byte-level
    form: vocab {token text: id} without the special tokens, merges [(a, b), ...] in order. Each merged token's
    two parts are what BPE makes of its bytes using only the merges learned before it (for GPT-2 these equal
    its original encoder.json and vocab.bpe)."""
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
    return {text[t]: r for t, r in ranks.items()}, merges


def hf_tokenizer(tok):
    """Our tokenizer as a Hugging Face `tokenizers.Tokenizer` giving the same ids: characters as a vocabulary
    with no merges; GPT-2's and trained BPEs as byte-level BPE split by the same pattern. Special tokens take
    the same ids (they follow the vocabulary, in order)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    if isinstance(tok, UnigramTokenizer):  # already a `tokenizers` one: the copy that knows the special tokens
        return Tokenizer.from_str(tok.hf.to_str())
    if isinstance(tok, CharTokenizer):
        hf = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
        hf.decoder = decoders.Fuse()
    else:
        vocab, merges = byte_level_bpe(tok)
        hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tok.special_tokens])
    wrong = {t: hf.token_to_id(t) for t, i in tok.special_tokens.items() if hf.token_to_id(t) != i}
    assert not wrong, f"special tokens at other ids: {wrong}"
    return hf


def write_tokenizer(tok, folder):
    """tokenizer.json + tokenizer_config.json (with the chat template, for a tokenizer with the turn markers)
    that AutoTokenizer loads, and our own description (SPEC_FILE; a trained tokenizer is copied in beside it)."""
    from transformers import PreTrainedTokenizerFast
    ends = end_tokens(tok)
    fast = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(tok), eos_token=ends[-1] if ends else None,
                                   clean_up_tokenization_spaces=False)
    if chat_template.has_chat_tokens(tok):
        fast.chat_template = chat_template.JINJA
    fast.save_pretrained(folder, save_jinja_files=False)  # the template inside tokenizer_config.json
    spec = dict(tok.spec)
    if spec["kind"] in ("bpe", "unigram"):
        src = spec["path"] if os.path.isabs(spec["path"]) else os.path.join(REPO, spec["path"])
        shutil.copytree(src, os.path.join(folder, "nanoforge_bpe"))
        spec["path"] = "nanoforge_bpe"  # relative to the folder: from_hf resolves it
    write_json(os.path.join(folder, SPEC_FILE), spec)


# ------------------------------------------------------------------------------------------------------
# the check that an exported folder computes what the model does


def leading_agreement(a, b):
    """How many leading items two sequences share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def check_folder(model, tok, folder, prompt, n_tokens=32):
    """Loads `folder` with transformers' AutoModelForCausalLM and AutoTokenizer, as a user would, and compares
    it with `model` on `prompt`: the prompt's ids, the largest logit difference over the prompt, and how many
    of n_tokens greedy tokens agree (neither stopping at an end token, so all n_tokens are compared)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf, hf_tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    hf.eval()
    ids = tok.encode(prompt)
    theirs_ids = hf_tok(prompt)["input_ids"]
    x = torch.tensor([ids])  # (1, T)
    ours_logits, _ = model(x, torch.zeros_like(x))  # targets given: logits at every position, (1, T, V)
    diff = (ours_logits.float() - hf(x).logits.float()).abs().max().item()
    ours = model.generate(x, n_tokens, temperature=0.0)[0, len(ids):].tolist()
    hf.generation_config.eos_token_id = None  # past an end token too, as ours goes on
    theirs = hf.generate(x, max_new_tokens=n_tokens, do_sample=False)[0, len(ids):].tolist()
    return {"class": type(hf).__name__, "prompt": prompt, "same_prompt_ids": theirs_ids == ids,
            "max_logit_diff": diff, "greedy_tokens": len(ours), "greedy_equal": leading_agreement(ours, theirs)}
