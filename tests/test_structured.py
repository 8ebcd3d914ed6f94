"""
response_format (json_object, json_schema) through grammar-constrained decoding (nanoforge/structured.py),
in-process over the real app and engine: a random model that never saw JSON still writes JSON that
validates against the schema, sampled or greedy, streamed or not, on both endpoints and through the
official `openai` client; schemas that cannot be followed get a 400 that says why, and the server goes on.
"""
import json

import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from model import GPT, GPTConfig
from nanoforge import training
from nanoforge.chat_template import chat_tokenizer
from nanoforge.engine import Engine
from nanoforge.server import LOOPBACK, build_app
from nanoforge.structured import JsonGrammars
from nanoforge.tokenizer import CharTokenizer, load_tokenizer

CHARS = "\n !',.:?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz{}[]\"0123456789-_"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                         "maximum": 120}, "member": {"type": "boolean"},
                         "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["red", "blue"]}}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def served():
    """(test client, tokenizer) over a random 2-layer character model with the chat tokens, whose
    characters include JSON's."""
    tok = chat_tokenizer(CharTokenizer(CHARS))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=len(CHARS))).eval()
    training.grow_vocab(model, tok.vocab_size)
    engine = Engine(model, tok, max_batch=4, max_queue=8)
    app = build_app(engine, tok, 256, "tiny", allowed_hosts=list(LOOPBACK), max_tokens_cap=200, max_n=4)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client, tok
    engine.close()


def replies(r, chat):
    assert r.status_code == 200, r.text
    return [(c["message"]["content"] if chat else c["text"], c["finish_reason"]) for c in r.json()["choices"]]


@pytest.mark.parametrize("chat", [False, True])
def test_a_schema_is_always_followed_sampled_or_greedy(served, chat):
    client, _ = served
    path = "/v1/chat/completions" if chat else "/v1/completions"
    ask = {"messages": [{"role": "user", "content": "Who is there?"}]} if chat else {"prompt": "Who is there?"}
    for temperature, seed in ((0.0, None), (1.0, 1), (1.5, 2)):
        body = dict(ask, max_tokens=200, temperature=temperature, n=4, response_format=SCHEMA_FORMAT)
        if seed is not None:
            body["seed"] = seed
        for text, finish in replies(client.post(path, json=body), chat):
            jsonschema.validate(json.loads(text), PERSON)  # JSON, and of the schema
            assert finish == "stop"  # it ended because the object was complete
    # without response_format the same model writes no JSON at all
    plain = replies(client.post(path, json=dict(ask, max_tokens=40, temperature=0.0)), chat)[0][0]
    with pytest.raises(ValueError):
        json.loads(plain)


def test_json_object_streamed_is_an_object(served):
    client, _ = served
    body = {"prompt": "A", "max_tokens": 200, "temperature": 1.0, "seed": 3, "stream": True,
            "response_format": {"type": "json_object"}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(text), dict)


def test_the_openai_client_reads_structured_output(served):
    client, _ = served
    api = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused", http_client=client, max_retries=0)
    r = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=200,
                                    temperature=0.7, seed=5, response_format=SCHEMA_FORMAT)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert e.value.status_code == 400 and "nonsense" in e.value.message


@pytest.mark.parametrize("fmt, reason", [
    ({"type": "xml"}, "'response_format' must be"),
    ({"type": "json_schema"}, "'schema' object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "cannot be followed"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "cannot be followed"),
    ("json", "'response_format' must be an object"),
])
def test_a_format_that_cannot_be_followed_is_a_400_that_says_why(served, fmt, reason):
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": "A", "max_tokens": 5, "response_format": fmt})
    assert r.status_code == 400, r.text
    assert reason in r.json()["error"]["message"] and r.json()["error"]["param"] == "response_format"
    ok = client.post("/v1/completions", json={"prompt": "A", "max_tokens": 3})  # and the server goes on
    assert ok.status_code == 200


def test_a_vocabulary_without_json_characters_is_refused_and_gpt2s_can_write_any():
    with pytest.raises(ValueError, match="no { } \\[ \\] \" : ,"):
        JsonGrammars(CharTokenizer("abc \n")).compile({"type": "json_object"})
    grammars = JsonGrammars(load_tokenizer({"kind": "gpt2"}))
    assert not grammars.missing
    c = grammars.constraint(grammars.compile(SCHEMA_FORMAT))
    assert c.allowed().sum() > 0 and not c.done()


# any JSON value as a schema, and schema-like objects built from JSON Schema's own keywords
scalars = st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                            max_size=3), max_leaves=8)
keywords = st.sampled_from(["type", "properties", "items", "required", "enum", "minimum", "maxLength", "anyOf",
                            "$ref", "pattern", "additionalProperties", "const", "format"])
schemas = st.recursive(values, lambda inner: st.dictionaries(keywords, inner, max_size=4), max_leaves=10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas)
def test_any_schema_is_a_2xx_or_a_400_that_names_it(served, schema):
    client, _ = served
    r = client.post("/v1/completions", json={"prompt": "A", "max_tokens": 6, "temperature": 1.0, "seed": 0,
                                             "response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "x", "schema": schema}}})
    assert r.status_code in (200, 400), (r.status_code, r.text)
    if r.status_code == 400:
        assert r.json()["error"]["message"] and r.json()["error"]["param"] == "response_format"
    assert client.post("/v1/completions", json={"prompt": "A", "max_tokens": 2}).status_code == 200
