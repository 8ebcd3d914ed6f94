"""
Serves a model over HTTP: an OpenAI-compatible API and a chat page, decoding many clients together.

$ python serve.py --out_dir=out-sft-shop                 # http://127.0.0.1:8000: the chat page, and /v1
$ python serve.py --init_from=gpt2 --port=8080           # a GPT-2 name, a HF folder or a checkpoint file
$ python serve.py --out_dir=out-sft-shop --host=0.0.0.0 --api_key=sk-$(openssl rand -hex 16)   # exposed

The official openai client works unchanged against it:
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], stream=True)

Endpoints: POST /v1/completions, POST /v1/chat/completions (messages rendered with chat_template.render, the
template finetune.py trained on), GET /v1/models, GET /health (with the engine's slot counts), and GET / the
chat page (nanoforge/pages/chat.html, the only file served). Request fields: max_tokens (or max_completion_tokens),
temperature (0: greedy, the tokens of sample.py --temperature=0), top_p, top_k (an extension; 0 = off),
stop (a string or up to 4), seed, n, stream with stream_options.include_usage; `model` is ignored (one
model is served). A completion ends at max_tokens, at the stop strings, at the end-of-text token (a chat
reply: at any special token, as sample.py --chat), or when prompt and completion fill the model's context:
finish_reason "length" then, as for max_tokens. Errors are OpenAI's {"error": {"message", "type", "code"}}.

Requests are decoded together (nanoforge/engine.py: continuous batching over max_batch KV-cache slots); past that
they wait, and past max_queue waiting they get 503 with Retry-After. Safe by default: it listens on
127.0.0.1 only; with --host=0.0.0.0 give --api_key (checked as a Bearer token on /v1). No CORS unless
--cors_origins="https://a.example,https://b.example" (or "*").
"""
import asyncio
import hmac
import json
import os
import sys
import time
import uuid

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from configurator import configure, knobs
from nanoforge import errors, files, hardware
from nanoforge.chat_template import CHAT_TOKENS
from nanoforge.checkpoint import load_model
from nanoforge.engine import Engine, QueueFull, Sequence, TextStream
from nanoforge.errors import UserError
from nanoforge.openai_api import ApiError, chat_prompt, completion_prompts, error_response, read_json, sampling
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (the checkpoint in out_dir), a GPT-2 name, a HF folder or a checkpoint file
out_dir = "out"  # used when init_from='resume'
model_name = ""  # the id /v1/models reports; '' = the out_dir or init_from
host = "127.0.0.1"  # 0.0.0.0 listens on every interface: then set api_key
port = 8000
api_key = ""  # when set, /v1 requests need "Authorization: Bearer <api_key>"
cors_origins = ""  # comma-separated origins allowed to call the API from a browser page; '' = none
max_batch = 16  # sequences decoded together (KV-cache slots, all allocated at start)
max_queue = 64  # sequences that may wait for a slot; past that: 503
max_tokens_cap = 1024  # the largest max_tokens a request may ask for
max_n = 8  # the most choices (n) a request may ask for
max_body_bytes = 1_000_000  # a larger request body gets 413
device = "auto"
dtype = "auto"
log_level = "info"  # uvicorn's: 'warning' hides the per-request lines
step_delay = 0.0  # seconds to pause after each decode step: a slow model on purpose, to watch queueing and Stop
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))

device, _ = hardware.resolve_device(device)
if min(max_batch, max_tokens_cap, max_n, max_body_bytes) < 1 or max_queue < 0:
    raise UserError("max_batch, max_tokens_cap, max_n, max_body_bytes must be >= 1 and max_queue >= 0")
if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
    print(f"warning: listening on {host} with no api_key: anyone who can reach this port can use the model; "
          f"pass --api_key=...", file=sys.stderr)

source = out_dir if init_from == "resume" else init_from
model, tok_spec, _ = load_model(source, map_location=device)
model.eval().to(device)
# decoding runs max_batch rows at a time at most: the precision is measured at that shape
dtype, why = hardware.resolve_dtype(dtype, device, (max_batch, model.config.n_embd))
tok = load_tokenizer(tok_spec)
model_name = model_name or os.path.basename(os.path.normpath(source))
has_chat = all(t in tok.special_tokens for t in CHAT_TOKENS)
engine = Engine(model, tok, device, dtype, max_batch=max_batch, max_queue=max_queue, step_delay=step_delay)
CREATED = int(time.time())
with open(os.path.join(files.REPO, "nanoforge", "pages", "chat.html"), "rb") as f:
    CHAT_PAGE = f.read()
print(f"model {model_name}: {model.get_num_params() / 1e6:.2f}M params, context {model.config.block_size}, "
      f"{'chat template' if has_chat else 'no chat tokens: /v1/completions only'}; {device}, {dtype} ({why})")


# -----------------------------------------------------------------------------------------------------
# errors in OpenAI's shape, and the key

async def on_api_error(request, e):
    return error_response(e.status, str(e), e.param, e.code, e.kind, e.headers)


async def on_http_error(request, e):  # 404, 405: Starlette's own, in the same shape
    return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=str(e.status_code))


async def on_server_error(request, e):  # a bug of ours: still OpenAI's shape, and the server goes on
    print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return error_response(500, f"The server failed on this request ({type(e).__name__})", kind="server_error")


def check_key(request):
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):  # constant time
        raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


# -----------------------------------------------------------------------------------------------------
# the two generation endpoints

async def generate(request, chat):
    check_key(request)
    body = await read_json(request, max_body_bytes)
    prompts = chat_prompt(tok, body) if chat else completion_prompts(tok, body)
    context = model.config.block_size
    # OpenAI's default max_tokens: a chat reply runs to its end, a completion is 16 tokens
    opts = sampling(body, max_tokens_cap if chat else 16, max_tokens_cap, max_n)
    for ids in prompts:
        if len(ids) >= context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; your prompt has "
                           f"{len(ids)} tokens (it must leave room for at least one more)", param="messages" if chat
                           else "prompt", code="context_length_exceeded")
    if len(prompts) * opts["n"] > max_batch + max_queue:  # more than this server ever holds at once: never a 503
        raise ApiError(400, f"This request asks for {len(prompts) * opts['n']} sequences (prompts x n); this server "
                       f"holds at most {max_batch + max_queue} at once", param="n", code="too_many_sequences")
    stop_ids = set(tok.special_tokens.values()) if chat else {tok.eot_id} - {None}
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    seqs = []
    for p, ids in enumerate(prompts):
        for j in range(opts["n"]):
            index = p * opts["n"] + j  # OpenAI's numbering: the choices of prompt 0, then of prompt 1, ...
            seed = None if opts["seed"] is None else opts["seed"] + j
            sink = (lambda ev, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, ev)))
            seqs.append(Sequence(ids, opts["max_tokens"], sink, opts["temperature"], opts["top_p"], opts["top_k"],
                                 seed, stop_ids, TextStream(tok, opts["stop"])))
    try:
        engine.submit(seqs)
    except QueueFull:
        raise ApiError(503, "The server is busy: too many requests are waiting. Retry shortly", code="server_busy",
                       kind="server_error", headers={"Retry-After": "1"}) from None
    prompt_tokens = sum(len(ids) for ids in prompts)
    head = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                model=model_name)
    if opts["stream"]:
        return StreamingResponse(stream(seqs, events, head, chat, prompt_tokens, opts["usage"]),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts, finish, used = [""] * len(seqs), [None] * len(seqs), 0
    try:
        while None in finish:
            try:
                index, ev = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody to answer: free the slots
                    return error_response(499, "client closed the request")
                continue
            if ev[0] == "text":
                texts[index] += ev[1]
            elif ev[0] == "done":
                finish[index], used = ev[1], used + ev[2]
            else:
                raise ApiError(500, f"generation failed: {ev[1]}", kind="server_error")
    finally:
        for s in seqs:
            engine.cancel(s)
    usage = dict(prompt_tokens=prompt_tokens, completion_tokens=used, total_tokens=prompt_tokens + used)
    if chat:
        choices = [dict(index=i, message=dict(role="assistant", content=t), logprobs=None, finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, finish))]
    else:
        choices = [dict(index=i, text=t, logprobs=None, finish_reason=r) for i, (t, r) in enumerate(zip(texts, finish))]
    kind = "chat.completion" if chat else "text_completion"
    return JSONResponse(dict(head, object=kind, choices=choices, usage=usage))


async def stream(seqs, events, head, chat, prompt_tokens, include_usage):
    """Server-sent events: one chunk per piece of text, a last one per choice with its finish_reason,
    optionally the usage, then [DONE]. Leaving early (the client went away) cancels the sequences."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index, text=None, finish=None, first=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = dict(index=index, delta=delta, logprobs=None, finish_reason=finish)
        else:
            choice = dict(index=index, text=text or "", logprobs=None, finish_reason=finish)
        obj = dict(head, object=kind, choices=[choice])
        if include_usage:
            obj["usage"] = None  # as OpenAI's: every chunk but the last carries a null usage
        return f"data: {json.dumps(obj)}\n\n"

    try:
        if chat:
            for i in range(len(seqs)):
                yield chunk(i, first=True)
        left, used = len(seqs), 0
        while left:
            index, ev = await events.get()
            if ev[0] == "text":
                yield chunk(index, ev[1])
            elif ev[0] == "done":
                yield chunk(index, finish=ev[1])
                left, used = left - 1, used + ev[2]
            else:
                yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error', 'code': None}})}\n\n"
                break
        if include_usage:
            usage = dict(prompt_tokens=prompt_tokens, completion_tokens=used, total_tokens=prompt_tokens + used)
            yield f"data: {json.dumps(dict(head, object=kind, choices=[], usage=usage))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for s in seqs:
            engine.cancel(s)


async def completions(request):
    return await generate(request, chat=False)


async def chat_completions(request):
    return await generate(request, chat=True)


async def models(request):
    check_key(request)
    return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": CREATED,
                                                     "owned_by": "nanoforge"}]})


async def health(request):
    return JSONResponse({"status": "ok", "model": model_name, "context": model.config.block_size,
                         "chat": has_chat, **engine.stats()})


async def page(request):
    # the page runs its own inline script and talks to this origin only
    csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
    return HTMLResponse(CHAT_PAGE, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})


# -----------------------------------------------------------------------------------------------------
routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
          Route("/v1/completions", completions, methods=["POST"]),
          Route("/v1/chat/completions", chat_completions, methods=["POST"])]
middleware = []
if cors_origins:
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()]
    middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"]))
app = Starlette(routes=routes, middleware=middleware,
                exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_server_error})
print(f"serving on http://{host}:{port} (chat page at /, OpenAI API at /v1)", flush=True)
uvicorn.run(app, host=host, port=port, log_level=log_level)
engine.close()
