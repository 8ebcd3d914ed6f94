"""
Weights for decoding (nanoforge/quantize.py, nanoforge/cpu_kernels.c) against float32 torch, their
reference: the CPU kernels against torch's matmuls, the int8 layer against its dequantized weights on every
path, and a model trained here on Tiny Shakespeare's characters keeps its greedy text, its logits and its
held-out loss; the scripts' --quantize flag does what it says, and a wrong value is one line.
"""
import copy
import functools
import gc
import json
import os
import queue
import re
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import assert_one_line_error, new_caches, run
import model as model_module
from model import GPT, GPTConfig
from nanoforge.checkpoint import load_model, save_checkpoint
from nanoforge.engine import Engine, Sequence, TextStream
from nanoforge import cpu_kernels, quantize
from nanoforge.quantize import CPULinear, Int8Linear, decoding_weights, swap_linears
from nanoforge.tokenizer import load_tokenizer
from nanoforge.tokens import open_tokens, split_path

BLOCK = 64


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    """(model, val tokens, out_dir): a 2-layer GPT trained 300 steps on the characters (held-out loss ~2.55,
    a uniform guess 4.1), saved as a checkpoint the scripts can load."""
    train = torch.from_numpy(open_tokens(split_path(char_data, "train")).astype(np.int64))
    val = torch.from_numpy(open_tokens(split_path(char_data, "val")).astype(np.int64))
    meta = json.load(open(os.path.join(char_data, "meta.json")))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=BLOCK, vocab_size=meta["vocab_size"],
                          bias=True, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        starts = torch.randint(len(train) - BLOCK - 1, (16,))
        x = torch.stack([train[s:s + BLOCK] for s in starts])  # (B, T)
        y = torch.stack([train[s + 1:s + 1 + BLOCK] for s in starts])  # (B, T)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    out = tmp_path_factory.mktemp("quantize_ckpt")
    save_checkpoint(str(out / "ckpt.pt"), model, {"tokenizer": meta["tokenizer"]})
    return model, val, str(out)


def val_loss(model, val):
    starts = torch.arange(0, len(val) - BLOCK - 1, BLOCK)[:100]
    x = torch.stack([val[s:s + BLOCK] for s in starts])
    y = torch.stack([val[s + 1:s + 1 + BLOCK] for s in starts])
    with torch.no_grad():
        return model(x, y)[1].item()


def cpu_has_avx2():
    with open("/proc/cpuinfo") as f:
        flags = f.read().split()
    return "avx2" in flags and "fma" in flags


def test_the_cpu_kernels_build_here_once_and_step_aside_cleanly(tmp_path, monkeypatch):
    """On an x86 CPU with AVX2 and a C compiler (this machine, CI's) the kernels build, into the cache
    folder, once; with no working compiler or NANOFORGE_CPU_KERNELS=0 they are unavailable with the reason
    (and the model runs on torch's matmuls), never an error."""
    def fresh(**env):
        monkeypatch.setattr(cpu_kernels, "_lib", None)
        monkeypatch.setattr(cpu_kernels, "_why", None)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return cpu_kernels.available()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fresh() == (cpu_has_avx2() and bool(shutil.which("cc"))), cpu_kernels.status()
    built = list((tmp_path / "nanoforge").iterdir())
    assert [p.suffix for p in built] == [".so"]  # the library alone: no temporary left beside it
    stamp = built[0].stat().st_mtime_ns
    assert fresh() and built[0].stat().st_mtime_ns == stamp  # the second process loads it, no rebuild
    # a kernel called before anything asked available() loads the library itself, then computes
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_why", None)
    x, w = torch.randn(1, 16), torch.randn(4, 16)
    torch.testing.assert_close(cpu_kernels.linear_f32(x, cpu_kernels.pack_f32(w), 4), x @ w.T)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    x, w8, scales = torch.randn(1, 32), torch.randint(-127, 128, (4, 32), dtype=torch.int8), torch.rand(4)
    ref = q8_reference(x, w8, scales)
    got = cpu_kernels.linear_q8(x, cpu_kernels.pack_q8(w8), scales)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert not fresh(CC="false", XDG_CACHE_HOME=str(tmp_path / "other"))
    assert "false could not build cpu_kernels.c" in cpu_kernels.status()
    assert not list((tmp_path / "other").rglob("*"))[1:]  # the failed build left nothing but its folder
    assert not fresh(NANOFORGE_CPU_KERNELS="0") and "NANOFORGE_CPU_KERNELS=0" in cpu_kernels.status()
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.linear_f32(torch.randn(1, 16), cpu_kernels.pack_f32(torch.randn(4, 16)), 4)


def q8_reference(x, w, scales):
    """What linear_q8 computes, in torch: x rounded to int8 in blocks of 32 (each block's largest magnitude
    on 127), times the dequantized weight."""
    blocks = x.view(x.size(0), -1, 32)  # (M, K/32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127  # (M, K/32, 1)
    xq = torch.where(d > 0, torch.round(blocks / d.clamp(min=1e-30)), 0) * d
    return xq.view_as(x) @ (w.float() * scales[:, None]).T


@pytest.mark.skipif(not cpu_has_avx2(), reason="the kernels are written for AVX2 (checked on every x86 CI machine)")
@pytest.mark.parametrize("rows", [1, 3, 16, 150])  # 150: past the int8 kernel's chunk of 64 rows, a prefill's
def test_the_cpu_kernels_compute_what_torch_does(rows):
    assert cpu_kernels.available(), cpu_kernels.status()
    torch.manual_seed(0)
    for K in (96, 3072):  # 37 rows of w: the last group of four padded with three zero rows
        x, w = torch.randn(rows, K), torch.randn(37, K)
        packed = cpu_kernels.pack_f32(w)
        assert packed.shape == cpu_kernels.packed_shape(37, K, 16) and torch.equal(cpu_kernels.unpack(packed, 37), w)
        torch.testing.assert_close(cpu_kernels.linear_f32(x, packed, 37), x @ w.T, rtol=1e-5, atol=1e-4)
        # as F.linear: a bias added (in the kernel), and leading dims kept (rows split as a model's (B, T))
        bias = torch.randn(37)
        got = cpu_kernels.linear_f32(x.view(1, rows, K), packed, 37, bias)
        assert got.shape == (1, rows, 37)
        torch.testing.assert_close(got, F.linear(x, w, bias)[None], rtol=1e-5, atol=1e-4)
        # bfloat16 weights: rounded to nearest, the layout pack_f32's, each widened to float32 exactly
        packed = cpu_kernels.pack_bf16(w)
        assert packed.dtype == torch.bfloat16 and torch.equal(cpu_kernels.unpack(packed, 37), w.to(torch.bfloat16))
        got = cpu_kernels.linear_bf16(x.view(1, rows, K), packed, 37, bias)
        torch.testing.assert_close(got, F.linear(x, w.to(torch.bfloat16).float(), bias)[None], rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError, match="contiguous torch.bfloat16"):  # float32 weights are not read as bf16
            cpu_kernels.linear_bf16(x, cpu_kernels.pack_f32(w), 37)
    for K, N in ((96, 303), (768, 300)):  # 303: the last group of four padded with a zero row
        x = torch.randn(rows, K)
        x[0, 32:64] = 0  # a block of zeros has no scale to divide by
        x[-1, :32] *= 1000  # one loud block must not drown the others: each block has its own scale
        w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        scales = torch.rand(N) / 100
        packed = cpu_kernels.pack_q8(w)
        assert packed.shape == cpu_kernels.packed_shape(N, K, 32) and torch.equal(cpu_kernels.unpack(packed, N), w)
        got, ref = cpu_kernels.linear_q8(x, packed, scales), q8_reference(x, w, scales)
        assert got.shape == (rows, N)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        bias = torch.randn(N)
        got = cpu_kernels.linear_q8(x.view(rows, 1, K), packed, scales, bias)
        assert got.shape == (rows, 1, N)
        torch.testing.assert_close(got, (ref + bias)[:, None], rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    with pytest.raises(ValueError, match="multiple of 32"):
        cpu_kernels.linear_q8(torch.randn(1, 100), torch.zeros(4, 100, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_kernels.linear_f32(torch.randn(16, 4).T, cpu_kernels.pack_f32(torch.randn(4, 16)), 4)
    with pytest.raises(ValueError, match="bias None or 4 contiguous float32s"):  # a wrong bias is never read past its end
        cpu_kernels.linear_f32(torch.randn(1, 16), cpu_kernels.pack_f32(torch.randn(4, 16)), 4, torch.zeros(3))
    with pytest.raises(ValueError, match="bias None or 4 contiguous float32s"):
        cpu_kernels.linear_q8(torch.randn(1, 32), cpu_kernels.pack_q8(torch.zeros(4, 32, dtype=torch.int8)),
                              torch.ones(4), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_kernels.linear_f32(torch.randn(1, 100), torch.zeros(1, 6, 4, 16), 4)
    with pytest.raises(ValueError, match=r"of shape \(1, 1, 4, 32\)"):  # an unpacked weight is refused, not misread
        cpu_kernels.linear_q8(torch.randn(1, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4))


def test_a_rows_products_do_not_depend_on_the_rows_beside_it():
    """serve.py decodes many sequences in one batch: every kernel gives a row the same numbers, bit for bit,
    alone and among any number of others (bf16 widens its weights once from 8 rows on: the same sums, in the
    same order; int8 takes rows 64 at a time)."""
    torch.manual_seed(0)
    K, N = 3072, 37  # K past a pass (1024): partial sums too
    x, w = torch.randn(70, K), torch.randn(N, K)
    w8, scales = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N) / 100
    products = [lambda x: cpu_kernels.linear_f32(x, cpu_kernels.pack_f32(w), N),
                lambda x: cpu_kernels.linear_bf16(x, cpu_kernels.pack_bf16(w), N),
                lambda x: cpu_kernels.linear_q8(x, cpu_kernels.pack_q8(w8), scales)]
    for product in products:
        alone = torch.cat([product(x[i:i + 1]) for i in range(len(x))])
        for M in (2, 7, 8, 70):
            assert torch.equal(product(x[:M]), alone[:M]), M


@pytest.mark.skipif(not cpu_has_avx2(), reason="the kernels are written for AVX2 (checked on every x86 CI machine)")
def test_one_query_attention_is_sdpas():
    """cpu_kernels.attention, what decoding on a CPU attends with: one query a sequence through attend_one gives
    SDPA's numbers, keys read in place from a longer cache, a boolean mask (a server's padded rows) or none;
    a row gets the same bits alone and batched; every other call is SDPA's own."""
    assert cpu_kernels.available(), cpu_kernels.status()
    torch.manual_seed(0)
    for B, H, L, D in ((1, 12, 1, 64), (3, 4, 37, 32), (2, 2, 300, 8)):
        cache = torch.randn(2, B, H, L + 9, D)  # keys and values of a longer cache: views with its strides
        k, v = cache[0, :, :, :L], cache[1, :, :, :L]
        q = (30 * torch.randn(B, 1, H, D)).transpose(1, 2)  # (B, H, 1, D), not contiguous; large scores too
        torch.testing.assert_close(cpu_kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        lengths = torch.randint(1, L + 1, (B,))  # rows of their own length, the rest padding
        masks = [torch.arange(L)[None, None, None, :] < lengths[:, None, None, None],  # (B, 1, 1, L)
                 torch.rand(B, H, 1, L) > 0.5, torch.rand(1, L) > 0.5]  # holes anywhere, per head; one for all
        for mask in masks:
            mask[..., 0] = True  # every row sees a key
            torch.testing.assert_close(cpu_kernels.attention(q, k, v, attn_mask=mask),
                                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        torch.testing.assert_close(cpu_kernels.attention(q, k, v, scale=0.3),
                                   F.scaled_dot_product_attention(q, k, v, scale=0.3))
        together = cpu_kernels.attention(q, k, v, attn_mask=masks[0])
        for b in range(B):
            assert torch.equal(cpu_kernels.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], attn_mask=masks[0][b:b + 1]),
                               together[b:b + 1])
    # not one query, causal, dropout or float64: SDPA itself
    q, k, v = torch.randn(3, 1, 2, 5, 16).unbind(0)
    assert torch.equal(cpu_kernels.attention(q, k, v, is_causal=True),
                       F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q1 = q[:, :, :1].double()
    assert torch.equal(cpu_kernels.attention(q1, k.double(), v.double()),
                       F.scaled_dot_product_attention(q1, k.double(), v.double()))


@pytest.mark.skipif(not cpu_has_avx2(), reason="the kernels are written for AVX2 (checked on every x86 CI machine)")
def test_a_layer_binds_its_kernel_once_and_again_when_its_tensors_change():
    """CPULinear and Int8Linear check their weights once (a cpu_kernels.Bound); a tensor replaced afterwards or
    the layer converted is what the next call multiplies by, never the memory it left, and a Bound keeps the
    memory it points into alive by itself."""
    assert cpu_kernels.available(), cpu_kernels.status()
    torch.manual_seed(0)
    x = torch.randn(2, 64)

    def unbound(layer):  # the product with every check made again: what the layer's tensors give now
        if isinstance(layer, Int8Linear):
            return cpu_kernels.linear_q8(x, layer.weight, layer.scales, layer.bias)
        product = cpu_kernels.linear_bf16 if layer.bf16 else cpu_kernels.linear_f32
        return product(x, layer.packed_weight, 40, layer.bias)
    for make in (CPULinear, functools.partial(CPULinear, bf16=True), Int8Linear):
        layer = make(nn.Linear(64, 40))
        first = layer.product()
        assert layer.product() is first  # bound once
        assert torch.equal(layer(x), unbound(layer))
        layer.bias = nn.Parameter(torch.randn(40), requires_grad=False)  # a tensor replaced
        weight = "weight" if isinstance(layer, Int8Linear) else "packed_weight"
        setattr(layer, weight, getattr(layer, weight).flip(0))  # another weight (as packed_on_huge_pages does)
        gc.collect()
        assert torch.equal(layer(x), unbound(layer)) and layer.product() is not first
        pointer = layer.bias.data_ptr()
        layer.share_memory()  # converted: every tensor moved to shared memory
        assert layer.bias.data_ptr() != pointer and torch.equal(layer(x), unbound(layer))
        assert copy.deepcopy(layer).bound is None  # a copy binds its own
        layer.double()  # float64 bias (and scales) are refused, not read as float32
        with pytest.raises(ValueError, match="float32"):
            layer(x)
    w, bias = torch.randn(40, 64), torch.randn(40)
    want = F.linear(x, w, bias)
    bound = cpu_kernels.bind_f32(cpu_kernels.pack_f32(w), 40, 64, bias.clone())  # the only references
    gc.collect()
    torch.testing.assert_close(bound(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"contiguous float32 tensor on the CPU, \(\.\.\., 64\)"):
        bound(torch.randn(2, 32))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 rows: a prefill's, more than the float32 kernel takes
@pytest.mark.parametrize("kernels", [True, False])  # False: torch's int8 kernel, where the CPU kernels are not
def test_int8_linear_is_its_dequantized_weight_in_float32(bias, rows, kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.manual_seed(0)
    linear = nn.Linear(96, 202, bias=bias)  # 202 rows: the packed weight's last group is padded
    q = Int8Linear(linear)
    assert q.packed == (kernels and cpu_kernels.available())
    w8 = q.int8_weight()
    assert w8.shape == (202, 96) and w8.dtype == torch.int8 and w8.abs().max() == 127  # each row's largest on 127
    # per output row, the rounding moves a weight by at most half a step of that row's scale
    assert (q.dequantized() - linear.weight).abs().le(q.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, rows, 96)
    got, ref = q(x), q.reference(x)
    assert got.shape == (3, rows, 202) and got.dtype == torch.float32
    # the kernels round the activations (to int8 in blocks, or to bf16): the reference's to that rounding
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_float32_decoding_weights_keep_the_models_numbers(trained):
    """--quantize=none on a CPU: the same weights (the head still tied to the embedding), multiplied by the
    CPU kernels where they are, give the model's logits and greedy tokens."""
    model, val, _ = trained
    k = decoding_weights(copy.deepcopy(model), "none")
    if cpu_kernels.available():
        assert all(type(m) is not nn.Linear for m in k.modules()) and isinstance(k.lm_head, CPULinear)
        c_fc = k.transformer.h[0].mlp.c_fc  # a block's weight is stored once, packed, and unpacks to itself
        assert c_fc.packed and getattr(c_fc, "weight", None) is None
        assert torch.equal(c_fc.full_weight(), model.transformer.h[0].mlp.c_fc.weight)
        assert all(block.attn.sdpa is cpu_kernels.attention for block in k.transformer.h)  # and attend_one
    assert k.lm_head.weight is k.transformer.wte.weight
    odd = CPULinear(nn.Linear(100, 7))  # a width the kernel does not take stays as it is, on F.linear
    x = torch.randn(2, 100)
    assert not odd.packed and torch.equal(odd(x), F.linear(x, odd.weight, odd.bias))
    prompt = val[:16][None]
    with torch.no_grad():
        more = val[:3 * BLOCK].view(3, BLOCK)  # more rows than the kernel takes: torch's matmul, the weight unpacked
        assert more.numel() > quantize.FEW_ROWS
        for x in (prompt, prompt[:, :1], more):
            torch.testing.assert_close(k(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(k.generate(prompt, 48, temperature=0.0), model.generate(prompt, 48, temperature=0.0))


def advised_huge_pages(address):
    """Whether the mapping holding address was asked for 2 MiB pages (MADV_HUGEPAGE: 'hg' in smaps' VmFlags)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if span := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
                inside = int(span[1], 16) <= address < int(span[2], 16)
            elif inside and line.startswith("VmFlags:"):
                return "hg" in line.split()
    return False


THP = os.path.isdir("/sys/kernel/mm/transparent_hugepage")  # Linux built with transparent huge pages


def test_huge_page_copies_are_the_tensors_and_outlive_them():
    torch.manual_seed(0)
    tensors = [torch.randn(37, 96), torch.randint(-127, 128, (3, 5), dtype=torch.int8), torch.randn(1000, 700)]
    kept, second = [t.clone() for t in tensors], tensors[1]
    block = cpu_kernels.HugePages([t.nbytes for t in tensors])
    copies = [block.copy(t) for t in tensors]
    del tensors, block
    gc.collect()  # the memory lives as long as its copies
    for c, t in zip(copies, kept):
        assert torch.equal(c, t) and c.dtype == t.dtype and c.is_contiguous() and c.data_ptr() % 64 == 0
    addresses = [c.data_ptr() for c in copies]
    assert [b - a for a, b in zip(addresses, addresses[1:])] == [37 * 96 * 4, 64]  # side by side, on 64-byte lines
    assert addresses[0] % cpu_kernels.HUGE_PAGE == 0 and advised_huge_pages(addresses[-1]) == THP
    copies[1].fill_(7)  # copies, not views of the tensors; writable
    assert torch.equal(second, kept[1]) and not torch.equal(second, copies[1])
    small = cpu_kernels.HugePages([8])
    small.copy(torch.zeros(2))
    with pytest.raises(ValueError, match="no room left"):  # never written past its end
        small.copy(torch.zeros(cpu_kernels.HUGE_PAGE))


@pytest.mark.parametrize("kind", ["int8", "bf16", "none"])
def test_decoding_weights_sit_in_one_block_of_huge_pages(trained, kind, monkeypatch):
    """decoding_weights moves the weights the kernels stream every token onto 2 MiB pages, in the order the
    layers run, and the model decodes as it does with them where they were packed."""
    assert cpu_kernels.available(), cpu_kernels.status()
    model, val, _ = trained
    k = decoding_weights(copy.deepcopy(model), kind)
    with monkeypatch.context() as m:
        m.setattr(quantize, "packed_on_huge_pages", lambda model: model)
        where_packed = decoding_weights(copy.deepcopy(model), kind)
    layers = [m for m in k.modules() if isinstance(m, (CPULinear, Int8Linear))]
    packed = [m.weight if kind == "int8" else m.packed_weight for m in layers]
    assert len(packed) == 4 * 2 + 1 and len({p.untyped_storage().data_ptr() for p in packed}) == 1
    assert [p.data_ptr() for p in packed] == sorted(p.data_ptr() for p in packed)
    assert all(advised_huge_pages(p.data_ptr()) == THP for p in packed)
    head = where_packed.lm_head
    assert not advised_huge_pages((head.weight if kind == "int8" else head.packed_weight).data_ptr())
    prompt = val[:16][None]
    with torch.no_grad():
        assert torch.equal(k(prompt)[0], where_packed(prompt)[0])
    assert torch.equal(k.generate(prompt, 32, temperature=0.0), where_packed.generate(prompt, 32, temperature=0.0))


@pytest.mark.slow  # a compile
def cached_step_logits(model, prompt):
    """The logits of a decode step: the prompt into fresh caches, then its last token again, one position on."""
    caches = new_caches(model, 1)
    model(prompt, kv_caches=caches)
    return model(prompt[:, -1:], kv_caches=caches)[0]  # (1, 1, V)


def test_compiled_decoding_is_one_graph_with_the_eager_tokens(trained):
    """sample.py --compile: the forward each step calls, compiled with the CPU kernels inside the graph as
    torch operators (no graph break at each Linear), gives the eager model's greedy tokens and logits. One
    compile covers the three kernels: the first block in float32, the second in bfloat16 (CPULinear), the
    head in int8. Attention there is attention_reference's operations (compile_decoding), held to the eager
    SDPA's numbers. A prompt compiles nothing: it runs eagerly, with SDPA."""
    from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics
    from nanoforge import hardware
    model, val, _ = trained
    eager = copy.deepcopy(model)
    swap_linears(eager.transformer.h[0], CPULinear)
    swap_linears(eager.transformer.h[1], functools.partial(CPULinear, bf16=True))
    eager.lm_head = Int8Linear(model.lm_head)
    compiled = hardware.compile_decoding(copy.deepcopy(eager))
    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()
    prompt = val[:16][None]
    with torch.no_grad():
        torch.testing.assert_close(compiled(prompt)[0], eager(prompt)[0], rtol=1e-4, atol=1e-4)
        assert counters["stats"]["unique_graphs"] == 0, "a prompt compiled a graph"
        attentions = [m for m in compiled.modules() if isinstance(m, model_module.CausalSelfAttention)]
        assert not any(m.use_sdpa for m in attentions)  # the compiled step's attention, put back after the prompt
        torch.testing.assert_close(cached_step_logits(compiled, prompt), cached_step_logits(eager, prompt),
                                   rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(compiled.generate(prompt, 24, temperature=0.0), eager.generate(prompt, 24, temperature=0.0))
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    # each graph traced once: the modules' floats are constants from the start, no restart to specialize them
    # (a restart retraced every graph, a third of the compile's time)
    assert [m.restart_reasons for m in get_compilation_metrics()] == [set()] * counters["stats"]["unique_graphs"]
    # the compiled step skips the guards on the model's modules: a second model of the same shape, int8
    # throughout, compiled in the same process (bench_decode.py does) must run its own step, not the first
    # one's (it did: a KeyError)
    other = decoding_weights(copy.deepcopy(model), "int8")
    other_compiled = hardware.compile_decoding(copy.deepcopy(other))
    assert torch.equal(other_compiled.generate(prompt, 8, temperature=0.0), other.generate(prompt, 8, temperature=0.0))
    assert torch.equal(compiled.generate(prompt, 4, temperature=0.0), eager.generate(prompt, 4, temperature=0.0))


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.01), ("bf16", 0.002)])
def test_a_trained_model_keeps_its_greedy_tokens_logits_and_loss(trained, kind, tolerance):
    """--quantize=int8 and bf16 on a CPU with the kernels: the logits within a stated fraction of their range,
    the same greedy choices wherever float32's are clear, the held-out loss within 0.5%."""
    assert cpu_kernels.available(), cpu_kernels.status()
    model, val, _ = trained
    fp32_loss = val_loss(model, val)
    # ln(V) = 4.1 is a uniform guess: the model must have learned something for the comparison to mean anything
    assert fp32_loss < 0.7 * np.log(model.config.vocab_size)
    greedy = model.generate(val[:16][None], BLOCK - 16, temperature=0.0)  # (1, BLOCK): float32's own text
    windows = torch.cat((greedy, val[:BLOCK][None]))  # (2, BLOCK): its greedy text, and held-out text
    with torch.no_grad():
        ref = model(windows, windows)[0]  # (2, T, V): targets make the model return every position
        q = decoding_weights(copy.deepcopy(model), kind)
        got = q(windows, windows)[0]
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert q.transformer.wte.weight.dtype == torch.float32  # the embedding is looked up, not multiplied
    if kind == "bf16":  # every product reads bfloat16 weights: two bytes each
        layers = [m for m in q.modules() if isinstance(m, CPULinear)]
        assert len(layers) == 9 and all(m.packed_weight.dtype == torch.bfloat16 for m in layers)
    # the stated tolerance: every logit within 1% of the logits' range for int8 (measured here: 0.3%), 0.2% for
    # bf16 (0.04%)
    tol = tolerance * (ref.max() - ref.min())
    err = (got - ref).abs().max()
    assert err <= tol, (err, tol)
    # greedy choices agree wherever float32's best two are further apart than rounding moved any logit (a
    # near tie may go either way), and that is nearly everywhere
    top2 = ref.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 2 * err  # (2, T)
    assert clear.float().mean() > 0.8, (clear.float().mean(), err, tol)
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert abs(val_loss(q, val) - fp32_loss) <= 0.005 * fp32_loss  # held-out loss within 0.5%
    # the cached decoding path and the plain one give the same tokens
    prompt = val[:16][None]
    assert torch.equal(q.generate(prompt, 48, temperature=0.0), q.generate(prompt, 48, temperature=0.0, use_kv_cache=False))


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_the_serving_engine_decodes_the_quantized_model(trained, kind):
    """serve.py --quantize=int8 (or bf16) runs the engine on that model: batched rows at their own positions
    give each sequence the tokens the model's generate gives it alone."""
    model, val, out_dir = trained
    q = decoding_weights(copy.deepcopy(model), kind)
    tok = load_tokenizer(load_model(out_dir)[1])
    prompts = [val[i:i + n].tolist() for i, n in ((0, 5), (100, 17), (300, 9))]
    events = queue.Queue()
    engine = Engine(q, tok, max_batch=4)
    try:
        engine.submit([Sequence(p, 30, lambda ev, i=i: events.put((i, ev)), temperature=0.0, text=TextStream(tok))
                       for i, p in enumerate(prompts)])
        texts, done = {}, 0
        while done < len(prompts):
            i, ev = events.get(timeout=60)
            assert ev[0] in ("text", "done"), ev
            texts[i] = texts.get(i, "") + (ev[1] if ev[0] == "text" else "")
            done += ev[0] == "done"
    finally:
        engine.close()
    for i, p in enumerate(prompts):
        alone = q.generate(torch.tensor([p]), 30, temperature=0.0)[0, len(p):].tolist()
        assert texts[i] == tok.decode(alone)


def test_sample_and_evaluate_take_quantize(trained, char_data):
    out_dir = trained[2]
    args = ("sample.py", f"--out_dir={out_dir}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40",
            "--temperature=0", "--device=cpu", "--dtype=float32")
    # the flag gives what decoding_weights gives in process, and leaves float32 alone without it
    model, tok_spec, _ = load_model(out_dir)
    tok = load_tokenizer(tok_spec)
    prompt = torch.tensor([tok.encode("ROMEO:")])
    runs = [((), model)] + [((f"--quantize={q}",), decoding_weights(load_model(out_dir)[0], q)) for q in ("int8", "bf16")]
    for flag, m in runs:
        expected = "ROMEO:" + tok.decode(m.generate(prompt, 40, temperature=0.0)[0, prompt.size(1):].tolist())
        assert run(*args, *flag).stdout == expected + "\n---------------\n"
    logs = [run("evaluate.py", f"--out_dir={out_dir}", f"--data_dir={char_data}", "--device=cpu", "--dtype=float32",
                *q).stdout for q in ((), ("--quantize=int8",), ("--quantize=bf16",))]
    # the same model, the same count: int8 keeps its weights as buffers, which the count once left out
    counts = [re.search(r"([\d.]+)M parameters", out).group(1) for out in logs]
    assert counts == [f"{model.get_num_params() / 1e6:.2f}"] * 3
    fp32, *rounded = [json.loads(line) for line in open(os.path.join(out_dir, "eval.jsonl"))][-3:]
    assert "quantize" not in fp32 and [r["quantize"] for r in rounded] == ["int8", "bf16"]  # which model it scored
    for r in rounded:
        assert abs(r["loss"] - fp32["loss"]) <= 0.005 * fp32["loss"] and r["tokens"] == fp32["tokens"]
    bad = run("sample.py", f"--out_dir={out_dir}", "--quantize=int4", check=False)
    assert_one_line_error(bad, "--quantize", "int8")


def test_bf16_without_the_kernels_is_the_model_in_bfloat16(trained, monkeypatch):
    """--quantize=bf16 where the CPU kernels are not (a GPU, an ARM CPU): the whole model cast to bfloat16, on
    torch's matmuls, its held-out loss near float32's."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    model, val, _ = trained
    b = decoding_weights(copy.deepcopy(model), "bf16")
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16} and type(b.lm_head) is nn.Linear
    assert abs(val_loss(b, val) - val_loss(model, val)) <= 0.02 * val_loss(model, val)
    tokens = b.generate(val[:16][None], 16, temperature=0.0)
    assert tokens.shape == (1, 32) and torch.equal(tokens[:, :16], val[:16][None])
