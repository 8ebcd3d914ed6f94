"""
The whole GPT language model, in one file, in reading order:
LayerNorm, RMSNorm -> Rotary -> CausalSelfAttention -> MLP -> Block -> GPTConfig -> ChunkedLMHeadLoss -> GPT.

Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...) so Hugging Face
GPT-2 weights load by key. This file is modelling only: no devices, no DDP, no checkpoint files.
References:
1) GPT-2: "Language Models are Unsupervised Multitask Learners" (Radford et al., 2019)
2) the Hugging Face transformers GPT-2 implementation (weights layout, tanh GELU)
3) rotary embeddings: RoFormer (Su et al., 2021)
4) the options that train faster on a CPU budget (GPTConfig: norm, mlp, qk_norm, tie_embeddings,
   zero_init, logit_softcap): RMSNorm (Zhang & Sennrich, 2019), ReLU^2 (So et al., 2021, "Primer"),
   SwiGLU (Shazeer, 2020), QK-norm (Henry et al., 2020), logit soft-capping (Gemma 2). The defaults are
   GPT-2's architecture, which Hugging Face weights and export.py need.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop the bias alone)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a gain: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)


def make_norm(config):
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else LayerNorm(config.n_embd, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding: rotates pairs of q/k channels by a position-dependent angle,
    so attention scores depend on relative position. Holds no parameters, only a cos/sin table."""

    def __init__(self, head_size, max_len, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2).float() / head_size))  # (hs/2,)
        t = torch.arange(max_len).float()
        freqs = torch.outer(t, inv_freq)  # (max_len, hs/2)
        # not saved in checkpoints: it is a pure function of the config
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x, pos):
        # x: (B, nh, T, hs), pos: first absolute position of x along T; an int, or a (B,) tensor when each
        # row sits at its own position (batched decoding of many sequences, SlotKVCache)
        T = x.size(2)
        if torch.is_tensor(pos):
            where = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T)
            cos = self.cos[where].to(x.dtype)[:, None]  # (B, 1, T, hs/2): broadcast over the heads
            sin = self.sin[where].to(x.dtype)[:, None]
        else:
            cos = self.cos[pos:pos + T].to(x.dtype)  # (T, hs/2)
            sin = self.sin[pos:pos + T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2) each
        y1 = x1 * cos - x2 * sin
        y2 = x1 * sin + x2 * cos
        return torch.stack((y1, y2), dim=-1).flatten(-2)  # (B, nh, T, hs), pairs interleaved back


def attention_reference(q, k, v, dropout_p=0.0, training=False, mask=None):
    """Plain causal attention, the reference that the fused SDPA path is tested against.
    q: (B, nh, Tq, hs); k, v: (B, nh, Tk, hs) with Tk >= Tq; query i sits at position Tk - Tq + i.
    mask: a boolean (B, 1, Tq, Tk) of the keys each query may see, in place of that causal one (rows of a
    batch that sit at different positions, SlotKVCache)."""
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, p=dropout_p, training=training)
    return att @ v  # (B, nh, Tq, hs)


class CausalSelfAttention(nn.Module):

    use_sdpa = True  # set to False (on the class or an instance) to run attention_reference

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        # key, query, value projections for all heads, in one matrix (GPT-2's c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(config.n_embd // config.n_head, config.block_size) if config.pos_emb == "rope" else None

    def heads(self, x, pos=0):
        """Queries, keys and values of x (B, T, C) whose first position is `pos`, split into heads, each
        (B, nh, T, hs), with QK-norm and rotary applied: everything attention does before the scores."""
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # unit-RMS queries and keys: the scores cannot blow up, so larger learning rates hold
            q, k = F.rms_norm(q, (hs,), eps=1e-5), F.rms_norm(k, (hs,), eps=1e-5)
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        return q, k, v

    def attention_weights(self, x):
        """The causal softmax weights of x (B, T, C) attending to itself, (B, nh, T, T): what the fused
        kernel computes inside and never returns. Row i says how much position i reads each j <= i.
        For inspection (explain.py); forward does not use it."""
        q, k, _ = self.heads(x)
        T = q.size(2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return F.softmax(att.masked_fill(~mask, float("-inf")).float(), dim=-1)  # (B, nh, T, T)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        pos = kv_cache.length if kv_cache is not None else 0
        q, k, v = self.heads(x, pos)  # (B, nh, T, hs) each
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, nh, pos + T, hs): everything seen so far
        # rows at different positions (SlotKVCache) are padded to the longest: each masks its own end
        slot_mask = kv_cache.mask(T) if isinstance(kv_cache, SlotKVCache) else None  # (B, 1, T, Tk)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        # PyTorch's CPU flash-attention kernel is ~5x slower than the plain path in bf16 (its backward;
        # dev/LOG.md), so bf16 training on a CPU takes the plain path, whose matmuls run in bf16; without a
        # backward (decoding, evaluation) the fused kernel is the faster one (-13% a cached token)
        cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
        if self.use_sdpa and not cpu_bf16:
            # fused kernels (flash / memory-efficient on CUDA). With a cache the queries are the last T
            # positions of k, so the causal mask is offset; is_causal assumes aligned square masks.
            if slot_mask is not None:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=slot_mask)
            elif k.size(2) == T:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # one query sees all keys
            else:
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(diagonal=k.size(2) - T)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            y = attention_reference(q, k, v, dropout_p, self.training, slot_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(torch.autograd.Function):
    """relu(x)^2 with a hand-written backward, 2 * relu(x) * grad: the same numbers as
    F.relu(x).square() (the reference, tested against) in half the kernel launches, which is what a
    small model on a CPU spends its time on."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * (r + r)


def gelu_tanh_sigmoid(x):
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(u)), written as the identical x * sigmoid(2u), u = sqrt(2/pi) (x +
    0.044715 x^3). Compiled code takes it: tanh is slow on CPUs (2 ms for 1.5M floats here, exp 0.4 ms), so
    torch.compile's CPU kernels of the tanh form ran 2x slower than these (dev/LOG.md). Eager
    code keeps nn.GELU's one fused kernel; they agree to float rounding (tested)."""
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # 2 * sqrt(2 / pi)


class MLP(nn.Module):
    """The feed-forward half of a block. mlp='gelu' is GPT-2's (tanh GELU, 4x wide); 'relu2' the same
    with relu(x)^2; 'swiglu' a gated unit, silu(x W_gate) * (x W_up), whose hidden width 8/3 x (rounded
    up to a multiple of 32) keeps the parameter count near the 4x MLP's. c_fc holds gate and up side by side."""

    def __init__(self, config):
        super().__init__()
        self.kind = config.mlp
        hidden = 4 * config.n_embd
        if self.kind == "swiglu":
            hidden = 32 * math.ceil(8 * config.n_embd / 3 / 32)
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        # GPT-2 was trained with the tanh approximation of GELU; keep it so its weights give its logits
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for swiglu
        if self.kind == "gelu":
            h = gelu_tanh_sigmoid(h) if torch.compiler.is_compiling() else self.gelu(h)
        elif self.kind == "relu2":
            h = ReLUSquared.apply(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # (B, T, hidden)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class KVCache:
    """Keys and values of one layer for all positions generated so far, preallocated to block_size."""

    def __init__(self, B, nh, max_len, hs, device, dtype):
        self.k = torch.zeros(B, nh, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros(B, nh, max_len, hs, device=device, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        T = k.size(2)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


class SlotKVCache:
    """Keys and values of one layer for continuous batching: S slots, each holding one sequence of its own
    length, preallocated to block_size. Before a forward the caller says which slots the batch rows
    continue and where each row's new tokens start (set_rows); append then writes each row at its own
    position and hands back the rows padded to the longest, and mask says which of those keys are real."""

    def __init__(self, S, nh, max_len, hs, device, dtype):
        self.k = torch.zeros(S, nh, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros(S, nh, max_len, hs, device=device, dtype=dtype)

    def set_rows(self, rows, pos):
        # rows: (B,) slot of each batch row; pos: (B,) its first new position. `length` is what attention
        # reads as the position of its first query, a tensor here: rotary takes it per row
        self.rows, self.length = rows, pos
        # rows that are consecutive slots (the usual case) are read as a slice, a view; others are gathered,
        # a copy of every cached key and value each step (a fifth of a 16-row step of the 124M shape)
        first = int(rows[0])
        self.span = slice(first, first + len(rows)) if rows.tolist() == list(range(first, first + len(rows))) else None

    def append(self, k, v):
        B, _, T, _ = k.size()  # (B, nh, T, hs)
        where = self.length[:, None] + torch.arange(T, device=k.device)  # (B, T) positions written
        # advanced indices around a slice put their dims first: the target is (B, T, nh, hs)
        self.k[self.rows[:, None], :, where] = k.transpose(1, 2).to(self.k.dtype)
        self.v[self.rows[:, None], :, where] = v.transpose(1, 2).to(self.v.dtype)
        L = int(where[:, -1].max()) + 1  # the longest row's length after this step
        rows = self.span if self.span is not None else self.rows
        return self.k[rows, :, :L], self.v[rows, :, :L]  # (B, nh, L, hs), short rows padded

    def mask(self, T):
        # query i of row b sits at position pos[b] + i and sees keys 0 .. pos[b] + i (causal, and never
        # the padding past its own end)
        L = int(self.length.max()) + T
        seen = self.length[:, None] + torch.arange(T, device=self.length.device)  # (B, T)
        keys = torch.arange(L, device=self.length.device)  # (L,)
        return (keys[None, None, :] <= seen[:, :, None])[:, None]  # (B, 1, T, L)


@dataclass
class GPTConfig:
    block_size: int = 1024  # the longest context the model sees
    vocab_size: int = 50257  # GPT-2's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit faster and as good
    pos_emb: str = "learned"  # 'learned' absolute positions (GPT-2) or 'rope' (rotary, relative)
    norm: str = "layernorm"  # 'layernorm' (GPT-2) or 'rmsnorm'
    mlp: str = "gelu"  # 'gelu' (GPT-2), 'relu2' or 'swiglu'
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before the scores
    tie_embeddings: bool = True  # the output layer reuses the token embedding (GPT-2); False: its own matrix
    zero_init: bool = False  # the residual projections (c_proj) and an untied lm_head start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), bounded in (-cap, cap)

    # what GPT-2 is, for the code that needs its exact architecture (Hugging Face weights, export)
    GPT2 = dict(pos_emb="learned", norm="layernorm", mlp="gelu", qk_norm=False, tie_embeddings=True, logit_softcap=0.0)

    def __post_init__(self):
        choices = dict(pos_emb=("learned", "rope"), norm=("layernorm", "rmsnorm"), mlp=("gelu", "relu2", "swiglu"))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, key)!r}")

    def not_gpt2(self):
        """The settings that make this architecture differ from GPT-2's, e.g. ['mlp=relu2']."""
        return [f"{k}={getattr(self, k)!r}" for k, v in self.GPT2.items() if getattr(self, k) != v]


# rows of the flattened (B*T, C) hidden states per chunk of the chunked LM head + loss: 512 rows of GPT-2's
# 50,257 logits are ~100 MiB in fp32, against 1.57 GiB a copy for the whole 8 x 1024 batch
LOSS_CHUNK_ROWS = 512


class ChunkedLMHeadLoss(torch.autograd.Function):
    """The LM head and the mean cross-entropy over targets != -1, chunk by chunk over the rows, with the
    gradients computed in the same pass: the (N, V) logits never exist whole, only (chunk_rows, V) at a
    time. Same result as F.cross_entropy(h @ weight.T, targets, ignore_index=-1), which keeps the logits
    and their log-softmax through backward and makes more (N, V) copies there (~4.7 GiB at 8 x 1024 x
    50,257 in fp32). Nothing is recomputed: forward keeps grad_h (N, C) and grad_weight (V, C) and backward
    only scales them by the incoming gradient (the loss is a scalar, so that is exact). with_grads=False
    (evaluation, under no_grad) computes the loss alone: a third of the head's FLOPs, no grad_weight."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, compute_dtype, with_grads):
        # h: (N, C), weight: (V, C) (the tied wte/lm_head), targets: (N,) with -1 = ignored
        n_keep = (targets != -1).sum()  # the mean is over learned targets, as in F.cross_entropy's
        w = weight.to(compute_dtype)  # under autocast the matmuls run in its dtype, as nn.Linear's would
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        if with_grads:
            grad_h = torch.empty_like(h)  # (N, C)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)  # (V, C), fp32 sum
        for s in range(0, h.size(0), chunk_rows):
            hc, tc = h[s:s + chunk_rows].to(compute_dtype), targets[s:s + chunk_rows]  # (n, C), (n,)
            keep = tc != -1  # (n,)
            logits = (hc @ w.t()).float()  # (n, V): the softmax in fp32, like the plain path's .float()
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            picked = logits.gather(1, tc.clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,) ignored rows pick 0
            loss_sum += ((lse - picked) * keep).sum()
            if not with_grads:
                continue
            # d(sum of row losses)/d logits = softmax - one_hot(target), zero for ignored rows; in place
            g = logits.sub_(lse.unsqueeze(1)).exp_()  # (n, V)
            g.scatter_add_(1, tc.clamp(min=0).unsqueeze(1), -keep.unsqueeze(1).to(g.dtype))
            # the mean: divide by the learned count; with none learned the loss is nan (0/0) and the
            # gradients zero, both as F.cross_entropy's
            g.mul_((keep / n_keep.clamp(min=1)).unsqueeze(1))
            g = g.to(compute_dtype)
            grad_h[s:s + chunk_rows] = (g @ w).to(h.dtype)  # (n, V) @ (V, C) -> (n, C)
            grad_w += (g.t() @ hc).float()  # (V, n) @ (n, C) -> (V, C)
        if with_grads:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss_sum / n_keep

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


def chunked_lm_head_loss(h, weight, targets, chunk_rows, compute_dtype, with_grads):
    return ChunkedLMHeadLoss.apply(h, weight, targets, chunk_rows, compute_dtype, with_grads)


def keep_chunked_head_eager():
    """Makes torch.compile leave the chunked head eager: inductor's kernels for its in-place steps corrupted
    the heap at one CPU thread (torch 2.13: "malloc(): unaligned tcache chunk detected", or nan losses;
    dev/LOG.md), and the chunked head is matmuls, which gain nothing from compiling. Called before
    compiling (hardware.compile_model), not at import: torch.compiler.disable imports torch's compiler,
    2-3 s of every script's start."""
    global chunked_lm_head_loss
    if not getattr(chunked_lm_head_loss, "eager_under_compile", False):
        chunked_lm_head_loss = torch.compiler.disable(chunked_lm_head_loss)
        chunked_lm_head_loss.eager_under_compile = True


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        )
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # weight tying (Press & Wolf, 2017): the output layer reuses the token embedding, as GPT-2 does
            self.transformer.wte.weight = self.lm_head.weight
        self._init_weights()

    def _init_weights(self):
        """All weight initialisation lives here. GPT-2: N(0, 0.02), zero biases, and the projections
        that write into the residual stream (c_proj) scaled by 1/sqrt(2 * n_layer) so the residual
        variance does not grow with depth (two residual additions per block). zero_init instead starts
        those projections (and an untied lm_head) at zero: each block begins as the identity and the first
        logits are uniform, which lets a short run take large steps from the start."""
        zero = self.config.zero_init
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 0.02
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
                if zero and (name.endswith("c_proj") or (name == "lm_head" and not self.config.tie_embeddings)):
                    torch.nn.init.zeros_(module.weight)
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count. The tied wte/lm_head counts once; position embeddings (and an untied token
        embedding) are left out by default since they do no compute per token (the 6N FLOPs rule is
        about matmul weights)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def forward(self, idx, targets=None, kv_caches=None, chunked_loss=False, head_t=None):
        """idx: (B, T) token ids. Returns (logits, loss). With targets: logits (B, T, V) and the mean
        cross-entropy over targets != -1. Without targets, only the last position's logits (B, 1, V)
        are computed, which is all that sampling needs. chunked_loss=True (with targets: training, and
        evaluation under no_grad): the LM head and loss run chunk by chunk (ChunkedLMHeadLoss), the (B, T, V)
        logits are never made and None comes back in their place; the plain path stays the reference.
        head_t: lm_head's weight as a contiguous (C, V) copy, for decoding (generate_stream makes it)."""
        B, T = idx.size()
        pos0 = kv_caches[0].length if kv_caches is not None else 0
        assert pos0 + T <= self.config.block_size, f"sequence of {pos0 + T} exceeds block_size {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None)
        x = self.transformer.ln_f(x)  # (B, T, C)
        # the chunked head knows no soft cap: a capped model takes the plain path (its vocab is small anyway)
        if targets is not None and chunked_loss and not self.config.logit_softcap:
            dev = x.device.type  # the autocast dtype, if on, is the one the plain lm_head would run in
            compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            with torch.autocast(dev, enabled=False):  # the dtypes are handled inside, explicitly
                # no gradients wanted (evaluation): the loss alone (needs_input_grad says True there too)
                loss = chunked_lm_head_loss(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                            LOSS_CHUNK_ROWS, compute_dtype, torch.is_grad_enabled())
            logits = None  # lm_head has no bias (it is tied to wte), so the weight is all it needs
        elif targets is not None:
            logits = self.soft_cap(self.lm_head(x))  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            last = x[:, [-1], :]  # (B, 1, C): the list index keeps the time dim
            logits = self.soft_cap(self.lm_head(last) if head_t is None else last @ head_t)  # (B, 1, V)
            loss = None
        return logits, loss

    @torch.no_grad()
    def trace(self, idx):
        """forward's computation on idx (B, T), with what it passes through kept, for inspection (explain.py):
        (logits (B, T, V) at every position, residual stream (L + 1, B, T, C) entering each block and leaving
        the last (before ln_f), attention weights (L, B, nh, T, T)). Runs the same modules as forward; the
        weights cost one extra softmax per layer."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} exceeds block_size {self.config.block_size}"
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C) + (T, C)
        resid, att = [], []
        for block in self.transformer.h:
            resid.append(x)
            att.append(block.attn.attention_weights(block.ln_1(x)))  # (B, nh, T, T)
            x = block(x)
        resid.append(x)
        logits = self.soft_cap(self.lm_head(self.transformer.ln_f(x)))  # (B, T, V)
        return logits, torch.stack(resid), torch.stack(att)

    def soft_cap(self, logits):
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. GPT-2's 1024 to 256 for fine-tuning on a small machine)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.pos_emb == "learned":
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if block.attn.rotary is not None:
                block.attn.rotary.cos = block.attn.rotary.cos[:block_size]
                block.attn.rotary.sin = block.attn.rotary.sin[:block_size]

    def grow_block_size(self, block_size):
        """Lengthen a rotary model's context: it has no position table to grow, only the rotation angles,
        a function of the position. Distances it never saw it learns when trained at the new length."""
        assert self.config.pos_emb == "rope" and block_size >= self.config.block_size
        self.config.block_size = block_size
        for block in self.transformer.h:
            rotary = block.attn.rotary
            longer = Rotary(2 * rotary.cos.size(1), block_size).to(rotary.cos.device)
            rotary.cos, rotary.sin = longer.cos, longer.sin

    def resize_vocab(self, vocab_size):
        """Grow the token embedding (and the output layer, tied or not) to vocab_size rows, for special
        tokens a fine-tuning adds. New rows start at the mean of the old ones: their logits start near the
        average, neither dominating the softmax nor far below it, and fine-tuning moves them from there."""
        def grown(old):  # (V_old, C) -> (V, C)
            assert vocab_size >= old.size(0)
            return nn.Parameter(torch.cat([old.data, old.data.mean(0, keepdim=True).expand(vocab_size - old.size(0), -1)]))
        self.transformer.wte.weight = grown(self.transformer.wte.weight)
        self.lm_head.weight = self.transformer.wte.weight if self.config.tie_embeddings else grown(self.lm_head.weight)
        self.transformer.wte.num_embeddings = self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size

    # ------------------------------------------------------------------------------------------------
    # GPT-2 weights from Hugging Face

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """GPT-2-family weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) from the Hugging
        Face hub, or from a local folder written by transformers' save_pretrained."""
        from transformers import GPT2LMHeadModel  # only needed here
        hf = GPT2LMHeadModel.from_pretrained(name_or_dir)
        hc = hf.config
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout, bias=True)
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf.state_dict()
        # buffers HF keeps (causal masks in older versions) are not weights
        keys_hf = [k for k in sd_hf if not k.endswith(".attn.masked_bias") and not k.endswith(".attn.bias")]
        missing = set(sd) - set(keys_hf)
        assert not missing, f"weights missing from {name_or_dir}: {sorted(missing)[:5]}"
        # HF stores these as Conv1D, i.e. (in, out): transpose into nn.Linear's (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in keys_hf:
                w = sd_hf[k].t() if k.endswith(transposed) else sd_hf[k]
                assert w.shape == sd[k].shape, f"{k}: {tuple(w.shape)} from the hub vs {tuple(sd[k].shape)} here"
                sd[k].copy_(w)
        return model

    # ------------------------------------------------------------------------------------------------
    # FLOPs and MFU

    def flops_per_token(self, T=None):
        """Training FLOPs per token: 6N for the weight matmuls (forward 2N, backward 4N) plus the
        attention scores and weighted sum, 6 * 2 * L * C * T (PaLM paper, appendix B)."""
        cfg = self.config
        T = T or cfg.block_size
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_second, peak_flops, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(T) * tokens_per_second / peak_flops

    # ------------------------------------------------------------------------------------------------
    # Generation

    @staticmethod
    def _sample_next(logits, temperature, top_k, top_p, generator):
        """logits: (B, V) for the next token -> (B, 1) ids. temperature 0 or top_k 1 is greedy."""
        if temperature == 0 or top_k == 1:
            return logits.argmax(dim=-1, keepdim=True)
        probs = GPT.sampling_probs(logits, temperature, top_k, top_p)  # (B, V)
        return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)

    @staticmethod
    def sampling_probs(logits, temperature, top_k, top_p):
        """logits: (B, V) -> the (B, V) distribution that sampling draws from at temperature > 0, after
        top_k and top_p have cut the tail (explain.py shows it)."""
        logits = logits.float() / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), sorted descending
            logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
        if top_p is not None and top_p < 1.0:
            # nucleus: keep the smallest set of tokens whose probability adds up to top_p
            sorted_logits, sorted_idx = torch.sort(logits, descending=True)  # (B, V)
            p = torch.softmax(sorted_logits, dim=-1)
            drop = p.cumsum(dim=-1) - p >= top_p  # the tokens before this one already hold top_p
            drop[:, 0] = False  # always keep the most likely token (top_p <= 0 would drop them all)
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
        return F.softmax(logits, dim=-1)  # (B, V)

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_kv_cache=True, stop_token=None, generator=None):
        """Yields (B, 1) next-token ids one at a time, continuing idx (B, T).

        Without the cache each step runs the whole (cropped) context: the simple reference. With it,
        the prompt is run once and each step runs one token against the cached keys and values. Once
        the context passes block_size the model must see the last block_size tokens at shifted
        positions, which a cache cannot give, so the cached path refills its cache from the cropped
        context each step from then on, exactly as the reference does."""
        cfg = self.config
        caches, seen = None, idx
        # one row times lm_head's (V, C) weight reads it row by row, a dot product per token of the
        # vocabulary; a (C, V) copy streams it as one matrix product, the biggest cost of a cached token
        # (dev/LOG.md). It costs a copy of the head's weight for the length of the generation
        head_t = self.lm_head.weight.t().contiguous() if use_kv_cache else None
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            ctx = seen[:, -cfg.block_size:]
            if not use_kv_cache:
                logits, _ = self(ctx)
            elif caches is not None and caches[0].length < cfg.block_size:
                logits, _ = self(seen[:, -1:], kv_caches=caches, head_t=head_t)  # one new token
            else:
                B, C, nh = ctx.size(0), cfg.n_embd, cfg.n_head
                dtype = self.lm_head.weight.dtype
                caches = [KVCache(B, nh, cfg.block_size, C // nh, idx.device, dtype) for _ in range(cfg.n_layer)]
                logits, _ = self(ctx, kv_caches=caches, head_t=head_t)  # prefill
            nxt = self._sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done = done | (nxt == stop_token)
            seen = torch.cat((seen, nxt), dim=1)
            yield nxt
            if stop_token is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_kv_cache=True,
                 stop_token=None, generator=None):
        """idx (B, T) -> (B, T + new) with up to max_new_tokens sampled tokens appended; stops early
        once every row has produced stop_token (rows that stopped are padded with it)."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_kv_cache,
                                        stop_token, generator))
        return torch.cat([idx] + new, dim=1)

    @torch.no_grad()
    def forward_slots(self, idx, caches, rows, pos):
        """One step of many sequences at once, for a server's continuous batching: row b of idx (B, T)
        continues the sequence held in slot rows[b] of the SlotKVCaches (one per layer), its tokens at
        positions pos[b] .. pos[b] + T - 1. Returns each row's next-token logits, (B, V). A prompt is one
        row with T > 1 (prefill); a decode step is all running sequences with T = 1. Rows at different
        positions give the same logits as each alone through forward with a KVCache (tested)."""
        B, T = idx.size()
        assert int(pos.max()) + T <= self.config.block_size, "a sequence would exceed block_size"
        for cache in caches:
            cache.set_rows(rows, pos)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            where = pos[:, None] + torch.arange(T, device=idx.device)  # (B, T): each row its own positions
            x = x + self.transformer.wpe(where)  # (B, T, C)
        for block, cache in zip(self.transformer.h, caches):
            x = block(x, cache)
        x = self.transformer.ln_f(x[:, -1, :])  # (B, C): only the last position is sampled from
        return self.soft_cap(self.lm_head(x))  # (B, V)
