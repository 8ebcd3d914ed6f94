"""
Our models as GGUF files, llama.cpp's format (also Ollama's and LM Studio's), written with the `gguf`
package (llama.cpp's own writer): weights in f32, f16 or q8_0, the hyperparameters, the tokenizer as
llama.cpp's byte-level BPE (tokenizer.ggml.*) and the chat template.

The architecture is the one llama.cpp computes like model.py, chosen by hf_format.family:
    gpt2 -> gpt2;  llama -> llama;  qwen3 -> qwen3;  arcee (ReLU^2, no QK-norm) -> arcee;
    apertus (ReLU^2 + QK-norm) -> apertus, whose xIELU activation is relu(x)^2 with alpha_p = 1,
    alpha_n = 0, beta = 0 (x > 0: alpha_p x^2 + beta x; else alpha_n (expm1(min(x, eps)) - x) + beta x).
    The file holds them before softplus (ggml takes alpha_p = softplus(a_p), alpha_n = beta + softplus(a_n)):
    a_p = log(e - 1), whose softplus is 1.0 in float32, and a_n = -inf, whose softplus is exactly 0.
llama.cpp's 'llama' and 'arcee' rotate channel pairs (2i, 2i+1) as model.py does; 'qwen3' and 'apertus'
rotate (i, i + hs/2) as Hugging Face does, so those get hf_format's permuted rows.

llama.cpp needs an end-of-text token; without one it takes id 11, a real character of a character
vocabulary. A tokenizer without one gets an extra token whose embedding and output rows are zeros: its
logit is always 0, so it ends a generation only when every real logit is negative, and llama.cpp's
--ignore-eos masks it, leaving exactly the model's own distribution.

Tokenizers: llama.cpp splits text before BPE with one of its named patterns ('tokenizer.ggml.pre'):
GPT-2's pattern is its 'gpt-2', our default trained-BPE pattern (GPT-4's) its 'llama-bpe'. A character
vocabulary is written as byte-level tokens, one per character, with merges that join the bytes of each
multi-byte character (no merge crosses a character: a continuation byte never starts one).
"""
import math
import os
import shutil

import numpy as np
import torch

from nanoforge import chat_template, hf_format
from nanoforge.errors import UserError
from nanoforge.tokenizer import PATTERNS, CharTokenizer, UnigramTokenizer, _bytes_to_unicode

TYPES = ("f32", "f16", "q8_0")
# the GGUF type that holds weights at each --quantize's precision: the benchmarks set llama.cpp on it beside us
AT_QUANTIZE = {"none": "f32", "bf16": "f16", "int8": "q8_0"}
ARCH = dict(gpt2="gpt2", llama="llama", qwen3="qwen3", arcee="arcee", apertus="apertus")
ROTATE_HALF = {"qwen3", "apertus"}  # llama.cpp's NEOX rotary layout
PRE = {PATTERNS["gpt2"]: "gpt-2", PATTERNS["gpt4"]: "llama-bpe"}


def llama_cpp_program(name):
    """The path of llama.cpp's program `name` (llama-bench, llama-server, llama-completion) in the folder
    $LLAMA_CPP_BIN names or, without it, on PATH; None where it is in neither. The benchmarks and tests that set
    our models beside llama.cpp run it on the GGUF files written here."""
    return shutil.which(name, path=os.environ.get("LLAMA_CPP_BIN") or None)


def check_type(gguf_type):
    if gguf_type not in TYPES:
        raise UserError(f"--gguf_type={gguf_type}: use one of {', '.join(TYPES)}")


def tensors(model, end_row=False):
    """{GGUF name: float32 numpy array} of the model's weights, in the layout its llama.cpp architecture reads.
    end_row: one more token, embedded and scored by zeros (its logit is always 0): the end token llama.cpp
    needs, for a tokenizer without one; --ignore-eos masks it, leaving exactly our distribution."""
    import gguf
    c, kind = model.config, hf_format.family(model.config)
    if kind == "gpt2":  # llama.cpp reads GPT-2's projections as nn.Linear's (out, in), not Conv1D's
        sd = {k: (v.t() if v.dim() == 2 and "transformer.h." in k else v) for k, v in hf_format.gpt2_state_dict(model).items()}
        embed = "transformer.wte.weight"
    else:
        sd = hf_format.modern_state_dict(model, kind, rotate_half=kind in ROTATE_HALF)
        embed = "model.embed_tokens.weight"
    if kind == "apertus" or end_row:  # apertus's loader needs output.weight: a tied head is written twice
        sd.setdefault("lm_head.weight", sd[embed])
    if end_row:
        sd[embed], sd["lm_head.weight"] = (torch.cat((sd[k], torch.zeros(1, c.n_embd))) for k in (embed, "lm_head.weight"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCH[kind].upper()], c.n_layer)
    out = {}
    for name, w in sd.items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target, f"no GGUF name for {name}"
        out[target] = w.detach().float().contiguous().numpy()
    return out


def vocabulary(tok, vocab_size):
    """(tokens, token types, merges, pre-tokenizer name) in llama.cpp's byte-level BPE form, padded to the
    model's vocab_size with unused tokens, and one more, an end token, for a tokenizer that has none."""
    import gguf
    to_text = _bytes_to_unicode()
    if isinstance(tok, UnigramTokenizer):
        raise UserError("a byte-level Unigram tokenizer has no GGUF form (llama.cpp's Unigram is SentencePiece's, "
                        "over characters): export with --to=hf, or train the tokenizer with --kind=bpe for llama.cpp")
    if isinstance(tok, CharTokenizer):
        tokens = ["".join(to_text[b] for b in ch.encode()) for ch in tok.chars]
        merges = []
        for ch in tok.chars:  # join each multi-byte character's bytes left to right
            pieces = [to_text[b] for b in ch.encode()]
            for i in range(1, len(pieces)):
                merges.append(f"{''.join(pieces[:i])} {pieces[i]}")
        if not merges:  # llama.cpp needs at least one: join two 0xFF bytes, which UTF-8 text never holds
            merges.append(f"{to_text[0xFF]} {to_text[0xFF]}")
        pre = "gpt-2"  # no merge crosses a character, so any split that keeps characters whole gives the same ids
    else:
        vocab, pairs = hf_format.byte_level_bpe(tok)
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        merges = [f"{a} {b}" for a, b in pairs]
        pre = "gpt-2" if tok.spec["kind"] == "gpt2" else PRE.get(tok.enc._pat_str)  # tiktoken's GPT-2 pattern is its own
        if pre is None:
            raise UserError("this tokenizer's pre-tokenization pattern is none of llama.cpp's named ones; train "
                            "the tokenizer with --pattern=gpt4 (the default) or gpt2 to export it as GGUF")
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += list(tok.special_tokens)
    types += [gguf.TokenType.CONTROL] * len(tok.special_tokens)
    assert len(tokens) <= vocab_size, f"tokenizer has {len(tokens)} tokens, the model {vocab_size} rows"
    unused = vocab_size - len(tokens)
    tokens, types = tokens + [f"[UNUSED{i}]" for i in range(unused)], types + [gguf.TokenType.UNUSED] * unused
    if not hf_format.end_ids(tok):
        tokens, types = tokens + ["<|endoftext|>"], types + [gguf.TokenType.CONTROL]
    return tokens, types, merges, pre


def write(model, tok, path, gguf_type="f16", name="nanoforge"):
    """Writes the model, its tokenizer and chat template to `path`; returns the llama.cpp architecture."""
    import gguf
    c, kind = model.config, hf_format.family(model.config)
    arch = ARCH[kind]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_block_count(c.n_layer)
    w.add_feed_forward_length(hf_format.model_hidden(c))
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head)
    if kind == "gpt2":
        w.add_layer_norm_eps(hf_format.EPS)
    else:
        w.add_layer_norm_rms_eps(hf_format.EPS)
        w.add_rope_freq_base(hf_format.ROPE_BASE)
        w.add_rope_dimension_count(c.n_embd // c.n_head)
    if kind == "apertus":  # xIELU set to relu(x)^2 in every layer (see above)
        L = c.n_layer
        w.add_xielu_alpha_p([math.log(math.e - 1)] * L), w.add_xielu_alpha_n([-math.inf] * L)
        w.add_xielu_beta([0.0] * L), w.add_xielu_eps([-1e-6] * L)

    tokens, types, merges, pre = vocabulary(tok, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ends = hf_format.end_ids(tok) or [len(tokens) - 1]  # without one, the end token vocabulary() added
    w.add_eos_token_id(ends[0])  # <|end|> for a chat model: a turn ends generation
    w.add_bos_token_id(ends[-1])
    w.add_add_bos_token(False)  # we never put a token before the text
    if chat_template.has_chat_tokens(tok):
        w.add_chat_template(chat_template.JINJA)

    for tname, data in tensors(model, end_row=not hf_format.end_ids(tok)).items():
        quantize = gguf_type != "f32" and data.ndim == 2
        if quantize and gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
            w.add_tensor(tname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif quantize:  # f16, and q8_0's rows that are not whole blocks of 32
            w.add_tensor(tname, data.astype(np.float16))
        else:  # norms and biases stay f32, as llama.cpp's converter keeps them
            w.add_tensor(tname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return arch


def modelfile(gguf_name, tok):
    """An Ollama Modelfile for the GGUF beside it: the chat template in Ollama's Go template form and the stop tokens."""
    lines = [f"FROM ./{gguf_name}"]
    if chat_template.has_chat_tokens(tok):
        lines.append('TEMPLATE """{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"""')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += [f'PARAMETER stop "{t}"' for t in hf_format.end_tokens(tok)]
    return "\n".join(lines) + "\n"
