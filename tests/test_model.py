"""
model.py: shapes and loss, the fused attention path against attention_reference (outputs and
gradients), the KV cache against the full forward and against uncached generation, sampling rules
(nanoforge/sampling.py), Hugging Face GPT-2 parity, set_block_size, and the parameter/FLOP counts.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import new_caches
from model import GPT, CausalSelfAttention, GPTConfig
import model as model_module
from nanoforge import sampling, training
from nanoforge.errors import UserError


def tiny(pos_emb="learned", block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                    n_embd=n_embd, dropout=0.0, pos_emb=pos_emb)
    return GPT(cfg).eval()


# ------------------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_forward_shapes(pos_emb):
    m = tiny(pos_emb)
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = m(idx, targets=idx)
    assert logits.shape == (3, 10, 64) and loss.shape == ()
    last, no_loss = m(idx)  # sampling only needs the last position
    assert last.shape == (3, 1, 64) and no_loss is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_loss_ignores_targets_of_minus_one():
    m = tiny()
    idx = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[:, :3] = -1  # e.g. a masked prompt
    logits, loss = m(idx, targets=targets)
    keep = targets != -1
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], targets[keep]))


def test_targets_may_be_a_slice_of_one_sequence():
    # x, y = seq[:, :-1], seq[:, 1:] gives non-contiguous targets (a .view(-1) on them used to crash)
    m = tiny()
    seq = torch.randint(0, 64, (2, 9))
    x, y = seq[:, :-1], seq[:, 1:]
    assert not y.is_contiguous()
    _, loss = m(x, targets=y)
    _, expected = m(x.contiguous(), targets=y.contiguous())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_initial_loss_is_near_uniform(pos_emb):
    # random targets: with tied embeddings, targets == inputs would score below ln(V)
    m = tiny(pos_emb, vocab_size=256)
    idx = torch.randint(0, 256, (8, 16))
    targets = torch.randint(0, 256, (8, 16))
    _, loss = m(idx, targets=targets)
    assert abs(loss.item() - math.log(256)) < 0.1


def test_sequence_longer_than_block_size_is_refused():
    m = tiny(block_size=8)
    with pytest.raises(AssertionError, match="exceeds block_size"):
        m(torch.zeros(1, 9, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------
# fused attention (SDPA) against the reference

def count_reference_calls(monkeypatch):
    """Switch every attention layer to attention_reference and count its calls, so a test can tell the
    switch really took effect."""
    calls = []
    original = model_module.attention_reference

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, "attention_reference", counted)
    monkeypatch.setattr(CausalSelfAttention, "use_sdpa", False)
    return calls


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_sdpa_matches_reference_outputs_and_gradients(pos_emb, monkeypatch):
    m = tiny(pos_emb).train()  # dropout is 0, so training mode is deterministic
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))

    def run():
        m.zero_grad(set_to_none=True)
        logits, loss = m(idx, targets=targets)
        loss.backward()
        return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    logits_fast, loss_fast, grads_fast = run()
    calls = count_reference_calls(monkeypatch)
    logits_ref, loss_ref, grads_ref = run()
    assert len(calls) == m.config.n_layer
    torch.testing.assert_close(logits_fast, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_ref.keys() and len(grads_fast) > 0
    for name in grads_fast:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_sdpa", [True, False])
@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_kv_cache_chunks_match_full_forward(pos_emb, use_sdpa, monkeypatch):
    # prefill (square causal mask), a 3-token chunk (offset mask) and one token (no mask) through the
    # cache must give the logits of one forward over the whole sequence
    if not use_sdpa:
        count_reference_calls(monkeypatch)
    m = tiny(pos_emb)
    idx = torch.randint(0, 64, (2, 11))
    full, _ = m(idx, targets=idx)  # (B, T, V): with targets every position's logits come back
    caches = new_caches(m, 2)
    for c in caches:  # allocated unset: a position not yet written must never be read (NaN would spread)
        c.k.fill_(float("nan")), c.v.fill_(float("nan"))
    pieces = [(0, 7), (7, 10), (10, 11)]
    for a, b in pieces:
        chunk, _ = m(idx[:, a:b], targets=idx[:, a:b], kv_caches=caches)
        torch.testing.assert_close(chunk, full[:, a:b], rtol=1e-5, atol=1e-5)
    assert all(c.length == 11 for c in caches)


# ------------------------------------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(temperature=0.8, top_k=20, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_kv_cache_generation_matches_uncached(pos_emb, sampling):
    # 5 prompt tokens + 30 new ones runs well past block_size 16, where the cache must refill
    m = tiny(pos_emb)
    idx = torch.randint(0, 64, (3, 5))
    outs = []
    for use_kv_cache in (True, False):
        gen = torch.Generator().manual_seed(1234)
        outs.append(m.generate(idx, 30, use_kv_cache=use_kv_cache, generator=gen, **sampling))
    cached, uncached = outs
    assert cached.shape == (3, 35)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, uncached)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    m = tiny()
    idx = torch.zeros(4, 1, dtype=torch.long)
    a = m.generate(idx, 12, top_k=30, generator=torch.Generator().manual_seed(1))
    b = m.generate(idx, 12, top_k=30, generator=torch.Generator().manual_seed(1))
    c = m.generate(idx, 12, top_k=30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_stop_token_stops_early_and_pads_finished_rows(use_kv_cache, monkeypatch):
    # a scripted sampler makes the stopping rule exact: row 0 says 7 at step 1, row 1 at step 2
    script = iter([[5, 3], [7, 4], [9, 7], [1, 1], [2, 2]])

    def scripted(logits, temperature, top_k, top_p, generator):
        return torch.tensor(next(script)).view(-1, 1)

    monkeypatch.setattr(sampling, "next_token", scripted)
    m = tiny()
    idx = torch.tensor([[1, 2], [3, 4]])
    out = m.generate(idx, 10, stop_token=7, use_kv_cache=use_kv_cache)
    # row 0 is padded with 7 after it stopped (not 9); generation ends once both rows stopped
    assert out.tolist() == [[1, 2, 5, 7, 7], [3, 4, 3, 4, 7]]


def test_stop_token_never_sampled_runs_to_max_new_tokens():
    m = tiny()
    idx = torch.randint(0, 64, (2, 3))
    plain = m.generate(idx, 8, top_k=1)
    stop = next(t for t in range(64) if t not in plain[:, 3:])
    assert torch.equal(m.generate(idx, 8, top_k=1, stop_token=stop), plain)


def test_top_k_one_equals_temperature_zero_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    argmax = logits.argmax(dim=-1, keepdim=True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sampling.next_token(logits, 1.0, 1, None, gen), argmax)
    assert torch.equal(sampling.next_token(logits, 0, None, None, None), argmax)
    assert torch.equal(sampling.next_token(logits, 0, 10, 0.5, None), argmax)

    # and in the model: both greedy settings give the argmax loop written out by hand
    m = tiny()
    idx = torch.randint(0, 64, (2, 4))
    seq = idx
    for _ in range(6):
        logits, _ = m(seq)
        seq = torch.cat((seq, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    assert torch.equal(m.generate(idx, 6, top_k=1), seq)
    assert torch.equal(m.generate(idx, 6, temperature=0), seq)


@pytest.mark.parametrize("top_p", [0.0, 1e-6, 0.3])
def test_top_p_keeps_at_least_the_most_likely_token(top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]]).repeat(200, 1)  # p(token 0) ~ 0.61
    gen = torch.Generator().manual_seed(0)
    out = sampling.next_token(logits, 1.0, None, top_p, gen)
    assert torch.equal(out, torch.zeros(200, 1, dtype=torch.long))


def test_top_p_and_top_k_sample_only_inside_the_kept_set():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(400, 1)
    gen = torch.Generator().manual_seed(0)
    # nucleus 0.7: token 0 holds 0.5 < 0.7, so token 1 is needed too; token 2 is not
    assert set(sampling.next_token(logits, 1.0, None, 0.7, gen).flatten().tolist()) == {0, 1}
    assert set(sampling.next_token(logits, 1.0, 3, None, gen).flatten().tolist()) == {0, 1, 2}
    assert set(sampling.next_token(logits, 1.0, None, None, gen).flatten().tolist()) == {0, 1, 2, 3}
    # a low temperature sharpens the distribution towards the argmax, a high one flattens it
    cold = sampling.next_token(logits, 0.02, None, None, gen).flatten()
    hot = sampling.next_token(logits, 5.0, None, None, gen).flatten()
    assert set(cold.tolist()) == {0}
    assert (hot == 3).sum() > (sampling.next_token(logits, 1.0, None, None, gen).flatten() == 3).sum()


def test_greedy_is_torchs_argmax():
    """sampling.greedy (numpy's argmax for float32 on a CPU) picks what logits.argmax does: the first of tied
    largest values, past -inf masks, on strided rows, and torch's own argmax elsewhere (bfloat16)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 3, 1000)[:, -1]  # (6, 1000), rows of a larger tensor: strided
    logits[1, [7, 300]] = 50.0  # a tie: the first wins
    logits[2, :500] = float("-inf")
    logits[3] = float("-inf")  # all masked: index 0, as torch gives
    for x in (logits, logits.to(torch.bfloat16)):
        got = sampling.greedy(x)
        assert got.shape == (6, 1) and got.dtype == torch.int64 and torch.equal(got, x.argmax(-1, keepdim=True))
    assert int(sampling.greedy(logits)[1]) == 7


def test_draw_follows_the_probabilities_as_multinomial_does():
    """sampling.draw (one uniform number a row, the inverse of the cumulative probabilities) against
    torch.multinomial, its reference: the same frequencies, and a token of probability 0 never drawn."""
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    rows, n = probs.repeat(40000, 1), 40000
    gen = torch.Generator().manual_seed(0)
    sigma = (probs * (1 - probs) / n).sqrt()
    for draw in (sampling.draw, sampling.draw_reference):
        freq = torch.bincount(draw(rows, gen).flatten(), minlength=6) / n
        assert freq[1] == freq[5] == 0 and ((freq - probs).abs() <= 5 * sigma).all(), (draw, freq)


def test_draw_never_picks_a_token_ruled_out(monkeypatch):
    """Whatever the uniform number, even where u * total rounds up to the total, the token drawn has a
    probability above 0 (a constrained decoder's masked tokens have exactly 0)."""
    for probs, first, last in (([0.0, 0.25, 0.0, 0.75, 0.0, 0.0], 1, 3), ([0.0, 1e-30, 0.3, 0.0], 1, 2),
                               ([1 / 3, 0.0, 1 / 3, 1 / 3, 0.0], 0, 3)):
        probs = torch.tensor([probs])
        for u in (0.0, 0.5, 1 - 2 ** -40, 1 - 2 ** -53):
            monkeypatch.setattr(sampling.torch, "rand", lambda *a, u=u, **k: torch.full((1, 1), u, dtype=torch.float64))
            i = int(sampling.draw(probs))
            assert probs[0, i] > 0 and (i == first if u == 0 else True) and (i == last if u > 0.9 else True)


@pytest.mark.parametrize("top_p", [0.0, 1e-6, 0.3, 0.9, 0.999])
def test_nucleus_keeps_what_sorting_the_whole_vocabulary_keeps(top_p):
    """sampling.nucleus looks among the most likely tokens only; nucleus_reference sorts all V. The same tokens
    kept, at their own logits, but for one token at the edge where the probabilities summed in their two orders
    round to either side of top_p."""
    torch.manual_seed(0)
    for scale in (0.01, 1.0, 8.0):  # flat (the nucleus is most of the vocabulary: the search grows to V) to peaked
        logits = torch.randn(4, 5000) * scale
        got, want = sampling.nucleus(logits, top_p), sampling.nucleus_reference(logits, top_p)
        kept, kept_ref = got > float("-inf"), want > float("-inf")
        assert torch.equal(got[kept], logits[kept]) and kept.any(-1).all()
        cum = torch.softmax(logits, -1).sort(descending=True).values.cumsum(-1)  # (4, V)
        for r in range(4):
            a, b = sorted((int(kept[r].sum()), int(kept_ref[r].sum())))
            assert torch.equal(kept[r], kept_ref[r]) or (b == a + 1 and abs(float(cum[r, a - 1]) - top_p) < 1e-5)


# ------------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 weights

def test_from_pretrained_matches_hugging_face_logits(hf_gpt2_dir):
    folder, hf = hf_gpt2_dir
    m = GPT.from_pretrained(folder).eval()
    assert (m.config.n_layer, m.config.n_head, m.config.n_embd, m.config.block_size, m.config.vocab_size) \
        == (2, 2, 64, 64, 100)
    torch.manual_seed(0)
    idx = torch.randint(0, 100, (2, 64))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = m(idx, targets=idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# set_block_size, counts

@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_set_block_size_crops_and_keeps_logits_of_first_positions(pos_emb):
    m = tiny(pos_emb, block_size=32)
    idx = torch.randint(0, 64, (2, 12))
    before, _ = m(idx, targets=idx)
    m.set_block_size(16)
    after, _ = m(idx, targets=idx)
    torch.testing.assert_close(after, before)
    assert m.config.block_size == 16
    if pos_emb == "learned":
        assert m.transformer.wpe.weight.shape == (16, 32)
    with pytest.raises(AssertionError):
        m(torch.zeros(1, 17, dtype=torch.long))
    # generation past the new block size: the cache is sized and refilled by the cropped config
    prompt = idx[:, :4]
    cached = m.generate(prompt, 20, top_k=1)
    assert torch.equal(cached, m.generate(prompt, 20, top_k=1, use_kv_cache=False))


def test_fit_context_grows_a_rotary_model_and_refuses_learned_positions():
    m = tiny("rope", block_size=16)
    idx = torch.randint(0, 64, (2, 40))
    before, _ = m(idx[:, :16], targets=idx[:, :16])
    lines = []
    training.fit_context(m, 40, "base", lines.append)
    assert m.config.block_size == 40 and "trained on 16 tokens; training at 40" in lines[0]
    after, _ = m(idx, targets=idx)  # (2, 40, V): the first 16 positions are rotated as before
    torch.testing.assert_close(after[:, :16], before)
    # what was computed at a distance it never saw equals the plain rotation of those positions
    torch.testing.assert_close(m.transformer.h[0].attn.rotary.cos, tiny("rope", block_size=40).transformer.h[0].attn.rotary.cos)
    cached = m.generate(idx[:, :4], 44, top_k=1)
    assert torch.equal(cached, m.generate(idx[:, :4], 44, top_k=1, use_kv_cache=False))
    with pytest.raises(UserError, match="learned positions: there are no rows"):
        training.fit_context(tiny("learned", block_size=16), 40, "base", lines.append)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_num_params_and_flops(pos_emb):
    m = tiny(pos_emb)
    # the tied wte/lm_head appears twice in the state dict and counts once
    unique = {t.data_ptr(): t.numel() for t in m.state_dict().values()}
    total = sum(unique.values())
    wpe = m.config.block_size * m.config.n_embd if pos_emb == "learned" else 0
    assert m.get_num_params(non_embedding=False) == total
    assert m.get_num_params() == total - wpe
    cfg = m.config
    N = m.get_num_params()
    # 6N for the weight matmuls plus the attention term, 12 * L * C * T (PaLM, appendix B)
    assert m.flops_per_token(8) == 6 * N + 12 * cfg.n_layer * cfg.n_embd * 8
    assert m.flops_per_token() == m.flops_per_token(cfg.block_size)
    assert m.estimate_mfu(tokens_per_second=1000, peak_flops=1000 * m.flops_per_token()) == pytest.approx(1.0)


def test_decoding_head_copy_gives_the_lm_heads_logits():
    """generate_stream multiplies by a (C, V) copy of lm_head's weight: the same logits as lm_head."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, bias=False)).eval()
    idx = torch.randint(50, (3, 7))
    plain, _ = model(idx)
    copied, _ = model(idx, head_t=model.lm_head.weight.t().contiguous())
    assert copied.shape == plain.shape == (3, 1, 50)
    torch.testing.assert_close(copied, plain, rtol=1e-5, atol=1e-6)
