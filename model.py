"""
The whole GPT language model, in one file, in reading order: LayerNorm, RMSNorm -> Rotary -> attention (fused,
and attention_reference) -> MLP -> Block -> KVCache -> GPTConfig -> GPT (weight init, forward, GPT-2 import,
FLOPs, generate beside its uncached reference).

Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...) so Hugging Face GPT-2
weights load by key. Modelling only: no devices, no DDP, no files. What depends on the machine is set from
outside (nanoforge/hardware.py); beside it in nanoforge/: the serving cache (engine.py), the look inside
(inspection.py), the chunked LM head and loss (lm_head_loss.py), the next-token choice (sampling.py).
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

from nanoforge import sampling


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
        freqs = torch.outer(torch.arange(max_len).float(), inv_freq)  # (max_len, hs/2): position x frequency
        # not saved in checkpoints: it is a pure function of the config
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x, pos):
        # x: (B, nh, T, hs), pos: first absolute position of x along T; an int, or a (B,) tensor when each
        # row sits at its own position (a server decoding many sequences at once, nanoforge/engine.py)
        where = torch.arange(x.size(2), device=x.device) + (pos[:, None, None] if torch.is_tensor(pos) else pos)
        cos, sin = self.cos[where].to(x.dtype), self.sin[where].to(x.dtype)  # (T, hs/2), or (B, 1, T, hs/2)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, nh, T, hs/2) each
        y1 = x1 * cos - x2 * sin
        y2 = x1 * sin + x2 * cos
        return torch.stack((y1, y2), dim=-1).flatten(-2)  # (B, nh, T, hs), pairs interleaved back


def attention_reference(q, k, v, dropout_p=0.0, training=False, mask=None):
    """Plain causal attention, the reference that the fused SDPA path is tested against. q: (B, nh, Tq, hs);
    k, v: (B, nh, Tk, hs) with Tk >= Tq; query i sits at position Tk - Tq + i. mask: a cache's boolean
    (Tq, Tk) or (B, 1, Tq, Tk) of the keys each query may see, in place of that causal one."""
    Tq, Tk = q.size(-2), k.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, Tq, Tk)
    if mask is None:
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, p=dropout_p, training=training)
    return att @ v  # (B, nh, Tq, hs)


class CausalSelfAttention(nn.Module):

    # Which path runs, set from outside: use_sdpa=False runs attention_reference everywhere; sdpa_backward=False
    # only where a backward follows (training; hardware.sdpa_backward: the CPU kernel's bf16 backward is slow).
    # sdpa: the fused kernel, SDPA's signature (decoding on a CPU puts cpu_kernels.attention there, quantize.py)
    use_sdpa, sdpa_backward, sdpa = True, True, staticmethod(F.scaled_dot_product_attention)

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

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch, sequence length, embedding dim (n_embd)
        pos = kv_cache.length if kv_cache is not None else 0
        q, k, v = self.heads(x, pos)  # (B, nh, T, hs) each
        mask = None  # None: causal, the T queries being the last T keys
        if kv_cache is not None:
            mask = kv_cache.mask(T)  # the cache knows where its rows sit; asked before it grows
            k, v = kv_cache.append(k, v)  # (B, nh, pos + T, hs): everything seen so far
        dropout_p = self.attn_dropout_p if self.training else 0.0
        if self.use_sdpa and (self.sdpa_backward or not torch.is_grad_enabled()):
            # fused kernels (flash / memory-efficient on CUDA). is_causal (a plain bool: T is symbolic when compiled)
            # assumes an aligned square mask: cached keys before the queries bring their own; one query sees all
            y = self.sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                          is_causal=True if mask is None and T > 1 else False)
        else:
            y = attention_reference(q, k, v, dropout_p, self.training, mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(torch.autograd.Function):
    """relu(x)^2 with a hand-written backward, 2 * relu(x) * grad: the same numbers as F.relu(x).square() (the
    reference, tested against) in half the kernel launches, which is what a small model on a CPU spends time on."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * (r + r)


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
        # GPT-2 was trained with the tanh approximation of GELU; keep it so its weights give its logits.
        # A module, so compiled runs can swap in a form that compiles better (hardware.prepare_to_compile)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden), or (B, T, 2 * hidden) for swiglu
        if self.kind == "gelu":
            h = self.gelu(h)
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
    """Keys and values of one layer for all positions so far, preallocated to block_size, unset (only the first
    `length` are read). Every cache (also engine.py's) has what attention asks: `length`, mask, append."""

    def __init__(self, B, nh, max_len, hs, device, dtype):
        self.k = torch.empty(B, nh, max_len, hs, device=device, dtype=dtype)
        self.v = torch.empty(B, nh, max_len, hs, device=device, dtype=dtype)
        self.length = 0

    def mask(self, T):
        """The keys the next T queries may see once appended, (T, length + T), or None where plain causal
        attention does it: nothing cached yet (the queries are all the keys) or one query (it sees all)."""
        if self.length == 0 or T == 1:
            return None
        return torch.ones(T, self.length + T, dtype=torch.bool, device=self.k.device).tril(diagonal=self.length)

    def append(self, k, v):
        T = k.size(2)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]  # (B, nh, length, hs)


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

    def embed(self, idx, pos=0):
        """Token (+ learned position) embeddings of idx (B, T) whose first position is pos: an int, or a (B,)
        tensor when each row sits at its own position (a server decoding many sequences at once)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.pos_emb == "learned":
            where = torch.arange(idx.size(1), device=idx.device) + (pos[:, None] if torch.is_tensor(pos) else pos)
            x = x + self.transformer.wpe(where)  # (B, T, C)
        return x

    def forward(self, idx, targets=None, kv_caches=None, head_loss=None, head_t=None):
        """idx: (B, T) token ids -> (logits, loss). With targets: logits (B, T, V) and the mean cross-entropy
        over targets != -1; without, only the last position's logits (B, 1, V), all that sampling needs.
        kv_caches: one cache per layer (KVCache, or the serving engine's), which says where the tokens sit.
        head_loss(h, weight, targets): the LM head and loss in one, in place of the plain lm_head and
        cross-entropy, its reference (lm_head_loss.py's never makes the logits: None comes back for them).
        head_t: lm_head's weight as a contiguous (C, V) copy, for decoding (generate_stream makes it)."""
        T = idx.size(1)
        pos = kv_caches[0].length if kv_caches is not None else 0  # int, or (B,): rows at their own positions
        end = (kv_caches[0].longest if torch.is_tensor(pos) else pos) + T  # an int (per-row caches know their longest)
        assert end <= self.config.block_size, f"sequence of {end} exceeds block_size {self.config.block_size}"
        x = self.transformer.drop(self.embed(idx, pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None)
        x = self.transformer.ln_f(x)  # (B, T, C)
        # a soft-capped model takes the plain head: head_loss applies no cap (and its vocab is small anyway)
        if targets is not None and head_loss is not None and not self.config.logit_softcap:
            return None, head_loss(x, self.lm_head.weight, targets)  # lm_head has no bias: the weight is all
        if targets is not None:
            logits = self.soft_cap(self.lm_head(x))  # (B, T, V)
            return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-1)
        last = x[:, [-1], :]  # (B, 1, C): the list index keeps the time dim
        return self.soft_cap(self.lm_head(last) if head_t is None else last @ head_t), None  # (B, 1, V)

    def soft_cap(self, logits):
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def set_block_size(self, block_size):
        """Shrink the context (e.g. GPT-2's 1024 to 256 for fine-tuning on a small machine), or lengthen a
        rotary model's: it has no position table, only rotation angles, a function of the position. Distances
        it never saw it learns when trained at the new length; a learned table has no rows to grow."""
        assert block_size <= self.config.block_size or self.config.pos_emb == "rope"
        self.config.block_size = block_size
        if self.config.pos_emb == "learned":
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for rotary in (block.attn.rotary for block in self.transformer.h if block.attn.rotary is not None):
            fitted = Rotary(2 * rotary.cos.size(1), block_size).to(rotary.cos.device)  # the same angles, N rows
            rotary.cos, rotary.sin = fitted.cos, fitted.sin

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
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * (T or cfg.block_size)

    def estimate_mfu(self, tokens_per_second, peak_flops, T=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak FLOP/s."""
        return self.flops_per_token(T) * tokens_per_second / peak_flops

    # ------------------------------------------------------------------------------------------------
    # Generation

    @torch.inference_mode()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_kv_cache=True, stop_token=None, generator=None):
        """Yields (B, 1) next-token ids one at a time, continuing idx (B, T). Inference mode, not just no_grad:
        no version counters or view records for autograd, ~8% of a CPU token's time outside its products.

        Without the cache each step runs the whole (cropped) context: the simple reference. With it, the
        prompt is run once and each step runs one token against the cached keys and values. Once the context
        passes block_size the model must see the last block_size tokens at shifted positions, which a cache
        cannot give, so the cached path refills its cache from the cropped context each step from then on."""
        cfg = self.config
        caches, seen = None, idx
        # one row times lm_head's (V, C) weight is a dot product per vocabulary token; a (C, V) copy, kept for
        # the generation, streams it as one matrix product (dev/LOG.md). A head made for decoding (int8, the
        # CPU kernels': nanoforge/quantize.py) runs as itself
        head_t = self.lm_head.weight.t().contiguous() if use_kv_cache and type(self.lm_head) is nn.Linear else None
        done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            ctx = seen[:, -cfg.block_size:]
            if not use_kv_cache:
                logits, _ = self(ctx)
            elif caches is not None and caches[0].length < cfg.block_size:
                logits, _ = self(seen[:, -1:], kv_caches=caches, head_t=head_t)  # one new token
            else:
                caches = [KVCache(ctx.size(0), cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, idx.device,
                                  self.transformer.wte.weight.dtype) for _ in range(cfg.n_layer)]
                logits, _ = self(ctx, kv_caches=caches, head_t=head_t)  # prefill
            nxt = sampling.next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
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
