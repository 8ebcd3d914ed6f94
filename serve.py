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
127.0.0.1 only; with --host=0.0.0.0 give --api_key (checked as a Bearer token on /v1). No web page but its
own may call it unless --cors_origins="https://a.example,https://b.example" (or "*"), and it answers only
to its own host names (--allowed_hosts adds more): nanoforge/server.py says why, guard by guard.
"""
import os
import signal
import sys
import threading

import uvicorn

from configurator import configure, knobs
from nanoforge import errors, files, hardware
from nanoforge.chat_template import CHAT_TOKENS
from nanoforge.checkpoint import load_model
from nanoforge.engine import Engine
from nanoforge.errors import UserError
from nanoforge.quantize import decoding_weights
from nanoforge.server import LOOPBACK, HeaderDeadline, build_app
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (the checkpoint in out_dir), a GPT-2 name, a HF folder or a checkpoint file
out_dir = "out"  # used when init_from='resume'
model_name = ""  # the id /v1/models reports; '' = the out_dir or init_from
host = "127.0.0.1"  # 0.0.0.0 listens on every interface: then set api_key
port = 8000
api_key = ""  # when set, /v1 requests need "Authorization: Bearer <api_key>"
cors_origins = ""  # comma-separated origins whose web pages may call the API ('*': any); '' = this server's page only
allowed_hosts = ""  # host names accepted besides loopback and --host (a name the server is reached by); '*' = any
max_batch = 16  # sequences decoded together (KV-cache slots, all allocated at start)
max_queue = 64  # sequences that may wait for a slot; past that: 503
max_tokens_cap = 1024  # the largest max_tokens a request may ask for
max_n = 8  # the most choices (n) a request may ask for
max_body_bytes = 1_000_000  # a larger request body gets 413
body_timeout = 30.0  # seconds a request body may take to arrive (then 408)
header_timeout = 10.0  # seconds a connection may take to send a request's headers (then it is closed)
device = "auto"
dtype = "auto"
quantize = "none"  # 'bf16' or 'int8': the Linear layers' and head's weights in 2 or 1 bytes (nanoforge/quantize.py)
compile = False  # compile the decode step (torch.compile): faster tokens, after ~15 s of compiling (1.5 min cold)
log_level = "info"  # uvicorn's: 'warning' hides the per-request lines
step_delay = 0.0  # seconds to pause after each decode step: a slow model on purpose, to watch queueing and Stop
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))

device, _ = hardware.resolve_device(device)
if min(max_batch, max_tokens_cap, max_n, max_body_bytes) < 1 or max_queue < 0:
    raise UserError("max_batch, max_tokens_cap, max_n, max_body_bytes must be >= 1 and max_queue >= 0")
if host not in LOOPBACK and not api_key:
    print(f"warning: listening on {host} with no api_key: anyone who can reach this port can use the model; "
          f"pass --api_key=...", file=sys.stderr)

source = out_dir if init_from == "resume" else init_from
model, tok_spec, _ = load_model(source, map_location=device)
n_params = model.get_num_params()  # counted before int8: its weights are buffers, not parameters
model = decoding_weights(model.eval().to(device), quantize)
# decoding runs max_batch rows at a time at most: the precision is measured at that shape
dtype, why = hardware.resolve_dtype(dtype, device, (max_batch, model.config.n_embd))
if compile:
    print("compiling the decode step (once per batch kind, before serving)...", flush=True)
    hardware.compile_decoding(model)
tok = load_tokenizer(tok_spec)
model_name = model_name or os.path.basename(os.path.normpath(source))
has_chat = all(t in tok.special_tokens for t in CHAT_TOKENS)
engine = Engine(model, tok, device, dtype, max_batch=max_batch, max_queue=max_queue, step_delay=step_delay,
                warm_up=compile, thread=False)
with open(os.path.join(files.REPO, "nanoforge", "pages", "chat.html"), "rb") as f:
    chat_page = f.read()
print(f"model {model_name}: {n_params / 1e6:.2f}M params, context {model.config.block_size}, "
      f"{'chat template' if has_chat else 'no chat tokens: /v1/completions only'}; {device}, {dtype} ({why})")

# the names the Host header may carry: loopback, the address listened on; any where it listens on every one
wildcard = host in ("0.0.0.0", "::", "")
hosts = None if wildcard or allowed_hosts == "*" else \
    [*LOOPBACK, host, *(h.strip() for h in allowed_hosts.split(",") if h.strip())]
app = build_app(engine, tok, model.config.block_size, model_name, api_key=api_key,
                cors_origins=[o.strip() for o in cors_origins.split(",") if o.strip()], allowed_hosts=hosts,
                max_tokens_cap=max_tokens_cap, max_n=max_n, max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                max_sequences=max_batch + max_queue, chat_page=chat_page)
HeaderDeadline.header_timeout = header_timeout
web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=HeaderDeadline,
                                    timeout_keep_alive=5))
exit_code = []


def serve_http():
    try:
        web.run()
    except SystemExit as e:  # uvicorn could not start (the port is taken): it has said why
        exit_code.append(e.code)
    except BaseException:
        exit_code.append(1)
        raise
    finally:
        engine.close()  # the requests are answered: the model's loop ends, and with it this script


def shut_down(signum, frame):  # what uvicorn does on the main thread: finish the running requests; twice: now
    web.force_exit = web.should_exit
    web.should_exit = True


signal.signal(signal.SIGINT, shut_down)
signal.signal(signal.SIGTERM, shut_down)
print(f"serving on http://{host}:{port} (chat page at /, OpenAI API at /v1)", flush=True)
threading.Thread(target=serve_http, name="http").start()
engine.run()  # the model on this thread, the one that loaded it: Engine.run says why it is faster here
sys.exit(exit_code[0] if exit_code else 0)
