"""
serve.py's web app: the OpenAI-compatible endpoints over an Engine, the chat page, and the guards that keep
one client (or one web page) from harming the others. Built by build_app, so the tests run it in-process.

Guards, each because of a way a local model server has been attacked or stalled:
- Host: only the names this server answers to (loopback, the --host it listens on, --allowed_hosts): a
  page on another site that rebinds its DNS name to 127.0.0.1 sends its own Host, and is refused (the
  precondition of Ollama's CVE-2024-28224).
- Origin: a browser request from another origin is refused unless --cors_origins allows it: a "simple"
  cross-origin POST needs no preflight, so CORS alone would let any page drive the model.
- The page may not be framed (frame-ancestors 'none', X-Frame-Options: DENY).
- A request body must arrive within body_timeout, and a request's headers within header_timeout of the
  connection opening (HeaderDeadline; uvicorn itself only times out idle keep-alive connections).
- A client that goes away frees its slots at the next step, streamed or not.
"""
import asyncio
import hmac
import json
import sys
import time
import uuid
from urllib.parse import urlsplit

import h11
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from nanoforge.chat_template import CHAT_TOKENS
from nanoforge.engine import QueueFull, Sequence, TextStream, timings
from nanoforge.openai_api import (ApiError, chat_prompt, completion_prompts, detokenize_request, error_response, field,
                                  logprobs_body, logprobs_option, read_json, sampling, tokenize_request)
from nanoforge.structured import JsonGrammars

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def host_name(value):
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1' (a Host header, or an origin's netloc)."""
    return urlsplit("//" + value).hostname or ""


class Guard:
    """ASGI middleware: a request whose Host this server does not answer to, or a browser request from an
    origin it does not allow, is refused with a 403 before anything else runs."""

    def __init__(self, app, hosts, origins):
        self.app, self.hosts, self.origins = app, hosts, origins  # hosts: names, or None for any

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            origin = headers.get("origin")
            if self.hosts is not None and host_name(host) not in self.hosts:
                return await error_response(403, f"Host {host!r} is not one this server answers to; start it with "
                                            f"--allowed_hosts={host_name(host) or 'NAME'} to allow it",
                                            code="host_not_allowed")(scope, receive, send)
            same_origin = origin is not None and urlsplit(origin).netloc == host
            if origin is not None and not same_origin and "*" not in self.origins and origin not in self.origins:
                return await error_response(403, f"Requests from the web page at {origin} are not allowed; start "
                                            f"the server with --cors_origins={origin} to allow it",
                                            code="origin_not_allowed")(scope, receive, send)
        await self.app(scope, receive, send)


class HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers: a connection that opens (or
    finishes a response) and then trickles bytes without ever completing a request is closed, where uvicorn
    would hold it, and a slot of the machine's file descriptors, for ever."""

    header_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.header_deadline = self.loop.call_later(self.header_timeout, self.headers_late)

    def on_response_complete(self):
        super().on_response_complete()
        self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout, self.headers_late)

    def connection_lost(self, exc):
        self.header_deadline.cancel()
        super().connection_lost(exc)

    def headers_late(self):
        # their_state leaves IDLE once a request's headers are complete: then the request is under way
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def request_timings(seqs):
    """A response's `timings`, as llama.cpp's server reports them: one sequence's own; for several (n > 1, or
    a list of prompts) their prompt tokens and prefill times summed, and the generation as long as the longest
    (they decode together)."""
    each = [s.timings() for s in seqs]
    return timings(sum(t["prompt_n"] for t in each), sum(t["prompt_ms"] for t in each),
                   sum(t["predicted_n"] for t in each), max(t["predicted_ms"] for t in each))


def build_app(engine, tok, context, model_name, api_key="", cors_origins=(), allowed_hosts=None, max_tokens_cap=1024,
              max_n=8, max_body_bytes=1_000_000, body_timeout=30.0, max_sequences=80, chat_page=b""):
    """The Starlette app serving `engine` (its model's context and tokenizer `tok`). allowed_hosts: host names
    accepted in the Host header (None: any); cors_origins: origins whose browser requests are allowed ('*': any)."""
    created = int(time.time())
    has_chat = all(t in tok.special_tokens for t in CHAT_TOKENS)
    grammars = []  # the tokenizer's JsonGrammars, made by the first request for structured output

    def response_format(body):
        """A function giving each sequence of the request the Constraint its response_format asks for (None:
        any text)."""
        fmt = field(body, "response_format", "object")
        if fmt is None:
            return lambda: None
        if not grammars:
            grammars.append(JsonGrammars(tok))
        try:
            grammar = grammars[0].compile(fmt)
            if grammar is not None:
                grammars[0].constraint(grammar)  # made once here, so a failure is this request's 400
        except ValueError as e:
            raise ApiError(400, f"Invalid 'response_format': {e}", param="response_format", code="invalid_value") from None
        return lambda: None if grammar is None else grammars[0].constraint(grammar)

    def check_key(request):
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):  # constant time
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def generate(request, chat):
        check_key(request)
        body = await read_json(request, max_body_bytes, body_timeout)
        prompts = chat_prompt(tok, body) if chat else completion_prompts(tok, body)
        # OpenAI's default max_tokens: a chat reply runs to its end, a completion is 16 tokens
        opts = sampling(body, max_tokens_cap if chat else 16, max_tokens_cap, max_n)
        top_logprobs = logprobs_option(body, chat)  # None: no logprobs asked for
        constraint = response_format(body)
        if len(prompts) * opts["n"] > max_sequences:  # more than the server ever holds at once: never a 503
            raise ApiError(400, f"This request asks for {len(prompts) * opts['n']} sequences (prompts x n); this "
                           f"server holds at most {max_sequences} at once", param="n", code="too_many_sequences")
        for ids in prompts:
            if len(ids) >= context:
                raise ApiError(400, f"This model's maximum context length is {context} tokens; your prompt has "
                               f"{len(ids)} tokens (it must leave room for at least one more)",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
        stop_ids = set(tok.special_tokens.values()) if chat else {tok.eot_id} - {None}
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seqs = []
        for p, ids in enumerate(prompts):
            for j in range(opts["n"]):
                index = p * opts["n"] + j  # OpenAI's numbering: the choices of prompt 0, then of prompt 1, ...
                seed = None if opts["seed"] is None else opts["seed"] + j
                sink = (lambda ev, index=index: loop.call_soon_threadsafe(events.put_nowait, (index, ev)))
                seqs.append(Sequence(ids, opts["max_tokens"], sink, opts["temperature"], opts["top_p"], opts["top_k"],
                                     seed, stop_ids, TextStream(tok, opts["stop"]), top_logprobs, constraint()))
        try:
            engine.submit(seqs)
        except QueueFull:
            raise ApiError(503, "The server is busy: too many requests are waiting. Retry shortly",
                           code="server_busy", kind="server_error", headers={"Retry-After": "1"}) from None
        prompt_tokens = sum(len(ids) for ids in prompts)
        head = dict(id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], created=int(time.time()),
                    model=model_name)
        if opts["stream"]:
            return StreamingResponse(stream(seqs, events, head, chat, prompt_tokens, opts["usage"], top_logprobs),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        # the body is read: the next message is the client hanging up, which frees the slots at once
        watcher = asyncio.create_task(on_disconnect(request, events))
        texts, finish, used, tokens = [""] * len(seqs), [None] * len(seqs), 0, [[] for _ in seqs]
        try:
            while None in finish:
                index, ev = await events.get()
                if ev[0] == "gone":
                    return error_response(499, "client closed the request")
                if ev[0] == "text":
                    texts[index] += ev[1]
                elif ev[0] == "token":
                    tokens[index].append(ev[1:])
                elif ev[0] == "done":
                    finish[index], used = ev[1], used + ev[2]
                elif ev[0] == "refused":
                    raise ApiError(400, ev[1], param="response_format", code="invalid_value")
                else:
                    raise ApiError(500, f"generation failed: {ev[1]}", kind="server_error")
        finally:
            watcher.cancel()
            for s in seqs:
                engine.cancel(s)
        usage = dict(prompt_tokens=prompt_tokens, completion_tokens=used, total_tokens=prompt_tokens + used)
        lp = [None if top_logprobs is None else logprobs_body(tok, t, chat) for t in tokens]
        if chat:
            choices = [dict(index=i, message=dict(role="assistant", content=t), logprobs=lp[i], finish_reason=r)
                       for i, (t, r) in enumerate(zip(texts, finish))]
        else:
            choices = [dict(index=i, text=t, logprobs=lp[i], finish_reason=r)
                       for i, (t, r) in enumerate(zip(texts, finish))]
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse(dict(head, object=kind, choices=choices, usage=usage, timings=request_timings(seqs)))

    async def on_disconnect(request, events):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        events.put_nowait((None, ("gone",)))

    async def stream(seqs, events, head, chat, prompt_tokens, include_usage, top_logprobs):
        """Server-sent events: one chunk per piece of text, a last one per choice with its finish_reason,
        optionally the usage, then [DONE]. Leaving early (the client went away) cancels the sequences. With
        logprobs, each chunk carries those of the tokens that arrived since the last (a token whose text is
        held back, part of a character or of a possible stop string, goes with the chunk that shows it)."""
        kind = "chat.completion.chunk" if chat else "text_completion"
        pending, offsets = [[] for _ in seqs], [0] * len(seqs)

        def chunk(index, text=None, finish=None, first=False, last=False):
            lp = None
            if top_logprobs is not None and not first:
                lp = logprobs_body(tok, pending[index], chat, offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"]) if not chat else 0
                pending[index] = []
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = dict(index=index, delta=delta, logprobs=lp, finish_reason=finish)
            else:
                choice = dict(index=index, text=text or "", logprobs=lp, finish_reason=finish)
            obj = dict(head, object=kind, choices=[choice])
            if last:  # the last choice's last chunk carries the response's timings, as llama.cpp's does
                obj["timings"] = request_timings(seqs)
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
                elif ev[0] == "token":
                    pending[index].append(ev[1:])
                elif ev[0] == "done":
                    yield chunk(index, finish=ev[1], last=left == 1)
                    left, used = left - 1, used + ev[2]
                else:  # the headers are sent: the error goes in the stream, as OpenAI's do
                    kind = "invalid_request_error" if ev[0] == "refused" else "server_error"
                    yield f"data: {json.dumps({'error': {'message': ev[1], 'type': kind, 'code': None}})}\n\n"
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

    async def tokenize(request):  # llama.cpp's server's: text -> ids (with_pieces: and each id's text)
        check_key(request)
        return JSONResponse(tokenize_request(tok, await read_json(request, max_body_bytes, body_timeout)))

    async def detokenize(request):
        check_key(request)
        return JSONResponse(detokenize_request(tok, await read_json(request, max_body_bytes, body_timeout)))

    async def models(request):
        check_key(request)
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                         "owned_by": "nanoforge"}]})

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_name, "context": context, "chat": has_chat,
                             **engine.stats()})

    async def page(request):
        # the page runs its own inline script, talks to this origin only, and may not be framed by another;
        # img-src data: is its empty icon (data:,), there so the browser asks for no /favicon.ico: without it
        # Chromium sometimes logs the icon as blocked, a console error
        csp = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; frame-ancestors 'none'")
        return HTMLResponse(chat_page, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff",
                                                "X-Frame-Options": "DENY"})

    async def on_api_error(request, e):
        return error_response(e.status, str(e), e.param, e.code, e.kind, e.headers)

    async def on_http_error(request, e):  # 404, 405: Starlette's own, in the same shape
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              code=str(e.status_code))

    async def on_server_error(request, e):  # a bug of ours: still OpenAI's shape, and the server goes on
        print(f"error: {request.method} {request.url.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return error_response(500, f"The server failed on this request ({type(e).__name__})", kind="server_error")

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/tokenize", tokenize, methods=["POST"]), Route("/detokenize", detokenize, methods=["POST"])]
    middleware = [Middleware(Guard, hosts=allowed_hosts, origins=list(cors_origins))]
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                         Exception: on_server_error})
