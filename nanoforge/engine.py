"""
Continuous batching: the decoding loop behind serve.py. One background thread owns the model; requests
join a queue, take a free slot of the KV cache when one opens, and from then on are decoded together with
every other running sequence, one token each per step, until each stops on its own.

    engine = Engine(model, tok, device="cpu", dtype="float32", max_batch=16, max_queue=64)
    seq = Sequence(prompt_ids, max_new=50, temperature=0.0, sink=print)   # sink gets each event
    engine.submit([seq])   # a request's sequences; QueueFull when more than max_queue would wait
    engine.cancel(seq)   # e.g. the client went away: its slot is freed at the next step

A step: the waiting sequences that fit are prefilled together (their prompts as the rows of one batch), then
all running sequences advance one token in one forward (slot_step over SlotKVCache: each row at its
own position, shorter rows' padding masked). Sequences come and go between steps, so a long reply never
holds a short one back, and B clients cost about one forward per step, not B.

Events a sink receives, from the engine thread (serve.py hands them over to its event loop):
    ("text", piece)                       text safe to show: whole UTF-8 characters, no part of a stop string
    ("token", id, logprob, top)           a sequence asked for logprobs: each sampled token, its log-probability
                                          and the `logprobs` likeliest [(id, logprob)], before its text
    ("done", finish_reason, n_tokens)     "stop" (a stop token or string) or "length"; tokens generated
    ("refused", message)                  the request cannot be followed (its grammar hit a dead end): over
    ("error", message)                    the engine failed on this step (a bug): the sequence is over
"""
import collections
import contextlib
import sys
import threading
import time
import traceback

import torch

from nanoforge import hardware, sampling
from nanoforge.errors import UserError


class SlotRows:
    """Where one forward's batch rows sit in the slot caches, worked out once for all the layers: row b continues
    slot rows[b] (B,) with T new tokens from position pos[b] (B,). The ints are read here, outside the model,
    so a compiled forward reads them with no graph break."""

    def __init__(self, rows, pos, T):
        self.rows, self.pos = rows, pos
        self.longest = int(pos.max())  # the largest first position
        # rows that are consecutive slots (the usual case) are read as a slice from the first, a view; others
        # are gathered, a copy of every cached key and value each step (a fifth of a 16-row step of the 124M
        # shape). An int, not a slice: a compiled forward takes it as a symbol, not a constant per batch size
        first = int(rows[0])
        self.first = first if rows.tolist() == list(range(first, first + len(rows))) else None
        # one row, or prompts that all start at 0 (a prefill), in consecutive slots: the new keys are one block
        # of the cache, which eager PyTorch writes fastest as a slice. A decode step of many rows takes the
        # general path even when they are aligned, so that a compiled step has one graph for one row and one
        # for many
        self.aligned = (len(rows) == 1 or T > 1) and self.first is not None and int(pos.min()) == self.longest
        # aligned, one query sees every key and a prompt's queries are plainly causal: attention needs no mask
        self.causal = self.aligned and (T == 1 or self.longest == 0)
        self.where = pos[:, None] + torch.arange(T, device=pos.device)  # (B, T) positions written


class SlotKVCache:
    """Keys and values of one layer for continuous batching: S slots, each holding one sequence of its own
    length, preallocated to block_size. Before a forward the caller says which slots the batch rows
    continue and where each row's new tokens start (set_rows, a SlotRows); append then writes each row at
    its own position and hands back the rows padded to the longest, and mask says which of those keys are
    real. The interface of model.KVCache (length, mask, append), so the model's attention runs it unchanged."""

    def __init__(self, S, nh, max_len, hs, device, dtype):
        self.k = torch.zeros(S, nh, max_len, hs, device=device, dtype=dtype)
        self.v = torch.zeros(S, nh, max_len, hs, device=device, dtype=dtype)

    def set_rows(self, rows):
        # `length` is what attention reads as the position of its first query, a tensor here: rotary takes
        # it per row. `longest` is the largest as an int, what the model checks against block_size
        self.rows, self.length, self.longest = rows, rows.pos, rows.longest

    def append(self, k, v):
        B, _, T, _ = k.size()  # (B, nh, T, hs)
        r, L = self.rows, self.rows.longest + T  # L: the longest row's length after this step
        # compiled, the indexed write below fuses; a slice's start would be guarded on (a graph for slot 0)
        if r.aligned and not torch.compiler.is_compiling():  # slots first .. first + B - 1, positions longest .. L - 1
            self.k[r.first:r.first + B, :, r.longest:L] = k
            self.v[r.first:r.first + B, :, r.longest:L] = v
        else:
            # advanced indices around a slice put their dims first: the target is (B, T, nh, hs)
            self.k[r.rows[:, None], :, r.where] = k.transpose(1, 2).to(self.k.dtype)
            self.v[r.rows[:, None], :, r.where] = v.transpose(1, 2).to(self.v.dtype)
        if r.first is not None:
            return self.k.narrow(0, r.first, B)[:, :, :L], self.v.narrow(0, r.first, B)[:, :, :L]
        return self.k[r.rows, :, :L], self.v[r.rows, :, :L]  # (B, nh, L, hs), short rows padded

    def mask(self, T):
        # query i of row b sits at position pos[b] + i and sees keys 0 .. pos[b] + i (causal, and never the
        # padding past its own end); the same before and after append. Made in each layer, from the positions
        # SlotRows gives: a compiled step then has no mask among its inputs, whose length would be a size of
        # its own to specialize on
        if self.rows.causal:  # one row that sees every key, or aligned prompts: causal attention does it
            return None
        where = self.rows.where
        keys = torch.arange(self.rows.longest + T, device=where.device)  # (L,)
        return (keys[None, None, :] <= where[:, :, None])[:, None]  # (B, 1, T, L)


@torch.inference_mode()  # as model.generate_stream: no autograd records (the logits are inference tensors)
def slot_step(model, idx, caches, rows, pos):
    """One step of many sequences at once: row b of idx (B, T) continues the sequence held in slot rows[b]
    of the SlotKVCaches (one per layer), its tokens at positions pos[b] .. pos[b] + T - 1. Returns each
    row's next-token logits, (B, V), those after its last column. Prefill gives the joining prompts as
    rows with T > 1; a decode step is all running sequences with T = 1. Rows at different positions give the same logits as each alone through
    model.generate's KVCache (tested): it is the model's own forward, only the cache differs."""
    where = SlotRows(rows, pos, idx.size(1))
    for cache in caches:
        cache.set_rows(where)
    logits, _ = model(idx, kv_caches=caches)  # (B, 1, V): the last position's
    return logits[:, -1]


class QueueFull(Exception):
    """max_queue sequences are already waiting for a slot."""


class TextStream:
    """Token ids in, text out, for one sequence: holds back byte-level BPE tokens until they decode to
    whole characters (a character can span tokens; decoding half of one gives U+FFFD, as sample.py
    knows), and holds back text that may be the start of a stop string, so no stop string is ever shown."""

    MAX_PENDING = 8  # a UTF-8 character has at most 4 bytes: this many ids still undecodable are emitted as is

    def __init__(self, tok, stop_strings=()):
        self.tok, self.stops = tok, [s for s in stop_strings if s]
        self.pending, self.held = [], ""  # ids not yet decoded; decoded text not yet shown

    def feed(self, i):
        """(text to show now, whether a stop string ended the sequence)."""
        self.pending.append(i)
        text = self.tok.decode(self.pending)
        if "\ufffd" in text and len(self.pending) < self.MAX_PENDING:
            return "", False
        self.pending = []
        self.held += text
        hits = [h for h in (self.held.find(s) for s in self.stops) if h >= 0]
        if hits:  # the text ends before the earliest stop string, which is not shown
            out, self.held = self.held[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self):
        """What is left when the sequence ends without a stop string: the held text and any partial bytes."""
        out = self.held + (self.tok.decode(self.pending) if self.pending else "")
        self.pending, self.held = [], ""
        return out


class Sequence:
    """One completion being generated: its prompt, its sampling settings, and where its events go."""

    def __init__(self, prompt, max_new, sink, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                 stop_ids=(), text=None, logprobs=None, constraint=None):
        self.prompt, self.max_new, self.sink = list(prompt), max_new, sink
        self.logprobs = logprobs  # None, or how many alternatives to report beside each token's log-probability
        self.constraint = constraint  # None, or a structured.Constraint: a grammar the reply must follow
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.generator = torch.Generator()  # on the CPU: logits are sampled there, whatever the device
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.stop_ids, self.text = set(stop_ids), text  # text: a TextStream
        self.slot, self.pos, self.last = None, 0, None  # cache slot, next position, last sampled id
        self.n_generated, self.cancelled = 0, False
        self.prompt_s, self.prefilled_at, self.done_at = 0.0, None, None  # for timings()

    def timings(self):
        """What llama.cpp's server reports per response (see timings): the prompt's forward and the generation
        after it. Set once the sequence is done."""
        predicted_s = self.done_at - self.prefilled_at if self.done_at else 0.0
        return timings(len(self.prompt), self.prompt_s * 1000, self.n_generated, predicted_s * 1000)


def timings(prompt_n, prompt_ms, predicted_n, predicted_ms):
    """llama.cpp's server's `timings`: tokens, milliseconds and their rates, of the prompt (prompt_*) and of
    the tokens generated after it (predicted_*); a rate with nothing to divide by is None."""
    def rates(name, n, ms):
        return {f"{name}_n": n, f"{name}_ms": ms, f"{name}_per_token_ms": ms / n if n else None,
                f"{name}_per_second": 1000 * n / ms if n and ms else None}
    return {**rates("prompt", prompt_n, prompt_ms), **rates("predicted", predicted_n, predicted_ms)}


class Engine:

    def __init__(self, model, tok, device="cpu", dtype="float32", max_batch=16, max_queue=64, step_delay=0.0,
                 warm_up=False, thread=True):
        """thread=True runs the loop on a thread of its own, started here; False leaves it to run(), on the
        caller's thread. On a CPU the loop is faster on the thread that loaded the model (see run)."""
        cfg = model.config
        self.model, self.tok, self.device, self.dtype = model, tok, device, dtype
        self.block_size, self.max_queue = cfg.block_size, max_queue
        self.step_delay = step_delay  # seconds of sleep after each step: a slow model, to see queueing happen
        # every slot is allocated now, to block_size: memory stays flat however requests come and go
        hs = cfg.n_embd // cfg.n_head
        self.caches = [SlotKVCache(max_batch, cfg.n_head, cfg.block_size, hs, device, model.transformer.wte.weight.dtype)
                       for _ in range(cfg.n_layer)]
        self.free = list(range(max_batch))  # lowest first
        self.waiting = collections.deque()
        self.running = []
        self.wake = threading.Condition()
        self.stopping = False
        self.steps, self.tokens = 0, 0  # batched decode steps taken, tokens sampled: for stats
        # a model whose vocabulary was padded past its tokenizer's (nanoGPT's 50304 for GPT-2's 50257) must
        # never sample a padding id: there is no text for it
        self.n_real = min(tok.vocab_size, cfg.vocab_size)
        if warm_up:
            self._warm_up()
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True) if thread else None
        if self.thread is not None:
            self.thread.start()

    def run(self):
        """The loop, on the calling thread, until close() (called from another thread). serve.py runs it on
        the main thread and its web server on another: PyTorch's OpenMP runtime (libgomp) keeps its threads
        spinning between parallel regions only while it manages no more threads than there are cores. The
        main thread has its team from loading the model; a second thread's parallel operations make a second
        team, and from then on every region's threads sleep and are woken: on 2 cores each int8 product of a
        decode step took twice as long (dev/LOG.md)."""
        self._loop()

    # ------------------------------------------------------------------------------------------------
    # called from other threads

    def submit(self, seqs):
        """Queues the sequences of one request, all or none: QueueFull if more than max_queue would then
        wait for a slot."""
        assert all(0 < len(s.prompt) < self.block_size for s in seqs), "the caller checks that prompts fit"
        with self.wake:
            if len(self.waiting) + len(seqs) > self.max_queue + len(self.free):
                raise QueueFull()
            self.waiting.extend(seqs)
            self.wake.notify()

    def cancel(self, seq):
        seq.cancelled = True  # read by the engine thread between steps; a bool assignment needs no lock
        with self.wake:
            self.wake.notify()

    def stats(self):
        with self.wake:
            return {"running": len(self.running), "waiting": len(self.waiting), "free_slots": len(self.free),
                    "steps": self.steps, "tokens": self.tokens}

    def close(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def _warm_up(self):
        """One decode step of each kind of batch a compiled model (hardware.compile_decoding) makes a graph for:
        one row, consecutive slots, slots apart. It compiles them now, before serving, not in clients' requests.
        The steps write position 1 of free slots, which a prefill overwrites before anything reads it: at
        position 0 the one key would be a size-1 dimension, which torch.compile makes a graph of its own."""
        kinds = [[0], [0, 1], [0, 2]][:min(3, len(self.free))]
        with hardware.autocast(self.device, self.dtype):
            for rows in kinds:
                idx = torch.zeros(len(rows), 1, dtype=torch.long, device=self.device)  # (B, 1)
                slot_step(self.model, idx, self.caches, torch.tensor(rows, device=self.device),
                          torch.ones(len(rows), dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------------------------------------
    # the engine thread

    def _loop(self):
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopping:
                    return
                joining = []
                while self.waiting and len(joining) < len(self.free):
                    seq = self.waiting.popleft()
                    if not seq.cancelled:
                        joining.append(seq)
                for seq in joining:
                    seq.slot = self.free.pop(0)
            try:
                with hardware.autocast(self.device, self.dtype):
                    if joining:
                        self._prefill(joining)
                    self._retire()
                    # prompts that came in during that prefill go first, while slots are free: a burst of
                    # clients waits for two prefills, not two with a decode step between (at most max_batch
                    # prefills in a row, since each takes a slot)
                    more = joining and self.waiting and self.free
                    if self.running and not more:
                        self._decode()
                    self._retire()
                if self.step_delay:
                    time.sleep(self.step_delay)
            except Exception as e:  # a bug must not leave clients waiting forever: end theirs, loudly, go on
                traceback.print_exc()
                for seq in self.running + joining:
                    if not seq.cancelled:
                        seq.sink(("error", f"{type(e).__name__}: {e}"))
                    seq.cancelled = True
                self.running = self.running + [s for s in joining if s not in self.running]
                self._retire()

    def _prefill(self, seqs):
        """The prompts of the sequences joining, together: one forward of all of them, rows padded on the right
        to the longest (a row's padding lands in its own slot past its prompt, where its next tokens
        overwrite it and the mask hides it until then). That gives the next-token logits of the rows as long
        as the longest; a shorter row's last prompt token goes again, at its own position, in one more
        forward of those rows. One or two forwards for any number of prompts, where one at a time took one
        each: the time to first token stays near one prompt's."""
        t0 = time.perf_counter()
        longest = max(len(s.prompt) for s in seqs)
        padded = torch.tensor([s.prompt + [0] * (longest - len(s.prompt)) for s in seqs], device=self.device)  # (B, T)
        rows = torch.tensor([s.slot for s in seqs], device=self.device)  # (B,)
        # prompts run eagerly where the model is compiled (hardware.compile_decoding): the decode step is where a
        # compiled forward pays, and its few shapes compile once; a prompt's time is in its matrix products.
        # set_stance's first call imports torch._dynamo (~1.2 s, which fell on a server's first prompt): where it
        # was never imported, nothing is compiled to run around
        eager = torch.compiler.set_stance("force_eager") if "torch._dynamo" in sys.modules else contextlib.nullcontext()
        with eager, torch.inference_mode():  # (logits[short] is written in place)
            logits = slot_step(self.model, padded, self.caches, rows, torch.zeros(len(seqs), dtype=torch.long,
                                                                                  device=self.device))  # (B, V)
            short = [b for b, s in enumerate(seqs) if len(s.prompt) < longest]
            if short:
                last = torch.tensor([[seqs[b].prompt[-1]] for b in short], device=self.device)  # (S, 1)
                pos = torch.tensor([len(seqs[b].prompt) - 1 for b in short], device=self.device)  # (S,)
                logits[short] = slot_step(self.model, last, self.caches, rows[short], pos)
        logits = logits.float().cpu()  # the forward is done (on a GPU too) before the clock is read
        done = time.perf_counter()
        for seq, row in zip(seqs, logits):
            seq.prefilled_at, seq.prompt_s, seq.pos = done, done - t0, len(seq.prompt)
            self.running.append(seq)
            self._take_alone(seq, row)

    def _take_alone(self, seq, logits):
        """_take, where a failure ends this sequence alone (its client gets the error), never its batch."""
        try:
            self._take(seq, logits)
        except UserError as e:  # the request asked for what cannot be done (a grammar this vocabulary cannot spell)
            seq.sink(("refused", str(e)))
            seq.cancelled = True
        except Exception as e:
            traceback.print_exc()
            seq.sink(("error", f"{type(e).__name__}: {e}"))
            seq.cancelled = True

    def _decode(self):
        seqs = sorted(self.running, key=lambda s: s.slot)  # ascending slots: usually a slice of the cache
        idx = torch.tensor([[s.last] for s in seqs], dtype=torch.long, device=self.device)  # (B, 1)
        rows = torch.tensor([s.slot for s in seqs], device=self.device)  # (B,)
        pos = torch.tensor([s.pos for s in seqs], device=self.device)  # (B,)
        logits = slot_step(self.model, idx, self.caches, rows, pos)  # (B, V)
        self.steps += 1
        for s, row in zip(seqs, logits):
            s.pos += 1
            self._take_alone(s, row)

    def _take(self, seq, logits):
        """Samples seq's next token from its logits (V,), emits its text, and marks seq done when it ends."""
        logits = logits[:self.n_real].float().cpu()[None]  # (1, V)
        choose = logits
        if seq.constraint is not None:  # only the tokens that keep the reply inside its grammar
            choose = logits.masked_fill(~seq.constraint.allowed(seq.stop_ids)[:self.n_real], float("-inf"))
        nxt = int(sampling.next_token(choose, seq.temperature, seq.top_k or None, seq.top_p, seq.generator))
        self.tokens += 1
        if nxt in seq.stop_ids:
            return self._finish(seq, "stop")
        if seq.constraint is not None:
            seq.constraint.consume(nxt)
        seq.last, seq.n_generated = nxt, seq.n_generated + 1
        if seq.logprobs is not None:  # the model's own distribution, before temperature, top-k or top-p
            logp = torch.log_softmax(logits[0], dim=-1)
            top = torch.topk(logp, seq.logprobs) if seq.logprobs else None
            seq.sink(("token", nxt, float(logp[nxt]),
                      [] if top is None else [(int(j), float(v)) for v, j in zip(top.values, top.indices)]))
        piece, stopped = seq.text.feed(nxt)
        if piece:
            seq.sink(("text", piece))
        if stopped:  # a stop string: the text before it is out, the rest is dropped
            return self._finish(seq, "stop", flush=False)
        if seq.constraint is not None and seq.constraint.done():  # the JSON is complete: nothing may follow
            return self._finish(seq, "stop")
        # the context holds the prompt and the reply: a sequence ends when either is full
        if seq.n_generated >= seq.max_new or len(seq.prompt) + seq.n_generated >= self.block_size:
            self._finish(seq, "length")

    def _finish(self, seq, reason, flush=True):
        rest = seq.text.flush() if flush else ""  # text held back for a stop string that never came
        if rest:
            seq.sink(("text", rest))
        seq.done_at = time.perf_counter()
        seq.sink(("done", reason, seq.n_generated))
        seq.cancelled = True  # nothing more for it: _retire frees its slot

    def _retire(self):
        gone = [s for s in self.running if s.cancelled]
        if not gone:
            return
        self.running = [s for s in self.running if not s.cancelled]
        with self.wake:
            self.free = sorted(self.free + [s.slot for s in gone])
