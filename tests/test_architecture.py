"""
model.py's architecture options (GPTConfig: norm, mlp, qk_norm, tie_embeddings, zero_init, logit_softcap):
each one's fast path against its reference, the KV cache against the full forward with the options on,
that each trains, and that the GPT-2 defaults stay GPT-2.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import new_caches
from model import GPT, GPTConfig, ReLUSquared
from nanoforge import hardware, training

gelu_tanh_sigmoid = hardware.GELUTanhSigmoid()  # the form compiled runs take

ALL_ON = dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, zero_init=True,
              logit_softcap=15.0)
VARIANTS = {
    "gpt2": {},
    "all_on": ALL_ON,
    "swiglu": dict(ALL_ON, mlp="swiglu", zero_init=False),
    "tied_rmsnorm_relu2": dict(norm="rmsnorm", mlp="relu2", logit_softcap=30.0),
}


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False, **options)
    return GPT(cfg)


def randomise(m):
    """zero_init leaves projections at zero, which would hide a wrong path: give every weight a value."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def test_relu_squared_matches_its_reference_in_values_and_gradients():
    x = torch.randn(4, 7, 33, dtype=torch.float64)
    x[0, 0, :3] = torch.tensor([0.0, -0.0, -1.0])  # the kink and negatives
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    ReLUSquared.apply(a).backward(grad)
    F.relu(b).square().backward(grad)
    assert torch.equal(ReLUSquared.apply(x), F.relu(x).square())
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(ReLUSquared.apply, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))


def test_gelu_sigmoid_form_matches_gpt2s_tanh_gelu_in_values_and_gradients():
    x = torch.cat([torch.linspace(-12, 12, 2001, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn_like(x)
    gelu_tanh_sigmoid(a).backward(grad)
    F.gelu(b, approximate="tanh").backward(grad)
    torch.testing.assert_close(gelu_tanh_sigmoid(x), F.gelu(x, approximate="tanh"), rtol=0, atol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    x32 = torch.randn(4096) * 4  # float32, as trained: float rounding apart
    torch.testing.assert_close(gelu_tanh_sigmoid(x32), F.gelu(x32, approximate="tanh"), rtol=1e-5, atol=1e-6)


def test_compiled_code_takes_the_sigmoid_gelu_and_the_model_agrees_with_eager(monkeypatch):
    m = randomise(tiny())
    x = torch.randint(0, 64, (2, 16))
    eager = m(x, x)[1]
    calls = []
    forward = hardware.GELUTanhSigmoid.forward
    monkeypatch.setattr(hardware.GELUTanhSigmoid, "forward", lambda self, h: calls.append(h.shape) or forward(self, h))
    hardware.prepare_to_compile(m)  # what compile_model does before torch.compile
    compiled_form = m(x, x)[1]
    assert calls == [(2, 16, 128)] * 2  # each block's MLP
    torch.testing.assert_close(compiled_form, eager, rtol=1e-6, atol=1e-6)
    hardware.prepare_to_compile(m, undo=True)  # compiling failed: eager's form again
    assert all(type(b.mlp.gelu) is torch.nn.GELU for b in m.transformer.h)
    assert torch.equal(m(x, x)[1], eager)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward_with_each_variant(variant):
    m = randomise(tiny(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 64, (2, 11))
    full, _ = m(idx, targets=idx)  # (B, T, V)
    caches = new_caches(m, 2)
    for a, b in [(0, 7), (7, 10), (10, 11)]:
        chunk, _ = m(idx[:, a:b], targets=idx[:, a:b], kv_caches=caches)
        torch.testing.assert_close(chunk, full[:, a:b], rtol=1e-5, atol=1e-5)
    prompt = idx[:, :4]
    assert torch.equal(m.generate(prompt, 20, top_k=1), m.generate(prompt, 20, top_k=1, use_kv_cache=False))


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_learns_a_batch_and_every_parameter_gets_gradient(variant):
    m = tiny(**VARIANTS[variant]).train()
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    touched = set()
    first = None
    for _ in range(30):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        touched |= {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
    assert touched == {n for n, _ in m.named_parameters()}
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_zero_init_starts_each_block_as_identity_and_uniform_logits():
    m = tiny(**ALL_ON)
    for block in m.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert not m.lm_head.weight.any()  # untied: the output layer starts at zero, so every logit is 0
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = m(idx, idx)
    assert not logits.any()
    assert loss.item() == pytest.approx(math.log(64), abs=1e-6)
    # tied embeddings keep the embedding's random init: zero_init must not zero the shared matrix
    tied = tiny(zero_init=True)
    assert tied.lm_head.weight.std() > 0.01 and tied.lm_head.weight is tied.transformer.wte.weight


def test_logit_softcap_bounds_logits_smoothly():
    capped = randomise(tiny(logit_softcap=1.0))
    plain = tiny()
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        c, _ = capped(idx, idx)
        p, _ = plain(idx, idx)
    assert p.abs().max() > 1.0  # the random weights make logits beyond the cap
    assert c.abs().max() < 1.0
    torch.testing.assert_close(c, torch.tanh(p))


def test_untied_head_is_its_own_matrix_counted_and_resized():
    m = tiny(tie_embeddings=False)
    assert m.lm_head.weight is not m.transformer.wte.weight
    wpe = 16 * 32
    total = sum(p.numel() for p in m.parameters())
    assert m.get_num_params(non_embedding=False) == total
    assert m.get_num_params() == total - wpe - 64 * 32  # the embedding lookup does no matmul work
    training.grow_vocab(m, 70)
    assert m.transformer.wte.weight.shape == m.lm_head.weight.shape == (70, 32)
    assert m.lm_head.weight is not m.transformer.wte.weight
    logits, _ = m(torch.tensor([[69, 1]]), torch.tensor([[1, 69]]))
    assert logits.shape == (1, 2, 70)


def test_swiglu_keeps_the_parameter_count_near_the_gelu_mlp():
    gelu = sum(p.numel() for p in tiny().transformer.h[0].mlp.parameters())
    swiglu = sum(p.numel() for p in tiny(mlp="swiglu").transformer.h[0].mlp.parameters())
    assert 0.9 < swiglu / gelu < 1.25


def test_defaults_are_gpt2_and_bad_choices_are_named():
    assert GPTConfig().not_gpt2() == []
    assert GPTConfig(mlp="relu2", qk_norm=True).not_gpt2() == ["mlp='relu2'", "qk_norm=True"]
    with pytest.raises(ValueError, match="mlp must be one of 'gelu', 'relu2', 'swiglu', got 'relu3'"):
        GPTConfig(mlp="relu3")
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")


def test_bf16_training_on_cpu_takes_the_plain_attention_path_and_agrees_with_fp32(monkeypatch):
    # SDPA's CPU backward is slow in bf16: training (a backward follows) takes the plain path; without a
    # backward (decoding, evaluation) the fused kernel is the faster one; all agree with fp32
    import model as model_module
    calls = []
    plain = model_module.attention_reference
    monkeypatch.setattr(model_module, "attention_reference", lambda *a, **k: calls.append(1) or plain(*a, **k))
    # set from outside by the scripts that train: only bf16 on a CPU leaves the fused kernel's backward
    assert hardware.sdpa_backward("cpu", "float32") and hardware.sdpa_backward("cuda", "bfloat16")
    monkeypatch.setattr(model_module.CausalSelfAttention, "sdpa_backward", hardware.sdpa_backward("cpu", "bfloat16"))
    m = randomise(tiny(**ALL_ON)).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        fp32, _ = m(idx, idx)
        assert calls == []  # fp32 takes SDPA
        with torch.autocast("cpu", torch.bfloat16):
            bf16_eval, _ = m(idx, idx)
        assert calls == []  # bf16 without a backward: SDPA too
    with torch.autocast("cpu", torch.bfloat16):
        bf16, _ = m(idx, idx)
    assert len(calls) == m.config.n_layer  # bf16 with gradients: the plain path, in every layer
    for out in (bf16, bf16_eval):
        assert (out.detach().float() - fp32).abs().max() < 0.05 * fp32.abs().max()
