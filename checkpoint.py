"""
The checkpoint format, and building a model from a checkpoint: every script goes through here.

A checkpoint (out_dir/ckpt.pt) is a torch.save'd dict of tensors and plain values only, so it loads with
torch.load(weights_only=True) and nothing is unpickled:

    format      "nanoforge-checkpoint"
    version     1
    meta        a JSON string: model_args (GPTConfig), tokenizer (see tokenizer.py), iter_num,
                best_val_loss, config (the run's resolved config), dataset
    model       the state_dict of the bare model (never DDP's "module." or compile's "_orig_mod.")
    optimizer   the optimizer state_dict (training checkpoints only)
    scaler      the fp16 GradScaler state_dict, when one is used
"""
import dataclasses
import json
import os

import torch

from model import GPT, GPTConfig
from runtime import UserError, atomic_path

FORMAT, VERSION = "nanoforge-checkpoint", 1
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.pt")


def unwrap(model):
    """The bare GPT inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(path, model, meta, optimizer=None, scaler=None, weights=None):
    """Writes atomically: a crash mid-save leaves the previous checkpoint intact. weights: a state_dict
    to save instead of the model's own (LoRA saves the base with its adapters merged in)."""
    model = unwrap(model)
    meta = dict(meta, model_args=dataclasses.asdict(model.config))
    weights = model.state_dict() if weights is None else weights
    state = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta), "model": weights}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict with meta parsed from JSON. Errors name the problem and the fix."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py ... --out_dir={os.path.dirname(path) or '.'})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, wrong file: all mean the file is unusable
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); "
                        f"restore it or train again") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a nanoforge checkpoint (a nanoGPT or other file?)")
    if state.get("version") != VERSION:
        raise UserError(f"{path} is checkpoint version {state.get('version')}; this code reads version {VERSION}")
    state["meta"] = json.loads(state["meta"])
    return state


def check_compatible(model_args, wanted, what):
    """Raises if a checkpoint's model_args differ from the run's on any key in `wanted`."""
    diff = [f"{k}={model_args.get(k)!r} there, {v!r} here" for k, v in wanted.items() if model_args.get(k) != v]
    if diff:
        raise UserError(f"{what} does not match this run's model: {'; '.join(diff)}. "
                        f"Use the same settings or a new --out_dir")


def model_from_checkpoint(state, dropout=None):
    """The GPT described and weighted by a checkpoint dict from load_checkpoint (dropout: to train on
    with another rate than the checkpoint's, e.g. when fine-tuning)."""
    args = dict(state["meta"]["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    model = GPT(GPTConfig(**args))
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint weights do not fit its own model_args (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the file was edited or is corrupt")
    return model


def load_model(source, map_location="cpu", dropout=None):
    """(model, tokenizer spec, meta) from any of: an out_dir holding ckpt.pt, a checkpoint file, a local
    Hugging Face GPT-2 folder (save_pretrained), or a GPT-2 name on the hub (gpt2, gpt2-medium, ...)."""
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")) \
            and not os.path.exists(ckpt_path(source)):
        return GPT.from_pretrained(source, dropout=dropout or 0.0), {"kind": "gpt2"}, {"source": source}
    if source in GPT2_NAMES:
        try:
            model = GPT.from_pretrained(source, dropout=dropout or 0.0)
        except OSError as e:
            raise UserError(f"could not fetch {source} weights from the Hugging Face hub ({type(e).__name__}); "
                            f"offline, pass a local folder written by transformers' save_pretrained") from None
        return model, {"kind": "gpt2"}, {"source": source}
    path = ckpt_path(source) if os.path.isdir(source) else source
    if not os.path.exists(source):
        raise UserError(f"nothing at '{source}': give an out_dir holding ckpt.pt, a checkpoint file, a Hugging Face "
                        f"GPT-2 folder, or a GPT-2 name ({', '.join(GPT2_NAMES)})")
    state = load_checkpoint(path, map_location)
    return model_from_checkpoint(state, dropout), state["meta"]["tokenizer"], state["meta"]
