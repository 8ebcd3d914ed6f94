"""
checkpoint.py: save and load give the same model, the saved weights are the bare model's whatever
wraps it, nothing is unpickled, optimizer state survives, bad files are one-line errors, load_model
takes every kind of source, and a crash mid-save keeps the previous checkpoint.
"""
import os
import random
import re
import struct
import zipfile

import pytest
import torch
import torch.nn as nn

from nanoforge.checkpoint import (check_compatible, ckpt_path, load_checkpoint, load_model, model_from_checkpoint,
                        save_checkpoint)
from model import GPT, GPTConfig
from nanoforge.errors import UserError
from conftest import assert_one_line_error, run

META = {"tokenizer": {"kind": "char", "chars": "abcdefgh"}, "iter_num": 7, "best_val_loss": 1.5,
        "config": {"batch_size": 4}, "dataset": "tiny"}


def tiny(pos_emb="learned", seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=8, n_layer=2, n_head=2, n_embd=16, pos_emb=pos_emb)).eval()


def logits_of(m, idx):
    with torch.no_grad():
        return m.eval()(idx, targets=idx)[0]


IDX = torch.randint(0, 8, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_save_load_gives_identical_logits(tmp_path, pos_emb):
    m = tiny(pos_emb)
    path = ckpt_path(str(tmp_path))
    save_checkpoint(path, m, META)
    state = load_checkpoint(path)
    assert state["meta"]["iter_num"] == 7 and state["meta"]["tokenizer"] == META["tokenizer"]
    assert state["meta"]["model_args"]["pos_emb"] == pos_emb
    fresh = model_from_checkpoint(state)
    assert torch.equal(logits_of(fresh, IDX), logits_of(m, IDX))
    # the tie survives: one tensor for the embedding and the output layer, as in training
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


class FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: the model sits in .module, so state_dict keys get 'module.'."""

    def __init__(self, module):
        super().__init__()
        self.module = module


# torch's own import of torch._dynamo (on the first torch.compile) warns about torch.jit; not ours
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_wrapped_models_save_bare_keys(tmp_path):
    m = tiny()
    bare_keys = set(m.state_dict())
    compiled = torch.compile(m)  # wrapping only; nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    for i, wrapped in enumerate([FakeDDP(m), compiled, FakeDDP(compiled), torch.compile(FakeDDP(m))]):
        path = str(tmp_path / f"ckpt{i}.pt")
        save_checkpoint(path, wrapped, META)
        state = load_checkpoint(path)
        assert set(state["model"]) == bare_keys
        assert torch.equal(logits_of(model_from_checkpoint(state), IDX), logits_of(m, IDX))


def test_file_loads_with_weights_only(tmp_path):
    m = tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    _, loss = m.train()(IDX, targets=IDX)
    loss.backward()
    opt.step()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, m, META, optimizer=opt)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # nothing unpickled
    assert raw["format"] == "nanoforge-checkpoint" and isinstance(raw["meta"], str)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in raw["model"])


def test_optimizer_state_round_trip(tmp_path):
    # resuming from the checkpoint must take the very step that continuing would have taken
    def one_step(model, opt):
        opt.zero_grad(set_to_none=True)
        _, loss = model.train()(IDX, targets=IDX)
        loss.backward()
        opt.step()

    m = tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    one_step(m, opt)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, m, META, optimizer=opt)

    state = load_checkpoint(path)
    resumed = model_from_checkpoint(state)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    resumed_opt.load_state_dict(state["optimizer"])
    saved, loaded = opt.state_dict(), resumed_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i in saved["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved["state"][i][k], loaded["state"][i][k])

    one_step(m, opt)
    one_step(resumed, resumed_opt)
    for (name, a), b in zip(m.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), tiny(), META)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(str(path))


def test_random_bytes(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(str(path))


def damage_a_weight(path, how):
    """Flips or zeroes bytes in the middle of the largest tensor's data inside a checkpoint file, leaving the
    zip's structure whole: what a bad disk or an interrupted copy does, and what torch.load does not notice."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2  # the local header, then the data
    if how == "flip":
        data[start] ^= 0x10
    else:
        data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "zero"])
def test_damaged_weight_bytes_are_refused_naming_the_file(tmp_path, how):
    path = tmp_path / "ckpt.pt"
    m = tiny()
    torch.nn.init.normal_(m.transformer.h[0].mlp.c_fc.weight)  # no run of zeros where the damage goes
    save_checkpoint(str(path), m, META)
    damage_a_weight(path, how)
    # the file still loads as a zip of tensors: the damage is invisible to torch.load
    assert torch.load(str(path), weights_only=True)["format"] == "nanoforge-checkpoint"
    with pytest.raises(UserError, match=f"checkpoint {re.escape(str(path))} is corrupt: the bytes of "):
        load_checkpoint(str(path))


def test_every_script_that_loads_a_checkpoint_refuses_a_damaged_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(ckpt_path(str(out)), tiny(), dict(META, config={"batch_size": 4, "optimizer_name": "adamw"}))
    damage_a_weight(out / "ckpt.pt", "flip")
    for script, args in [("sample.py", ["--num_samples=1", "--max_new_tokens=2"]), ("export.py", [f"--dest={tmp_path / 'hf'}"]),
                         ("evaluate.py", [])]:
        assert_one_line_error(run(script, f"--out_dir={out}", *args, check=False), "ckpt.pt is corrupt")


def test_not_a_nanoforge_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": tiny().state_dict(), "iter_num": 5}, path)  # a nanoGPT-style dict
    with pytest.raises(UserError, match="not a nanoforge checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="not a nanoforge checkpoint"):
        load_checkpoint(path)


def test_other_version(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"format": "nanoforge-checkpoint", "version": 2, "meta": "{}", "model": {}}, path)
    with pytest.raises(UserError, match="version 2"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    with pytest.raises(UserError, match="nothing at .*out_dir holding ckpt.pt"):
        load_model(str(tmp_path / "nothing_here"))
    # a run whose name starts with the one given (the quick start's sprint folder) is named in the error
    (tmp_path / "out-run-sprint").mkdir()
    (tmp_path / "out-run-sprint" / "ckpt.pt").write_bytes(b"")
    (tmp_path / "out-run-empty").mkdir()  # no checkpoint: not named
    with pytest.raises(UserError, match=r"nothing at '.*out-run' \(.*out-run-sprint holds one\): give") as e:
        load_model(str(tmp_path / "out-run"))
    assert "out-run-empty" not in str(e.value)
    with pytest.raises(UserError, match="no checkpoint at"):
        load_model(str(tmp_path))  # a folder with no ckpt.pt and no config.json


def test_check_compatible_names_the_differing_key():
    args = dict(n_layer=2, n_head=2, n_embd=16, block_size=16)
    check_compatible(args, dict(n_layer=2, n_embd=16), "checkpoint")  # same: no error
    with pytest.raises(UserError, match="n_layer=2 there, 4 here") as e:
        check_compatible(args, dict(n_layer=4, n_embd=16), "checkpoint")
    assert "n_embd" not in str(e.value)


def test_load_model_from_out_dir_and_file(tmp_path):
    m = tiny()
    save_checkpoint(ckpt_path(str(tmp_path)), m, META)
    for source in (str(tmp_path), ckpt_path(str(tmp_path))):
        loaded, tokenizer, meta = load_model(source)
        assert tokenizer == META["tokenizer"] and meta["iter_num"] == 7
        assert torch.equal(logits_of(loaded, IDX), logits_of(m, IDX))


def test_load_model_from_hugging_face_folder(hf_gpt2_dir):
    folder, hf = hf_gpt2_dir
    loaded, tokenizer, meta = load_model(folder)
    assert tokenizer == {"kind": "gpt2"}
    idx = torch.randint(0, 100, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, idx), hf(idx).logits, rtol=0, atol=1e-4)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt_path(str(tmp_path))
    old = tiny(seed=0)
    save_checkpoint(path, old, META)

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")  # part of a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, tiny(seed=1), META)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(logits_of(model_from_checkpoint(load_checkpoint(path)), IDX), logits_of(old, IDX))
