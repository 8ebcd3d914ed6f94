"""
The OpenAI API's request and error shapes, for serve.py: reading a JSON body within a size limit, checking
each field's type and range with a message that names it, turning prompts and chat messages into token
ids, and the error body {"error": {"message", "type", "param", "code"}} every 4xx and 5xx carries.
Field names and defaults follow https://platform.openai.com/docs/api-reference (completions and chat).
"""
import asyncio
import json

from starlette.responses import JSONResponse

from nanoforge.chat_template import CHAT_TOKENS, render
from nanoforge.errors import UserError
from nanoforge.tokenizer import token_bytes_of


# -----------------------------------------------------------------------------------------------------
# errors, in OpenAI's shape

class ApiError(Exception):
    """A request refused: its HTTP status, and OpenAI's type, param and code for the body."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers


def error_response(status, message, param=None, code=None, kind="invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -----------------------------------------------------------------------------------------------------
# reading a request

async def read_json(request, max_body_bytes, timeout=30.0):
    """The JSON object of a request's body: at most max_body_bytes, arrived within `timeout` seconds (a client
    that announces a body and never sends it would otherwise hold its connection for ever)."""
    if not (request.headers.get("content-length") or "0").isdigit():
        raise ApiError(400, "The Content-Length header must be a number of bytes", code="invalid_request")
    if int(request.headers.get("content-length") or 0) > max_body_bytes:
        raise ApiError(413, f"The request body is larger than this server's limit of {max_body_bytes} bytes",
                       code="request_too_large")
    body = b""
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():  # a chunked body has no length header: count as it comes
                body += chunk
                if len(body) > max_body_bytes:
                    raise ApiError(413, f"The request body is larger than this server's limit of {max_body_bytes} "
                                   f"bytes", code="request_too_large")
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout:g} s", code="request_timeout") from None
    try:
        obj = json.loads(body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, f"We could not parse the JSON body of your request ({e})", code="invalid_json") from None
    except RecursionError:  # [[[[...]]]] thousands deep: Python's parser gives up before the body ends
        raise ApiError(400, "The JSON body of your request is nested too deeply", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return obj


KINDS = {"integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
         "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
         "boolean": lambda v: isinstance(v, bool), "string": lambda v: isinstance(v, str),
         "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list)}
ARTICLE = {"integer": "an ", "number": "a ", "boolean": "a ", "string": "a ", "object": "an ", "array": "an "}


def field(body, name, kinds, default=None):
    """body[name] if it is one of `kinds` (names in KINDS); absent or null gives the default."""
    value = body.get(name)
    if value is None:
        return default
    if not any(KINDS[k](value) for k in kinds.split("|")):
        raise ApiError(400, f"'{name}' must be {' or '.join(ARTICLE[k] + k for k in kinds.split('|'))}, got "
                       f"{json_type(value)}: "
                       f"{json.dumps(value)[:50]}", param=name, code="invalid_type")
    return value


def json_type(v):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), "null")


def in_range(name, value, ok, what):
    if not ok:
        raise ApiError(400, f"'{name}' must be {what}, got {value}", param=name, code="invalid_value")


def sampling(body, default_max, max_tokens_cap, max_n):
    """The sampling settings of a request, checked against the server's limits."""
    which = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"  # the newer name
    max_tokens = field(body, which, "integer", default_max)
    in_range(which, max_tokens, 1 <= max_tokens <= max_tokens_cap, f"between 1 and {max_tokens_cap}")
    temperature = field(body, "temperature", "number", 1.0)
    in_range("temperature", temperature, 0 <= temperature <= 2, "between 0 and 2")
    top_p = field(body, "top_p", "number", 1.0)
    in_range("top_p", top_p, 0 < top_p <= 1, "above 0 and at most 1")
    top_k = field(body, "top_k", "integer", 0)
    in_range("top_k", top_k, top_k >= 0, "0 (off) or more")
    n = field(body, "n", "integer", 1)
    in_range("n", n, 1 <= n <= max_n, f"between 1 and {max_n}")
    stop = field(body, "stop", "string|array", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop", code="invalid_value")
    # every token is checked against the stop strings as it is decoded: a bound keeps that work small
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"each 'stop' string must be at most {MAX_STOP_CHARS} characters", param="stop",
                       code="invalid_value")
    seed = field(body, "seed", "integer")
    # a choice j draws with seed + j on a 64-bit generator
    in_range("seed", seed, seed is None or -2**63 <= seed <= 2**63 - 1 - max_n, "a 64-bit integer")
    options = field(body, "stream_options", "object", {})
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=n, stop=stop,
                seed=seed, stream=field(body, "stream", "boolean", False),
                usage=bool(options.get("include_usage")))


MAX_STOP_CHARS = 256  # the longest stop string a request may give


def logprobs_option(body, chat):
    """None (no logprobs), or how many alternatives to list beside each sampled token: chat's
    `logprobs: true` with `top_logprobs` 0-20, the completions' `logprobs` 0-5 (OpenAI's limits)."""
    if chat:
        wanted = field(body, "logprobs", "boolean", False)
        top = field(body, "top_logprobs", "integer")
        if top is not None and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
        in_range("top_logprobs", top, top is None or 0 <= top <= 20, "between 0 and 20")
        return (top or 0) if wanted else None
    top = field(body, "logprobs", "integer")
    in_range("logprobs", top, top is None or 0 <= top <= 5, "between 0 and 5")
    return top


def token_entry(tok, i, logprob):
    text = token_bytes_of(tok, i)
    return {"token": text.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(text)}


def logprobs_body(tok, tokens, chat, offset=0):
    """A choice's `logprobs` from the engine's ("token", id, logprob, top) events: chat's {"content": [...]},
    or the completions' parallel lists (tokens, token_logprobs, top_logprobs, text_offset from `offset`)."""
    if chat:
        return {"content": [dict(token_entry(tok, i, lp), top_logprobs=[token_entry(tok, j, l) for j, l in top])
                            for i, lp, top in tokens]}
    texts = [token_entry(tok, i, lp)["token"] for i, lp, _ in tokens]
    offsets = [offset + sum(len(t) for t in texts[:k]) for k in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [{token_entry(tok, j, l)["token"]: l for j, l in top} for _, _, top in tokens],
            "text_offset": offsets}


def encode(tok, text, param):
    try:
        return tok.encode(text)
    except UserError as e:  # a character a character-level model does not know: the message names it
        raise ApiError(400, str(e), param=param, code="unknown_characters") from None


def completion_prompts(tok, body):
    """A completion request's prompts as token id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if KINDS["array"](prompt) and prompt and all(KINDS["integer"](i) for i in prompt):
        prompt = [prompt]  # token ids
    if not KINDS["array"](prompt) or not prompt or not all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt",
                       code="invalid_type")
    out = []
    for p in prompt:
        if isinstance(p, list) and not all(KINDS["integer"](i) and 0 <= i < tok.vocab_size for i in p):
            raise ApiError(400, f"token ids in 'prompt' must be integers from 0 to {tok.vocab_size - 1}", param="prompt")
        ids = encode(tok, p, "prompt") if isinstance(p, str) else p
        if not ids and tok.eot_id is None:
            raise ApiError(400, "The prompt is empty and this model's tokenizer has no end-of-text token to start "
                           "from", param="prompt")
        out.append(ids or [tok.eot_id])  # an empty prompt begins a fresh document
    return out


def chat_prompt(tok, body):
    """A chat request's messages rendered with the chat template, as one token id list (in a list)."""
    if not all(t in tok.special_tokens for t in CHAT_TOKENS):
        raise ApiError(400, "This model has no chat tokens (<|user|>, <|assistant|>, ...): fine-tune it for chat "
                       "with finetune.py, or use /v1/completions", param="messages", code="no_chat_template")
    messages = field(body, "messages", "array")
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    plain = []
    for n, m in enumerate(messages):
        where = f"messages[{n}]"
        role = m.get("role") if isinstance(m, dict) else None
        role = "system" if role == "developer" else role  # the newer name of the system role
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where} must have a role (system, user or assistant)", param=where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text ones only, joined
            for k, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}.content[{k}] must be a text part, {{\"type\": \"text\", \"text\": "
                                   f"\"...\"}}: this model reads text only", param=f"{where}.content[{k}]")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        plain.append({"role": role, "content": content})
    try:
        ids, _ = render(tok, plain, add_generation_prompt=True)
    except UserError as e:
        raise ApiError(400, str(e), param="messages", code="unknown_characters") from None
    return [ids]


# ------------------------------------------------------------------------------------------------------
# /tokenize and /detokenize, as llama.cpp's server has them


def tokenize_request(tok, body):
    """{"content": text, "parse_special": true, "with_pieces": false} -> {"tokens": ids}, or with pieces
    [{"id", "piece"}], a piece being its text, or its byte values where they are not whole UTF-8 characters.
    "add_special" is accepted: these models have no beginning-of-text token to add."""
    content = field(body, "content", "string")
    if content is None:
        raise ApiError(400, "'content' is required: the text to tokenize", param="content", code="missing_field")
    field(body, "add_special", "boolean")
    special = field(body, "parse_special", "boolean", True)
    try:
        ids = tok.encode(content, allow_special=special)
    except UserError as e:  # a character a character-level model does not know
        raise ApiError(400, str(e), param="content", code="unknown_characters") from None
    if not field(body, "with_pieces", "boolean", False):
        return {"tokens": ids}

    def piece(i):
        b = token_bytes_of(tok, i)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            return list(b)
    return {"tokens": [{"id": i, "piece": piece(i)} for i in ids]}


def detokenize_request(tok, body):
    """{"tokens": ids} -> {"content": text}."""
    ids = field(body, "tokens", "array", [])
    bad = [i for i in ids if not KINDS["integer"](i) or not 0 <= i < tok.vocab_size]  # null among them too
    if bad:
        raise ApiError(400, f"'tokens' must hold token ids from 0 to {tok.vocab_size - 1}, got {json.dumps(bad[0])[:50]}",
                       param="tokens", code="invalid_value")
    return {"content": tok.decode(ids)}
