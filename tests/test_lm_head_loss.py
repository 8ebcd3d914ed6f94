"""
nanoforge/lm_head_loss.py: the chunked LM head and loss against GPT.forward's plain lm_head + cross-entropy
(values and gradients, with ignored targets, under no_grad and bf16 autocast), and compiled training
through it at one CPU thread.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from model import GPT, GPTConfig
from nanoforge import lm_head_loss
from nanoforge.lm_head_loss import chunked_lm_head_loss


def tiny(pos_emb="learned"):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, pos_emb=pos_emb)
    return GPT(cfg).eval()


@pytest.mark.parametrize("chunk_rows", [7, 512])  # 7 does not divide the 3 x 16 rows; 512 is one chunk
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_chunked_loss_matches_plain_loss_and_gradients(pos_emb, chunk_rows, monkeypatch):
    monkeypatch.setattr(lm_head_loss, "LOSS_CHUNK_ROWS", chunk_rows)
    m = tiny(pos_emb).train()
    idx = torch.randint(0, 64, (3, 16))
    targets = torch.randint(0, 64, (3, 16))
    targets[0, :5] = -1  # a masked prompt, and one stray ignored target in another chunk
    targets[2, 9] = -1

    def run(chunked_loss):
        m.zero_grad(set_to_none=True)
        logits, loss = m(idx, targets=targets, head_loss=chunked_lm_head_loss if chunked_loss else None)
        loss.backward()
        return logits, loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    _, loss_ref, grads_ref = run(False)
    logits, loss, grads = run(True)
    assert logits is None  # the point: the (B, T, V) logits are never made
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    # every parameter, including the tied wte/lm_head weight (the embedding's gradient plus the head's)
    assert grads.keys() == grads_ref.keys() and "transformer.wte.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_under_no_grad_is_the_same_loss_without_gradients(monkeypatch):
    # evaluation: forward only (with_grads=False), the same number as the training pass and the plain path
    monkeypatch.setattr(lm_head_loss, "LOSS_CHUNK_ROWS", 7)
    m = tiny()
    idx, targets = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    targets[0, :5] = -1
    with_grads = m(idx, targets=targets, head_loss=chunked_lm_head_loss)[1]
    with torch.no_grad():
        loss = m(idx, targets=targets, head_loss=chunked_lm_head_loss)[1]
        plain = m(idx, targets=targets)[1]
    assert with_grads.grad_fn is not None and loss.grad_fn is None
    assert torch.equal(loss, with_grads.detach())  # the loss half of the loop is shared, op for op
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)


def test_chunked_loss_with_every_target_ignored_matches_plain():
    # nothing to learn: the plain mean is nan (0/0) with zero gradients; the chunked path says the same
    m = tiny().train()
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.full((2, 8), -1)
    for chunked_loss in (False, True):
        m.zero_grad(set_to_none=True)
        loss = m(idx, targets=targets, head_loss=chunked_lm_head_loss if chunked_loss else None)[1]
        loss.backward()
        assert loss.isnan()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in m.parameters())


def test_chunked_loss_under_bfloat16_autocast_matches_plain():
    m = tiny().train()
    idx = torch.randint(0, 64, (2, 16))

    def run(chunked_loss):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(idx, targets=idx, head_loss=chunked_lm_head_loss if chunked_loss else None)[1]
        loss.backward()
        return loss.detach(), m.lm_head.weight.grad.clone()

    (loss_ref, grad_ref), (loss, grad) = run(False), run(True)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32  # fp32 loss and master weights
    # the same bf16 matmuls as the plain path's; slack only for summation order
    torch.testing.assert_close(loss, loss_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-2, atol=1e-4)



@pytest.mark.slow
def test_compiled_model_trains_through_the_chunked_head_on_one_thread():
    """torch.compile of the model with the chunked head and loss, at one CPU thread (as tests and busy
    laptops run), as train.py compiles it (hardware.compile_model): inductor's kernels for the head's
    in-place steps once corrupted the heap there ("malloc(): unaligned tcache chunk detected"). The head
    stays eager; the compiled step's loss and gradients equal eager's, or (where the compiled step's loss
    is not finite, as torch's AVX2 kernels at one thread gave) the model trains eager, said in one line."""
    code = """
import torch
from model import GPT, GPTConfig
from nanoforge import hardware
from nanoforge.lm_head_loss import chunked_lm_head_loss
torch.manual_seed(0)
m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=62, bias=False))
x = torch.randint(62, (4, 32))
_, eager = m(x, x, head_loss=chunked_lm_head_loss)
eager.backward()
want = [p.grad.clone() for p in m.parameters()]

def step(model):
    m.zero_grad()
    _, loss = model(x, x, head_loss=chunked_lm_head_loss)
    loss.backward()
    return loss.item()

lines = []
used, _ = hardware.compile_model(m, step, lines.append)
assert (used is m) == bool(lines), lines
loss = step(used)
assert abs(loss - eager.item()) < 1e-5 * abs(eager.item()), (loss, eager.item())
assert all(torch.allclose(p.grad, w, rtol=1e-4, atol=1e-6) for p, w in zip(m.parameters(), want))
print("ok", "eager" if used is m else "compiled", *lines)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]
