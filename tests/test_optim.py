"""
optim.py: which optimizer updates which parameters (Muon for the blocks' matrices, AdamW for the rest),
and the learning-rate schedules (cosine, warmup-stable-decay, on an iteration or a progress clock).
"""
import pytest
import torch

from model import GPT, GPTConfig
from nanoforge import optim
from nanoforge.errors import UserError


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, bias=True, **kw))


@pytest.mark.parametrize("tie", [True, False])
def test_muon_takes_the_block_matrices_and_adamw_everything_else(tie):
    m = tiny(tie_embeddings=tie)
    opt = optim.build_optimizer(m, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in m.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in m.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names.values())
    assert "transformer.wte.weight" in adamw and "transformer.h.0.ln_1.weight" in adamw
    assert ("lm_head.weight" in adamw) == (not tie)  # tied: the same tensor, named once as wte
    # decay on AdamW's matrices only, as param_groups does for plain AdamW
    decays = {names[id(p)]: g["weight_decay"] for g in opt.adamw.param_groups for p in g["params"]}
    assert decays["transformer.wte.weight"] == 0.1 and decays["transformer.h.0.attn.c_attn.bias"] == 0.0
    # one step moves every parameter, and the state round-trips into a fresh optimizer
    x = torch.randint(0, 32, (2, 8))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m(x, x)[1].backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in m.named_parameters())
    fresh = optim.build_optimizer(m, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state_dict()["adamw"]["state"].keys() == opt.state_dict()["adamw"]["state"].keys()
    with pytest.raises(UserError, match="'adamw' or 'muon'"):
        optim.build_optimizer(m, "sgd", 1e-3, 0.1, (0.9, 0.95), "cpu")


def test_wsd_is_flat_then_linear_to_min_lr_over_the_cooldown():
    lr = [optim.lr_at(it, 1.0, 10, 110, 0.1, schedule="wsd", cooldown=0.25) for it in range(130)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)  # warmup as cosine's
    assert all(x == 1.0 for x in lr[10:86])  # stable for the first 75% of the 100 decay iterations
    assert lr[98] == pytest.approx(1.0 - 0.9 * (88 / 100 - 0.75) / 0.25)
    assert lr[110] == lr[129] == 0.1


def test_progress_clock_replaces_the_iteration_count_after_warmup():
    # a time-budgeted run: half the budget spent -> the cosine's midpoint, whatever the iteration
    assert optim.lr_at(500, 1.0, 10, 20, 0.0, progress=0.5) == pytest.approx(0.5)
    assert optim.lr_at(5, 1.0, 10, 20, 0.0, progress=0.9) == pytest.approx(6 / 11)  # still warming up
    assert optim.lr_at(50, 1.0, 10, 20, 0.2, schedule="wsd", cooldown=0.5, progress=1.7) == pytest.approx(0.2)  # past the end


def test_batched_muon_steps_exactly_as_torch_muon():
    # optim.Muon orthogonalizes same-shaped matrices as one stack; torch.optim.Muon (one at a time, the
    # reference) must give the very same parameters and momentum, step after step, decay included
    torch.manual_seed(0)
    shapes = [(48, 16), (48, 16), (16, 16), (16, 64), (16, 64), (16, 48)]
    ours = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a = optim.Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.95)
    b = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
    for _ in range(4):
        for p, q in zip(ours, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, ref, start):
        assert not torch.equal(p, p0) and torch.equal(p, q)
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])


def test_orthogonalize_makes_singular_values_near_one():
    # what Muon relies on: the update's singular values are all ~1 (Newton-Schulz's quintic lands them in
    # roughly [0.5, 1.5]), whatever the gradient's spread
    torch.manual_seed(0)
    G = torch.randn(3, 64, 32) @ torch.diag(torch.logspace(-1, 1, 32))  # singular values over 2+ decades
    s = torch.linalg.svdvals(optim.orthogonalize(G).float())
    assert s.min() > 0.5 and s.max() < 1.5
    assert (torch.linalg.svdvals(G).max(-1).values / torch.linalg.svdvals(G).min(-1).values > 100).all()


def test_orthogonalize_in_fp32_where_bf16_is_slow():
    # a CPU without native bf16 runs Muon's iterations in fp32 (hardware.newton_schulz_dtype): the same
    # orthogonalization, kept in fp32, within bf16's rounding of the bf16 one
    torch.manual_seed(0)
    G = torch.randn(2, 48, 16)
    X = optim.orthogonalize(G, dtype=torch.float32)
    s = torch.linalg.svdvals(X)
    assert X.dtype == torch.float32 and s.min() > 0.5 and s.max() < 1.5
    assert torch.allclose(X, optim.orthogonalize(G).float(), atol=0.05)
    # and Muon's step uses it: its first update is the fp32 orthogonalization of the Nesterov momentum
    p = torch.nn.Parameter(torch.randn(48, 16))
    p0, p.grad = p.detach().clone(), torch.randn_like(p)
    optim.Muon([p], lr=0.02, weight_decay=0.0, momentum=0.95, ns_dtype=torch.float32).step()
    nesterov = torch.lerp(p.grad, 0.05 * p.grad, 0.95)
    expected = p0 - 0.02 * 0.2 * 48 ** 0.5 * optim.orthogonalize(nesterov[None], dtype=torch.float32)[0]
    assert torch.allclose(p, expected, atol=1e-6)
