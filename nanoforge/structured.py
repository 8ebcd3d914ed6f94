"""
Structured output: OpenAI's `response_format` ({"type": "json_object"}, or "json_schema" with a schema),
by grammar-constrained decoding. Before each token is sampled, the tokens that cannot continue text the
grammar accepts are masked out of the logits, so whatever the model would say, the reply is JSON (of the
schema) once it ends; it ends as soon as the grammar is complete. The grammar engine is llguidance (it
computes the allowed-token mask of a 50k vocabulary in ~0.03 ms here; dev/LOG.md has the comparison with
xgrammar), given our tokenizer's bytes per token, so it works for every tokenizer nanoforge has.

    grammars = JsonGrammars(tok)                        # once per tokenizer (~0.1 s for GPT-2's)
    grammar = grammars.compile(response_format)         # None for "text"; ValueError says what is wrong
    constraint = grammars.constraint(grammar)           # one per sequence: allowed(), consume(id), done()
"""
import json

import torch

from nanoforge.errors import UserError
from nanoforge.tokenizer import token_bytes_of

# compact JSON: whitespace between tokens would let a weak model pad forever without breaking the grammar
COMPILE_OPTIONS = {"whitespace_flexible": False}


class JsonGrammars:

    def __init__(self, tok):
        import llguidance  # only a server that is asked for structured output needs it

        self.llg, self.vocab_size = llguidance, tok.vocab_size
        special = set(tok.special_tokens.values())
        # llguidance marks special tokens with a leading 0xff byte: never part of JSON text. Its end of
        # sequence is one id past the vocabulary, which no model produces: done() says when the reply ends
        tokens = [b"\xff" + token_bytes_of(tok, i) if i in special else token_bytes_of(tok, i)
                  for i in range(tok.vocab_size)] + [b"\xff<|end of json|>"]

        class Wrapper:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = tok.vocab_size, None, sorted(special | {tok.vocab_size})

            def __init__(self):
                self.tokens = tokens

            def __call__(self, text):
                text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                try:
                    return tok.encode(text)
                except UserError:  # a character vocabulary without some of text's characters: the rest
                    return [i for c in text for i in (tok.encode(c) if c in writable else [])]

        writable = {t.decode("utf-8", "ignore") for t in tokens if len(t) == 1 or len(t.decode("utf-8", "ignore")) == 1}
        # JSON needs these characters; a character vocabulary from plain prose may lack some
        self.missing = [c for c in '{}[]":,' if c not in writable]
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()))

    def compile(self, response_format):
        """The grammar of a request's response_format, or None for plain text. ValueError(reason) for a
        format or schema that cannot be followed."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object", "json_schema"):
            raise ValueError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                             "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        kind = response_format["type"]
        if kind == "text":
            return None
        if self.missing:
            raise ValueError(f"this model's vocabulary has no {' '.join(self.missing)}: it cannot write JSON")
        if kind == "json_object":
            schema = {"type": "object"}
        else:
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("'response_format.json_schema' must be an object with a 'schema' object in it")
            schema = spec.get("schema", {})
        try:
            grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=COMPILE_OPTIONS)
            error = self.llg.LLMatcher.validate_grammar(grammar, self.lltok)
        except ValueError as e:
            raise ValueError(f"the JSON schema could not be read: {e}") from None
        except RUST_PANIC as e:
            raise ValueError(f"the JSON schema could not be read ({panic_text(e)})") from None
        if error:
            raise ValueError(f"the JSON schema cannot be followed: {error.splitlines()[0]}")
        return grammar

    def constraint(self, grammar):
        """A new sequence's Constraint at the start of the grammar (ValueError if the engine fails on it)."""
        try:
            return Constraint(self.llg.LLMatcher(self.lltok, grammar, log_level=0), self.vocab_size)
        except RUST_PANIC as e:
            raise ValueError(panic_text(e)) from None


# llguidance's Rust panics (hypothesis found one: a schema's error message cut inside a UTF-8 character) reach
# Python as pyo3's PanicException, a BaseException: `except Exception` lets it kill the thread it is on
RUST_PANIC = BaseException


def panic_text(e):
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise e
    return f"the grammar engine failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab_size):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.bit = torch.arange(8, dtype=torch.uint8)  # (8,)

    def allowed(self, stop_ids=()):
        """(vocab_size,) bool: the tokens that keep the text inside the grammar, from here; and the sequence's
        stop tokens once the text is complete JSON (a number, say, that could still go on)."""
        try:
            mask = self.matcher.compute_bitmask()
        except RUST_PANIC as e:
            raise self.dead_end(panic_text(e)) from None
        words = torch.frombuffer(bytearray(mask), dtype=torch.uint8)  # bit i of byte k: token 8k+i
        allowed = ((words[:, None] >> self.bit) & 1).flatten()[:self.vocab_size].bool()  # (V,)
        if stop_ids and self.matcher.is_accepting():
            allowed[list(stop_ids)] = True
        if not allowed.any():
            raise self.dead_end("no token of this model's vocabulary can continue it")
        return allowed

    def consume(self, token):
        try:
            ok = self.matcher.consume_token(token)
        except RUST_PANIC as e:
            raise self.dead_end(panic_text(e)) from None
        if not ok:  # text the schema needs that the vocabulary cannot spell
            raise self.dead_end(self.matcher.get_error().splitlines()[0])

    def dead_end(self, why):
        return UserError(f"the reply cannot follow this response_format with this model's vocabulary ({why})")

    def done(self):
        """True once the grammar is complete and nothing can follow: the reply ends here."""
        return self.matcher.is_stopped()
