"""
The checkpoint format, and building a model from a checkpoint: every script goes through here.

A checkpoint (out_dir/ckpt.pt) is a torch.save'd dict of tensors and plain values only, so it loads with
torch.load(weights_only=True) and nothing is unpickled:

    format      "nanoforge-checkpoint"
    version     1
    meta        a JSON string: model_args (GPTConfig), tokenizer (see tokenizer.py), iter_num,
                best_val_loss, config (the run's resolved config), dataset
    model       the state_dict of the bare model (never DDP's "module." or compile's "_orig_mod.")
    checksums   a JSON string: the CRC-32 of each weight tensor's bytes, checked on every load, so a
                flipped or zeroed byte inside the file is an error, not a model that serves gibberish
    optimizer   the optimizer state_dict (training checkpoints only)
    scaler      the fp16 GradScaler state_dict, when one is used

A sharded checkpoint (out_dir/ckpt_sharded/, written by fsdp=True runs) is a torch.distributed.checkpoint
(DCP) folder: each rank writes its own shards of "model" and "optimizer" (state dicts keyed by parameter
name, so they reload on any number of ranks), plus meta.json holding format "nanoforge-sharded", version
and the same meta as above. consolidate() turns one into an ordinary checkpoint for sample.py and the
rest. DCP's own index (.metadata) is a pickle PyTorch writes: load only sharded checkpoints you made.
"""
import dataclasses
import json
import os
import shutil
import warnings
import zlib

import torch
import torch.distributed as dist

from model import GPT, GPTConfig
from nanoforge import hf_format
from nanoforge.errors import UserError
from nanoforge.files import atomic_path, replace_folder, write_json

FORMAT, VERSION = "nanoforge-checkpoint", 1
SHARDED_FORMAT = "nanoforge-sharded"
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.pt")


def runs_named_like(out_dir):
    """The folders beside out_dir whose names start with its own and that hold a checkpoint: the run a missing
    out_dir most likely meant (the quick start's sprint trains into out-shakespeare-char-cpu-sprint)."""
    where, name = os.path.split(os.path.normpath(out_dir))
    try:
        found = [d for d in sorted(os.listdir(where or ".")) if d.startswith(name) and d != name]
    except OSError:
        return []
    return [os.path.join(where, d) for d in found if os.path.isfile(ckpt_path(os.path.join(where, d)))]


def sharded_path(out_dir):
    return os.path.join(out_dir, "ckpt_sharded")


def unwrap(model):
    """The bare GPT inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def checksums(weights):
    """{name: CRC-32 of the tensor's bytes} of a state_dict. CRC-32 runs near memory speed (0.14 s for
    GPT-2 124M's 500 MB on one core) and catches every burst of flipped or zeroed bits up to 32 long, and all
    but 1 in 4 billion of the rest."""
    sums = {}
    for name, t in weights.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # the bytes as stored, any dtype
        sums[name] = zlib.crc32(raw.numpy())
    return sums


def verify_checksums(state, path):
    """Raises a one-line error naming the file and the first tensor whose bytes differ from when it was saved.
    Checkpoints written before checksums were recorded have none and load as they are."""
    if "checksums" not in state:
        return
    saved, now = json.loads(state["checksums"]), checksums(state["model"])
    bad = [name for name in saved if now.get(name) != saved[name]] + sorted(set(now) - set(saved))
    if bad:
        raise UserError(f"checkpoint {path} is corrupt: the bytes of {bad[0]}"
                        f"{f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''} differ from when it was "
                        f"saved (a bad disk or copy?); restore it from a backup or train again")


def save_checkpoint(path, model, meta, optimizer=None, scaler=None, weights=None):
    """Writes atomically: a crash mid-save leaves the previous checkpoint intact. weights: a state_dict
    to save instead of the model's own (LoRA saves the base with its adapters merged in)."""
    model = unwrap(model)
    meta = dict(meta, model_args=dataclasses.asdict(model.config))
    weights = model.state_dict() if weights is None else weights
    state = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta), "model": weights,
             "checksums": json.dumps(checksums(weights))}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict with meta parsed from JSON. Errors name the problem and the fix."""
    if not os.path.exists(path) and find_sharded(os.path.dirname(path) or "."):
        raise UserError(f"no checkpoint at {path}, but a sharded one beside it; make it with: python consolidate.py "
                        f"{os.path.dirname(path) or '.'}")
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
    verify_checksums(state, path)
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
    """(model, tokenizer spec, meta) from any of: an out_dir holding ckpt.pt, a checkpoint file, a Hugging
    Face folder (one export.py wrote, of any architecture, or any GPT-2 save_pretrained folder), or a GPT-2
    name on the hub (gpt2, gpt2-medium, ...)."""
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "config.json")) \
            and not os.path.exists(ckpt_path(source)):
        model, spec = hf_format.from_hf(source, dropout=dropout or 0.0)
        return model, spec, {"source": source}
    if source in GPT2_NAMES:
        try:
            model = GPT.from_pretrained(source, dropout=dropout or 0.0)
        except OSError as e:
            raise UserError(f"could not fetch {source} weights from the Hugging Face hub ({type(e).__name__}); "
                            f"offline, pass a local folder written by transformers' save_pretrained") from None
        return model, {"kind": "gpt2"}, {"source": source}
    path = ckpt_path(source) if os.path.isdir(source) else source
    if not os.path.exists(source):
        near = runs_named_like(source)
        hint = f" ({', '.join(near[:3])} holds one)" if near else ""
        raise UserError(f"nothing at '{source}'{hint}: give an out_dir holding ckpt.pt, a checkpoint file, a Hugging "
                        f"Face GPT-2 folder, or a GPT-2 name ({', '.join(GPT2_NAMES)})")
    state = load_checkpoint(path, map_location)
    return model_from_checkpoint(state, dropout), state["meta"]["tokenizer"], state["meta"]


# -----------------------------------------------------------------------------------------------------
# sharded checkpoints (FSDP): torch.distributed.checkpoint

def _is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_sharded(out_dir, model, optimizer, meta):
    """Every rank calls this (it is a collective): each writes its own shards, in parallel, into
    ckpt_sharded.tmp/, which rank 0 renames into place when all are done. A crash mid-save leaves the
    previous checkpoint: it is moved aside to .old only for the instant between two renames, and
    find_sharded() looks there too. Needs an out_dir every rank sees (a shared filesystem)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = sharded_path(out_dir)
    tmp = final + ".tmp"
    if _is_rank0() and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left by a crash mid-save
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if _is_rank0():
        meta = dict(meta, model_args=dataclasses.asdict(model.config))
        write_json(os.path.join(tmp, "meta.json"), {"format": SHARDED_FORMAT, "version": VERSION, "meta": meta})
        replace_folder(tmp, final)
    _barrier()


def find_sharded(out_dir):
    """The sharded checkpoint folder of out_dir, or None. Falls back to .old, which holds the last
    complete checkpoint only if a save crashed between its two renames."""
    for path in (sharded_path(out_dir), sharded_path(out_dir) + ".old"):
        if os.path.exists(os.path.join(path, "meta.json")):
            return path
    return None


def read_sharded_meta(path):
    with open(os.path.join(path, "meta.json")) as f:
        head = json.load(f)
    if head.get("format") != SHARDED_FORMAT or head.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} nanoforge sharded checkpoint")
    return head["meta"]


def load_sharded(path, model, optimizer=None):
    """Loads a sharded checkpoint into `model` (and `optimizer`) as they are now laid out: FSDP-sharded
    over any number of ranks, or whole in one process. DCP reads each rank's part from whichever files
    hold it, so a run saved on 2 ranks resumes on 1, 2 or 8. Returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd
    meta = read_sharded_meta(path)
    if optimizer is None:  # weights only: one process may load alone (consolidation on rank 0)
        state = {"model": sd.get_model_state_dict(model)}
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=True)
        sd.set_model_state_dict(model, state["model"])
        return meta
    model_state, optim_state = sd.get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    sd.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return meta


def consolidate(path, out_path):
    """A sharded checkpoint folder -> an ordinary checkpoint (model weights and meta, no optimizer) at
    out_path, for sample.py, evaluation and export. One process, no process group needed."""
    meta = read_sharded_meta(path)
    model = GPT(GPTConfig(**meta["model_args"]))
    load_sharded(path, model)
    save_checkpoint(out_path, model, meta)
    return out_path


# -----------------------------------------------------------------------------------------------------
# resuming a training run (train.py): one entry for full and sharded checkpoints

def check_out_dir(out_dir, init_from, fsdp):
    """Whether out_dir fits the run about to start: resuming needs the kind of checkpoint the run writes
    (sharded under fsdp, ckpt.pt otherwise); a run that does not resume must not write over one. Returns
    the checkpoint to resume (a file or folder), or None."""
    full = ckpt_path(out_dir) if os.path.exists(ckpt_path(out_dir)) else None
    sharded = find_sharded(out_dir)
    if init_from == "resume" and not (sharded if fsdp else full):
        hint = {(True, False): "it holds ckpt.pt from a run without fsdp: resume with --fsdp=False",
                (False, True): "it holds a sharded checkpoint (ckpt_sharded/): resume with --fsdp=True under torchrun"}
        raise UserError(f"--init_from=resume but {out_dir} holds no {'sharded checkpoint' if fsdp else 'ckpt.pt'}; "
                        + hint.get((bool(full), bool(sharded)), "start with --init_from=scratch"))
    if init_from != "resume" and (full or sharded):
        raise UserError(f"{out_dir} already holds a run's checkpoint; resume it with --init_from=resume, "
                        f"or pick another --out_dir")
    return (sharded if fsdp else full) if init_from == "resume" else None


class Resume:
    """A stopped training run to go on with, from the checkpoint check_out_dir found. Two steps, because
    under FSDP the weights can only load into the model once it is sharded: Resume(...) reads the
    checkpoint and builds the model (.model, .iter_num, .best_val_loss, .train_time); restore() loads the
    optimizer and GradScaler state (and a sharded checkpoint's weights) once those exist. Checkpoints from
    before the time clock resume with train_time 0, from before Muon with optimizer_name 'adamw'."""

    def __init__(self, path, fsdp, model_args):
        self.path, self.fsdp, self.state = path, fsdp, None
        if fsdp:
            self.meta = read_sharded_meta(path)
        else:
            self.state = load_checkpoint(path)
            self.meta = self.state["meta"]
            if "optimizer" not in self.state:
                raise UserError(f"{path} holds weights only (consolidated from a sharded run); resume that run "
                                f"with --fsdp=True under torchrun")
        check_compatible(self.meta["model_args"], model_args, f"the checkpoint in {os.path.dirname(path)}")
        self.model = model_from_checkpoint(self.state) if self.state else GPT(GPTConfig(**self.meta["model_args"]))
        self.iter_num, self.best_val_loss = self.meta["iter_num"], self.meta["best_val_loss"]
        self.train_time = self.meta.get("train_time", 0.0)

    def restore(self, model, optimizer, scaler, optimizer_name):
        saved = self.meta["config"].get("optimizer_name", "adamw")
        if saved != optimizer_name:
            raise UserError(f"the checkpoint in {os.path.dirname(self.path)} holds "
                            f"{'Muon + AdamW' if saved == 'muon' else 'AdamW'} state (optimizer_name={saved!r}); "
                            f"resume with --optimizer_name={saved}")
        if self.fsdp:
            load_sharded(self.path, model, optimizer)
            scaler_state = self.meta.get("scaler")
        else:
            optimizer.load_state_dict(self.state["optimizer"])
            scaler_state = self.state.get("scaler")
        if scaler_state:
            scaler.load_state_dict(scaler_state)
        self.state = None  # free the checkpoint's copy of the weights


# kept checkpoints: snapshots of a run as it learned (train.py --keep_checkpoints=N), for explain.py

KEPT_DIR = "checkpoints"


def kept_path(out_dir, iter_num):
    return os.path.join(out_dir, KEPT_DIR, f"ckpt_{iter_num:07d}.pt")


def kept_checkpoints(out_dir):
    """[(iteration, path)] of the kept checkpoints of a run, oldest first ([] when there are none)."""
    folder = os.path.join(out_dir, KEPT_DIR)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        stem = name[len("ckpt_"):-len(".pt")]
        if name.startswith("ckpt_") and name.endswith(".pt") and stem.isdigit():
            found.append((int(stem), os.path.join(folder, name)))
    return sorted(found)


def keep_checkpoint(out_dir, model, meta, iter_num, keep):
    """Saves the model's weights (no optimizer: a snapshot to look at, not to resume from) as
    out_dir/checkpoints/ckpt_<iter>.pt and deletes all but the `keep` newest. Returns the path."""
    path = kept_path(out_dir, iter_num)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(path, model, dict(meta, iter_num=iter_num))
    for _, old in kept_checkpoints(out_dir)[:-keep]:
        os.remove(old)
    return path
