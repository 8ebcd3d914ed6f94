"""
serve.py as a user meets it: a real server process on a free port, talked to by the official openai client,
by plain HTTP (httpx) and by a chrome. The model is a tiny random GPT with a character vocabulary and the
chat tokens (checkpoint.save_checkpoint), so the server's greedy text can be held against sample.py's.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import ROOT
from model import GPT, GPTConfig
from nanoforge.chat_template import chat_tokenizer, render
from nanoforge import training
from nanoforge.checkpoint import save_checkpoint
from nanoforge.tokenizer import CharTokenizer

CONTEXT = 1024  # long enough that a 1000-token reply is still running when a test acts on it


@pytest.fixture(scope="module")
def chat_ckpt(char_data, tmp_path_factory):
    """out_dir of a random 2-layer GPT over Tiny Shakespeare's characters plus the chat tokens. The chat
    rows are added by training.grow_vocab (the mean of the others), so greedy decoding never picks one: replies
    run to max_tokens, whatever the random weights."""
    with open(os.path.join(char_data, "meta.json")) as f:
        spec = json.load(f)["tokenizer"]
    tok = chat_tokenizer(CharTokenizer(spec["chars"]))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT, vocab_size=len(spec["chars"])))
    training.grow_vocab(model, tok.vocab_size)
    out = tmp_path_factory.mktemp("serve_ckpt")
    save_checkpoint(str(out / "ckpt.pt"), model, {"tokenizer": tok.spec})
    return str(out), tok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out_dir, *args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={out_dir}", f"--port={port}",
                             "--device=cpu", "--dtype=float32", "--log_level=warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to a minute: the import of torch is slow on a busy machine
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited:\n{proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve.py did not answer /health within a minute")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(chat_ckpt):
    proc, url = start_server(chat_ckpt[0], "--max_batch=8", "--max_queue=32", "--max_tokens_cap=1000",
                             "--max_body_bytes=20000")
    yield url, proc
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def health(url):
    return httpx.get(url + "/health").json()


def wait_idle(url, timeout=30):
    """Polls /health until no sequence runs; returns its stats (a slow machine only waits longer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(url)
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"sequences still running after {timeout} s: {health(url)}")


def sample_py(out_dir, *args, stdin=None):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={out_dir}", "--device=cpu",
                           "--dtype=float32", "--temperature=0", *args], input=stdin, capture_output=True,
                          text=True, check=True)
    return proc.stdout


# -----------------------------------------------------------------------------------------------------
# the openai client, unchanged

def test_completions_greedy_equal_sample_py_streamed_or_not(chat_ckpt, client):
    out_dir, _ = chat_ckpt
    prompt, n = "ROMEO:\nWhat light", 40
    expected = sample_py(out_dir, f"--start={prompt}", f"--max_new_tokens={n}", "--num_samples=1")
    expected = expected[len(prompt):].split("\n---------------\n")[0]
    assert len(expected) == n

    r = client.completions.create(model="whatever", prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(prompt), n, len(prompt) + n)

    chunks = list(client.completions.create(model="whatever", prompt=prompt, max_tokens=n, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == n and chunks[-1].usage.prompt_tokens == len(prompt)


def test_chat_greedy_equals_sample_py_chat_and_counts_the_template(chat_ckpt, client):
    out_dir, tok = chat_ckpt
    n = 30
    # sample.py --chat prints "user> assistant> <reply>\nuser> " for one scripted line
    out = sample_py(out_dir, "--chat", f"--max_new_tokens={n}", stdin="Good morrow\n")
    expected = out.split("assistant> ", 1)[1].split("\nuser> ")[0]
    messages = [{"role": "user", "content": "Good morrow"}]

    r = client.chat.completions.create(model="m", messages=messages, max_tokens=n, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    prompt_ids, _ = render(tok, messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == n

    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=n, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list_and_health(server, client):
    h = health(server[0])
    assert h["status"] == "ok" and h["context"] == CONTEXT and h["chat"] is True
    assert h["model"] == os.path.basename(os.path.dirname(h["model"]) or h["model"])  # the out_dir's name
    assert [m.id for m in client.models.list().data] == [h["model"]]


def test_stop_strings_n_and_seed(client):
    prompt = "To be, or not"
    full = client.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    cut = full[5:8]  # a stop string the greedy text contains: the text ends just before its first occurrence
    r = client.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0, stop=[cut, "\x00never"])
    assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt=prompt, max_tokens=30, temperature=0, stop=cut, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(cut)]

    # n choices, sampled; the same seed gives the same choices, and each choice is its own sample
    a = client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=1.0, n=3, seed=7)
    b = client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=1.0, n=3, seed=7)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 60 and a.usage.prompt_tokens == len(prompt)


# -----------------------------------------------------------------------------------------------------
# many clients at once

def read_stream(url, body, timeout=120):
    """(text, finish_reason, saw [DONE]) of one streamed completion, read with plain httpx."""
    text, finish, done = "", None, False
    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish, done


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def run_clients(url, bodies):
    results = [None] * len(bodies)
    errors = []

    def one(i):
        try:
            results[i] = read_stream(url, bodies[i])
        except Exception as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_32_concurrent_streams_complete_with_solo_tokens_and_memory_returns(server):
    """32 streaming clients at once on 8 slots (the rest queue): every stream ends with [DONE], and each
    greedy text is the one its prompt gets alone; afterwards the server's memory is back near its level
    before the load, since the KV slots are allocated once at start."""
    url, proc = server
    prompts = ["abcdefghijklmnopqrstuvwxyz"[i % 26] + " and" * (i % 5) + "o" * (i // 26) for i in range(32)]
    bodies = [dict(prompt=p, max_tokens=30 + i % 7, temperature=0) for i, p in enumerate(prompts)]
    solo = [httpx.post(url + "/v1/completions", json=b, timeout=60).json()["choices"][0]["text"] for b in bodies]
    run_clients(url, bodies[:8])  # a first load: Python's and the allocator's one-off growth is not a leak
    wait_idle(url)
    before = rss_kib(proc.pid)
    steps_before = health(url)["steps"]
    results = run_clients(url, bodies)
    assert all(done for _, _, done in results)
    assert [text for text, _, _ in results] == solo
    assert all(finish == "length" for _, finish, _ in results)
    h = wait_idle(url)
    assert h["free_slots"] == 8
    # decoded together: far fewer batched steps than the 32 x ~33 tokens one at a time would take
    assert h["steps"] - steps_before < sum(b["max_tokens"] for b in bodies) / 2
    after = rss_kib(proc.pid)
    assert after < before * 1.10 + 20 * 1024, f"RSS {before} KiB before the load, {after} KiB after"


# -----------------------------------------------------------------------------------------------------
# bad input: each a 4xx with OpenAI's error body, and the server goes on serving

BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi", ', 400, "could not parse the JSON body"),
    ("not an object", "/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("max_tokens a string", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400,
     "'max_tokens' must be an integer, got string"),
    ("temperature a string", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "temperature": "hot"}, 400, "'temperature' must be a number"),
    ("stream not a boolean", "/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("max_tokens 0", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be between 1 and 1000"),
    ("max_tokens above the cap", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400,
     "'max_tokens' must be between 1 and 1000, got 5000"),
    ("max_completion_tokens above the cap", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1001}, 400, "between 1 and 1000"),
    ("top_p 0", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "'top_p' must be above 0"),
    ("prompt longer than the context", "/v1/completions", {"prompt": "a" * 1100}, 400,
     "This model's maximum context length is 1024 tokens; your prompt has 1100 tokens"),
    ("characters the model does not know", "/v1/completions", {"prompt": "h\u00e9llo \u2603"}, 400,
     "characters not in this model's vocabulary: '\u00e9\u2603'"),
    ("unknown characters in chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "caf\u00e9"}]},
     400, "characters not in this model's vocabulary: '\u00e9'"),
    ("a message without a role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400,
     "messages[0] must have a role"),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, 400, "'prompt' must be a string"),
    ("JSON nested 9,000 deep", "/v1/completions", b"[" * 9000 + b"]" * 9000, 400, "nested too deeply"),
    ("a seed beyond 64 bits", "/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "'seed' must be a 64-bit integer"),
    ("an image content part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0] must be a text part"),
    ("a text part that is not text", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, "messages[0].content[0]"),
    ("a role that is a list", "/v1/chat/completions", {"messages": [{"role": ["user"], "content": "hi"}]}, 400,
     "messages[0] must have a role"),
    ("a message that is a string", "/v1/chat/completions", {"messages": ["hi"]}, 400, "messages[0] must have a role"),
    ("content that is a number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content must be a string"),
    ("a stop string of 300 characters", "/v1/completions", {"prompt": "hi", "stop": "x" * 300}, 400,
     "at most 256 characters"),
    ("more sequences than the server holds", "/v1/completions", {"prompt": ["a"] * 6, "n": 8}, 400,
     "asks for 48 sequences (prompts x n); this server holds at most 40"),
    ("a body over the size limit", "/v1/completions", {"prompt": "a" * 30000}, 413, "larger than this server's limit"),
]


@pytest.mark.parametrize("what,path,body,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_message_and_the_server_goes_on(server, what, path, body, status, message):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] and "code" in error
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 2


def test_unknown_fields_and_model_names_are_ignored(client):
    r = client.completions.create(model="no-such-model", prompt="hi", max_tokens=2, temperature=0,
                                  extra_body={"frobnicate": 1})
    assert len(r.choices[0].text) == 2


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 1024 tokens"):
        client.completions.create(model="m", prompt="a" * 1100)


def test_only_the_chat_page_is_served_and_no_cors_by_default(server):
    url, _ = server
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "<title>nanoforge chat</title>" in page.text
    for path in ("/serve.py", "/nanoforge/pages/chat.html", "/ckpt.pt", "/../checkpoint.py", "/%2e%2e/model.py", "/README.md"):
        r = httpx.get(url + path)
        assert r.status_code == 404 and "error" in r.json(), path
    # a page on another site may not drive the model: a "simple" cross-origin POST needs no preflight, so it
    # is refused outright (it used to run, its answer merely unreadable to the page)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers={"Origin": "https://elsewhere.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert "--cors_origins=https://elsewhere.example" in r.json()["error"]["message"]
    # the server's own page (same origin) may, and the page may not be framed by another site
    same = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"Origin": url})
    assert same.status_code == 200
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    # the page's empty icon (data:,) is allowed by its policy: a blocked one is a console error in Chromium
    assert '<link rel="icon" href="data:,">' in page.text and "img-src data:" in page.headers["content-security-policy"]
    # a name this server does not answer to (DNS rebinding: evil.example resolving to 127.0.0.1) is refused
    r = httpx.get(url + "/v1/models", headers={"Host": "evil.example:8000"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(url + "/v1/models", headers={"Host": url.split("//")[1].replace("127.0.0.1", "localhost")}).status_code == 200


@pytest.fixture(scope="module")
def strict_server(chat_ckpt):
    """One slot, no queue, a key, and one allowed origin. Each step is slowed by 20 ms (step_delay), so a
    1000-token reply holds its slot for 20 s at least, on any machine: long after the test has acted."""
    proc, url = start_server(chat_ckpt[0], "--api_key=s3cret", "--max_batch=1", "--max_queue=0",
                             "--cors_origins=https://app.example", "--step_delay=0.02", "--header_timeout=1",
                             "--body_timeout=1")
    yield url
    stop_server(proc)


AUTH = {"Authorization": "Bearer s3cret"}


def test_a_client_that_disconnects_stops_its_generation(strict_server):
    url = strict_server
    tokens_before = health(url)["tokens"]
    with httpx.stream("POST", url + "/v1/completions", timeout=60, headers=AUTH,
                      json=dict(prompt="O", max_tokens=1000, temperature=0, stream=True)) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert health(url)["running"] == 1
    # leaving the block hangs up, one chunk in
    h = wait_idle(url)
    assert h["free_slots"] == 1
    assert h["tokens"] - tokens_before < 1000  # it stopped, it did not run to max_tokens
    assert httpx.post(url + "/v1/completions", headers=AUTH, json=dict(prompt="O", max_tokens=3)).status_code == 200


def test_a_non_streaming_client_that_disconnects_frees_its_slot(strict_server):
    url = strict_server
    tokens_before = health(url)["tokens"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 2 s of a reply that takes 20 s at least
        httpx.post(url + "/v1/completions", headers=AUTH, timeout=2,
                   json=dict(prompt="O", max_tokens=1000, temperature=0))
    h = wait_idle(url, timeout=10)  # freed at the next step, not when the 1000 tokens are done
    assert h["free_slots"] == 1 and h["tokens"] - tokens_before < 1000


def test_slow_headers_and_a_body_that_never_comes_are_cut_off(strict_server):
    host, port = strict_server.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # headers trickling in, never finished
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server after its header_timeout of 1 s
        assert time.monotonic() - t0 < 20
    with socket.create_connection((host, int(port)), timeout=30) as s:  # a body announced and never sent
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        reply = b""
        while b"did not arrive" not in reply and (chunk := s.recv(4096)):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply, reply
    assert httpx.post(strict_server + "/v1/completions", headers=AUTH, json=dict(prompt="O", max_tokens=2)).status_code == 200


def test_api_key_is_checked(strict_server):
    url = strict_server
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="m", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def test_cors_only_for_the_origins_asked_for(strict_server):
    url = strict_server
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(url + "/v1/chat/completions", headers=pre)
    assert r.headers.get("access-control-allow-origin") == "https://app.example"
    r = httpx.options(url + "/v1/chat/completions", headers=dict(pre, Origin="https://evil.example"))
    assert "access-control-allow-origin" not in r.headers


def test_too_many_requests_get_503_with_retry_after(strict_server):
    url = strict_server
    auth = AUTH
    with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=60,
                      json=dict(prompt="O", max_tokens=1000, temperature=0, stream=True)) as r:
        lines = r.iter_lines()  # kept open: leaving a for loop over it would close the connection
        while not next(lines).startswith("data: "):
            pass  # once a chunk has come, the one slot is taken and a long reply is under way
        busy = httpx.post(url + "/v1/completions", headers=auth, json={"prompt": "hi", "max_tokens": 1})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "server_error"
    wait_idle(url)
    assert httpx.post(url + "/v1/completions", headers=auth, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


# -----------------------------------------------------------------------------------------------------
# the chat page, in a real browser

def test_chat_page_streams_a_reply(server, client, chrome, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    chrome.get(url + "/")
    chrome.get_log("browser")  # start the console log from this page
    wait = WebDriverWait(chrome, 60)
    wait.until(lambda d: "context" in d.find_element(By.ID, "model").text)
    # greedy, so the reply can be checked against the API's; the slider is set as a user drags it
    chrome.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                           "t.dispatchEvent(new Event('input'));")
    chrome.find_element(By.ID, "max-tokens").clear()
    chrome.find_element(By.ID, "max-tokens").send_keys("40")
    chrome.find_element(By.ID, "system").send_keys("Speak as a player.")
    chrome.find_element(By.ID, "input").send_keys("Good morrow, friend")
    chrome.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
    reply = chrome.find_element(By.CSS_SELECTOR, ".msg.assistant .text").get_attribute("textContent")
    expected = client.chat.completions.create(
        model="m", max_tokens=40, temperature=0, messages=[{"role": "system", "content": "Speak as a player."},
                                                           {"role": "user", "content": "Good morrow, friend"}])
    assert reply == expected.choices[0].message.content and reply
    assert [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"] == []
    chrome.save_screenshot(str(tmp_path / "serve.png"))
    if os.environ.get("NANOFORGE_SCREENSHOTS") == "1":
        os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
        chrome.save_screenshot(os.path.join(ROOT, "docs", "serve.png"))

    # markup goes in as text: what the user typed is shown as typed, and the server's error (these
    # characters are not in the vocabulary) is shown in its own bubble, neither made into elements
    chrome.find_element(By.ID, "input").send_keys("<b>bold</b>")
    chrome.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert chrome.find_elements(By.CSS_SELECTOR, ".msg.user .text")[-1].get_attribute("textContent") == "<b>bold</b>"
    assert "characters not in this model's vocabulary: '/<>'" in chrome.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert not chrome.find_elements(By.CSS_SELECTOR, "#log b")
    # the one console error is the browser's note of the 400 response itself
    assert all("400" in e["message"] for e in chrome.get_log("browser") if e["level"] == "SEVERE")


def test_chat_page_stop_button_ends_the_generation(strict_server, chrome):
    """On the slowed server, so the reply is still streaming when Stop is clicked; the page's API key
    field is what gets it through."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url = strict_server
    chrome.get(url + "/")
    chrome.get_log("browser")
    wait = WebDriverWait(chrome, 60)
    chrome.find_element(By.ID, "api-key").send_keys("s3cret")
    chrome.find_element(By.ID, "max-tokens").clear()
    chrome.find_element(By.ID, "max-tokens").send_keys("1000")
    # greedy: the fixture's model then never picks a chat token, so the reply runs until stopped (sampled,
    # it could end at once on <|end|>, or show only spaces, and never begin visibly)
    chrome.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                          "t.dispatchEvent(new Event('input'));")
    tokens_before = health(url)["tokens"]
    chrome.find_element(By.ID, "input").send_keys("Speak on")
    chrome.find_element(By.ID, "send").click()
    wait.until(lambda d: d.execute_script(  # it has begun: any character, spaces too
        "const e = document.querySelector('.msg.assistant .text'); return e && e.textContent.length > 0;"))
    chrome.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
    assert chrome.find_element(By.ID, "send").is_enabled() and not chrome.find_element(By.ID, "stop").is_enabled()
    h = wait_idle(url)
    assert h["tokens"] - tokens_before < 1000
    assert not chrome.find_elements(By.CSS_SELECTOR, ".msg.error")
    assert [e for e in chrome.get_log("browser") if e["level"] == "SEVERE"] == []


def test_help_lists_the_knobs_without_loading_a_model():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "usage: python serve.py" in proc.stdout
    for knob in ("--host='127.0.0.1'", "--api_key=''", "--max_batch=16", "--max_queue=64", "--cors_origins=''"):
        assert knob in proc.stdout


def test_a_signal_finishes_the_running_request_and_a_taken_port_is_an_error(chat_ckpt):
    """The model's loop runs on serve.py's main thread and the web server on another: Ctrl-C (SIGINT) or
    SIGTERM still stops it the way uvicorn alone did, the request in flight answered first, exit status 0;
    a port already taken is uvicorn's one-line error and a non-zero exit, not a server that never answers."""
    proc, url = start_server(chat_ckpt[0], "--step_delay=0.02")
    port = url.rsplit(":", 1)[1]
    taken = subprocess.run([sys.executable, os.path.join(ROOT, "serve.py"), f"--out_dir={chat_ckpt[0]}",
                            f"--port={port}", "--device=cpu", "--dtype=float32"], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)
    assert taken.returncode != 0 and "address already in use" in taken.stdout + taken.stderr, taken.stderr[-2000:]
    answer = {}
    slow = threading.Thread(target=lambda: answer.update(httpx.post(url + "/v1/completions", timeout=60, json={
        "prompt": "ab", "max_tokens": 40, "temperature": 0}).json()))
    slow.start()
    while health(url)["running"] == 0 and slow.is_alive():  # the request is being decoded (40 steps of 20+ ms)
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    slow.join(60)
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 40
    assert proc.wait(timeout=30) == 0
    proc2, _ = start_server(chat_ckpt[0])
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(timeout=30) == 0
