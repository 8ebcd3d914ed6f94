"""
nanoforge/engine.py in-process: the continuous-batching loop gives every sequence the tokens it gets alone, slots
are reused cleanly, and the text stream never splits a character or shows a stop string.
"""
import queue
import sys
import threading
import time

import pytest
import torch

from conftest import run
from model import GPT, GPTConfig
from nanoforge.engine import Engine, QueueFull, Sequence, TextStream
from nanoforge.tokenizer import CharTokenizer, load_tokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,\n"


def test_text_stream_never_splits_a_utf8_character():
    """GPT-2's byte-level BPE cuts some characters across tokens (each half alone decodes to U+FFFD):
    every piece shown is whole characters, and the pieces add up to the text."""
    tok = load_tokenizer({"kind": "gpt2"})
    text = "h\u00e9llo w\u00f6rld \u2014 \u65e5\u672c\u8a9e \U0001F642 \u0645\u0631\u062d\u0628\u0627 \U0001F1EB\U0001F1F7!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text must contain a character split across tokens"
    stream, pieces = TextStream(tok), []
    for i in ids:
        piece, stopped = stream.feed(i)
        assert not stopped and "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) + stream.flush() == text


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    tok = CharTokenizer(CHARS)
    stream = TextStream(tok, ["and so"])
    shown = [stream.feed(i)[0] for i in tok.encode("band ")]
    assert "".join(shown) == "b"  # "and " may be the start of "and so": held
    piece, stopped = stream.feed(tok.encode("t")[0])
    assert (piece, stopped) == ("and t", False)  # it was not
    out = "".join(stream.feed(i)[0] for i in tok.encode(" and s"))
    piece, stopped = stream.feed(tok.encode("o")[0])
    assert stopped and out + piece == " "  # the stop string itself is never shown
    # a stop string that never completes is flushed at the end
    stream = TextStream(tok, ["and so"])
    assert "".join(stream.feed(i)[0] for i in tok.encode("x an")) + stream.flush() == "x an"


class Events(queue.Queue):
    """Collects the events of numbered sequences, as serve.py's sinks do."""

    def __init__(self, expected):
        super().__init__()
        self.expected, self.texts = expected, {}

    def sink(self, i):
        return lambda ev: self.put((i, ev))

    def wait(self):
        """Every sequence's (text, finish_reason, n_tokens), once all are done: {index: ...}."""
        results = {}
        while len(results) < self.expected:
            i, ev = self.get(timeout=60)
            assert ev[0] in ("text", "done"), ev
            if ev[0] == "text":
                self.texts[i] = self.texts.get(i, "") + ev[1]
            else:
                results[i] = (self.texts.get(i, ""), ev[1], ev[2])
        return results


def assert_each_gets_its_own_tokens(engine, model, tok, prompts, lengths):
    """Submits greedy sequences for the prompts at once, each its own length: each must get exactly
    model.generate's tokens for its prompt alone. Returns the sequences."""
    events = Events(len(prompts))
    seqs = [Sequence(tok.encode(p), n, events.sink(i), temperature=0.0, text=TextStream(tok))
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine.submit(seqs)
    results = events.wait()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        ids = tok.encode(p)
        expected = tok.decode(model.generate(torch.tensor([ids]), n, top_k=1)[0, len(ids):].tolist())
        assert results[i] == (expected, "length", n)
    return seqs


def test_engine_decodes_more_sequences_than_slots_with_each_ones_own_tokens():
    """Five greedy sequences of different prompt lengths and lengths on two slots: they join as slots
    free up (a reused slot still holds its last sequence's keys, which its mask must hide) and each gets
    exactly model.generate's tokens for its prompt alone."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS))).eval()
    tok = CharTokenizer(CHARS)
    engine = Engine(model, tok, max_batch=2, max_queue=8)
    assert_each_gets_its_own_tokens(engine, model, tok, ["a", "the quick brown fox", "jumps",
                                                         "over the lazy dog, and then", "z"], [12, 5, 20, 9, 15])
    assert engine.stats()["free_slots"] == 2
    engine.close()


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_prompts_that_arrive_together_are_prefilled_together_with_each_ones_own_tokens(pos_emb):
    """Six prompts of 1 to 30 tokens submitted at once: one batched prefill (the same clock reading for
    all), and each sequence still gets model.generate's tokens for its prompt alone: the short rows'
    padding never shows."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS), pos_emb=pos_emb,
                    **({"norm": "rmsnorm", "qk_norm": True, "bias": False} if pos_emb == "rope" else {}))
    model = GPT(cfg).eval()
    tok = CharTokenizer(CHARS)
    engine = Engine(model, tok, max_batch=8)
    prompts = ["a", "to", "the quick brown fox jumps over", "lazy", "z.", "over the lazy dog"]
    events = Events(len(prompts))
    seqs = [Sequence(tok.encode(p), 16, events.sink(i), temperature=0.0, text=TextStream(tok))
            for i, p in enumerate(prompts)]
    engine.submit(seqs)
    results = events.wait()
    engine.close()
    assert len({s.prefilled_at for s in seqs}) == 1  # one prefill for all six
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        expected = tok.decode(model.generate(torch.tensor([ids]), 16, top_k=1)[0, len(ids):].tolist())
        assert results[i] == (expected, "length", 16)


def test_a_first_prompt_does_not_import_the_compiler():
    """The prefill steps around torch.compile only where something was compiled: set_stance's first call
    imports torch._dynamo, ~1.2 s that fell on a server's first client (a fresh interpreter: the test
    workers have imported it)."""
    code = """
import queue, sys
import torch
from model import GPT, GPTConfig
from nanoforge.engine import Engine, Sequence, TextStream
from nanoforge.tokenizer import CharTokenizer
tok = CharTokenizer("abc")
engine = Engine(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=3)).eval(), tok, max_batch=2)
events = queue.Queue()
engine.submit([Sequence([0, 1, 2], 4, events.put, temperature=0, text=TextStream(tok))])
while (event := events.get(timeout=60))[0] == "text":
    pass
engine.close()
print(event[0], "torch._dynamo" in sys.modules)
"""
    assert run("-c", code, launcher=[sys.executable]).stdout.split() == ["done", "False"]


def test_engine_runs_on_the_callers_thread_until_closed():
    """serve.py's arrangement: the loop on the main thread (Engine.run), requests and close() from another
    thread. Each sequence gets model.generate's tokens, and run() returns once close() is called."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS))).eval()
    tok = CharTokenizer(CHARS)
    engine = Engine(model, tok, max_batch=2, thread=False)
    assert engine.thread is None
    done = []

    def client():
        try:
            done.append(assert_each_gets_its_own_tokens(engine, model, tok, ["the quick", "brown fox", "jumps"],
                                                        [10, 10, 10]))
        finally:
            engine.close()

    web = threading.Thread(target=client)
    web.start()
    engine.run()  # returns when the client thread closes the engine
    web.join()
    assert len(done) == 1  # the client's assertions passed


def test_engine_refuses_past_its_queue_and_stops_at_the_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=len(CHARS))).eval()
    tok = CharTokenizer(CHARS)
    engine = Engine(model, tok, max_batch=1, max_queue=1, step_delay=0.05)
    events = Events(2)
    first = [Sequence(tok.encode("abc"), 50, events.sink(0), temperature=0.0, text=TextStream(tok)),
             Sequence(tok.encode("abc"), 50, events.sink(1), temperature=0.0, text=TextStream(tok))]
    engine.submit(first)  # one slot and one place in the queue: both fit
    try:
        engine.submit([Sequence(tok.encode("x"), 1, events.sink(2), text=TextStream(tok))])
        raise AssertionError("a third sequence should not fit")
    except QueueFull:
        pass
    results = events.wait()
    # prompt and reply fill the 16-token context: 13 tokens after a 3-token prompt, not the 50 asked for
    assert results[0][1:] == ("length", 13) and results[1][1:] == ("length", 13)
    engine.close()


def test_prompts_that_arrive_during_a_prefill_are_prefilled_before_the_next_decode_step():
    """A burst of clients: the first prompt is being prefilled alone when the others arrive. They are
    prefilled next, before the first sequence takes a decode step, so their first tokens wait for one
    forward, not two; every sequence still gets model.generate's tokens."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS))).eval()
    tok = CharTokenizer(CHARS)
    forward, calls, arrived = model.forward, [], threading.Event()

    def recording(idx, **kw):  # the engine's forwards, in order: (rows, columns); the first waits for the rest
        calls.append(tuple(idx.shape))
        if len(calls) == 1:
            assert arrived.wait(60)
        return forward(idx, **kw)

    model.forward = recording
    engine = Engine(model, tok, max_batch=4)
    prompts = ["the quick", "brown fox", "jumps over", "the lazy dog"]
    events = Events(len(prompts))
    seqs = [Sequence(tok.encode(p), 6, events.sink(i), temperature=0.0, text=TextStream(tok))
            for i, p in enumerate(prompts)]
    engine.submit(seqs[:1])
    while not calls:  # the first prompt's prefill has begun
        time.sleep(0.01)
    engine.submit(seqs[1:])
    arrived.set()
    results = events.wait()
    engine.close()
    model.forward = forward
    assert calls[:2] == [(1, len(prompts[0])), (3, len(prompts[3]))]  # the first prefill, then the others'
    for i, p in enumerate(prompts):
        ids = tok.encode(p)
        expected = tok.decode(model.generate(torch.tensor([ids]), 6, top_k=1)[0, len(ids):].tolist())
        assert results[i] == (expected, "length", 6)


@pytest.mark.slow  # compiles
def test_a_compiled_engine_compiles_before_serving_and_gives_the_eager_tokens():
    """serve.py --compile: the decode step compiled (hardware.compile_decoding), with int8 weights on the CPU
    kernels. Warm-up compiles every kind of batch at start (one row, consecutive slots, slots apart); serving
    then compiles nothing more and breaks no graph, and each sequence gets the eager model's tokens. Three
    sequences on three slots, ending one by one: first the middle one (then slots 0 and 2 decode, then slot 2
    alone), in the second round the first one (then slots 1 and 2), reusing the slots."""
    import copy

    from torch._dynamo.utils import counters

    from nanoforge import hardware
    from nanoforge.quantize import decoding_weights
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS))).eval()
    eager = decoding_weights(model, "int8")
    tok = CharTokenizer(CHARS)
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(hardware.compile_decoding(copy.deepcopy(eager)), tok, max_batch=3, warm_up=True)
    compiled_at_start = counters["stats"]["unique_graphs"]
    assert compiled_at_start >= 2
    prompts = ["the quick", "brown fox", "jumps over the"]
    for lengths in ([20, 4, 24], [4, 20, 24]):
        assert_each_gets_its_own_tokens(engine, eager, tok, prompts, lengths)
    engine.close()
    assert counters["stats"]["unique_graphs"] == compiled_at_start and not counters["graph_break"], \
        (dict(counters["stats"]), dict(counters["graph_break"]))
