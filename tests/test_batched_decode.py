"""
nanoforge/engine.py's batched decoding (slot_step with SlotKVCache), the step a server's continuous batching
runs: sequences of different lengths decoded together must give each the tokens it gets alone.
"""
import pytest
import torch

from model import GPT, GPTConfig
from nanoforge.engine import SlotKVCache, slot_step


def tiny(pos_emb, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=50, pos_emb=pos_emb)
    return GPT(cfg).eval()


def slot_caches(model, S):
    c = model.config
    return [SlotKVCache(S, c.n_head, c.block_size, c.n_embd // c.n_head, "cpu", torch.float32)
            for _ in range(c.n_layer)]


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_batched_greedy_decode_matches_generate_alone(pos_emb, use_sdpa, monkeypatch):
    """Three prompts of 3, 11 and 7 tokens in slots 2, 0 and 3 of a 4-slot cache (out of order, one slot
    unused), prefilled one at a time, then decoded together one token per step: each row's greedy tokens
    are model.generate's for that prompt alone. A row that starts later joins the running batch."""
    from model import CausalSelfAttention
    monkeypatch.setattr(CausalSelfAttention, "use_sdpa", use_sdpa)
    model = tiny(pos_emb)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(50, (n,), generator=g).tolist() for n in (3, 11, 7)]
    slots = [2, 0, 3]
    n_new = 20
    expected = [model.generate(torch.tensor([p]), n_new, top_k=1)[0, len(p):].tolist() for p in prompts]

    caches = slot_caches(model, 4)
    out = {i: [] for i in range(3)}
    pos = {}
    running = []
    for step in range(n_new + 5):  # the first two start together, the third joins five steps later
        joining = [i for i, start in enumerate((0, 0, 5)) if start == step]
        for i in joining:  # prefill: one row, the whole prompt
            p = prompts[i]
            logits = slot_step(model, torch.tensor([p]), caches, torch.tensor([slots[i]]), torch.tensor([0]))
            out[i].append(int(logits.argmax(-1)))
            pos[i] = len(p)
            running.append(i)
        running = [i for i in running if len(out[i]) < n_new]
        if not running:
            continue
        idx = torch.tensor([[out[i][-1]] for i in running])  # (B, 1)
        logits = slot_step(model, idx, caches, torch.tensor([slots[i] for i in running]),
                           torch.tensor([pos[i] for i in running]))  # (B, V)
        for i, nxt in zip(running, logits.argmax(-1).tolist()):
            out[i].append(nxt)
            pos[i] += 1
    assert [out[i] for i in range(3)] == expected


def test_batched_logits_match_single_sequence_logits():
    """Not only the argmax: the logits of a row decoded beside a longer one equal its logits alone."""
    model = tiny("learned")
    a, b = [1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]
    caches = slot_caches(model, 2)
    for slot, p in enumerate((a, b)):
        slot_step(model, torch.tensor([p[:-1]]), caches, torch.tensor([slot]), torch.tensor([0]))
    together = slot_step(model, torch.tensor([[a[-1]], [b[-1]]]), caches, torch.tensor([0, 1]),
                         torch.tensor([len(a) - 1, len(b) - 1]))  # (2, V)
    for row, p in enumerate((a, b)):
        alone, _ = model(torch.tensor([p]))  # (1, 1, V), no cache at all
        torch.testing.assert_close(together[row], alone[0, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slot", [0, 2])
def test_a_row_continued_by_several_tokens_at_once_matches_the_model_alone(slot):
    """A prompt given in two parts, the second several tokens at once after the cached first (queries that
    must not see the keys after their own, in a cache already holding some): the logits of the whole alone."""
    model = tiny("rope")
    p = list(range(1, 12))
    caches = slot_caches(model, 3)
    slot_step(model, torch.tensor([p[:5]]), caches, torch.tensor([slot]), torch.tensor([0]))
    logits = slot_step(model, torch.tensor([p[5:]]), caches, torch.tensor([slot]), torch.tensor([5]))  # (1, V)
    alone, _ = model(torch.tensor([p]))  # (1, 1, V)
    torch.testing.assert_close(logits[0], alone[0, -1], rtol=1e-5, atol=1e-5)
