"""
What the tests share: running a script as a user does, the one-line-error check, reading a run's
log, and the data fixtures. Test modules import the helpers from here (`from conftest import run`); no
test module imports another.

The repository root is on the import path through pytest.ini (`pythonpath = .`): the scripts' own view
of model.py, configurator.py and the nanoforge package. Scripts run in subprocesses find them through the
editable install (pip install -e .), as a user's do.

Tests never touch the network: tiktoken reads GPT-2's BPE from the shared cache beside the repo, and
Hugging Face is told to stay offline (its GPT-2s are built randomly and saved to tmp_path instead).
"""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
SHAKESPEARE = os.path.join(SHARED, "data", "tinyshakespeare", "input.txt")

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(ROOT, "..", "shared", "assets", "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny test models gain nothing from threads, and spinning OpenMP threads on a busy 2-core machine
# (or two DDP ranks on it) slow each step by orders of magnitude; subprocesses inherit this
os.environ.setdefault("OMP_NUM_THREADS", "1")


# texts a tokenizer must give back exactly: scripts, emoji, code, whitespace runs, quoted special tokens
HARD = [
    "سلام دنیا! این یک آزمایش است.",  # Persian
    "مرحبا بالعالم، كيف حالك؟",  # Arabic
    "日本語のテキスト、中文文本，한국어 텍스트",  # CJK
    "emoji 🦊👩‍👩‍👧‍👦🏳️‍🌈 and combining e\u0301 a\u0308\u0323 Z\u0351\u0352\u0357",
    "def f(x):\n\tif x:\n\t\treturn    x  \n\n\n    # runs of   spaces\t\t\n",
    "never seen: ᚠᛇᚻ ∮ E⋅da = Q ℵ₀ \x00\x01\x7f \U0010fffd",
    "a literal <|endoftext|> and <|user|> in a document",
    "", " ", "\n", "  \n\t ",
]


def corpus_lines():
    """Tiny Shakespeare's first 120,000 characters as lines, and the first hard texts, for training tokenizers."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()[:120_000]
    return text.splitlines(keepends=True) + HARD[:3] * 5


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A tiny randomly initialised Hugging Face GPT-2, written by save_pretrained. Returns (folder, model)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # bos/eos inside the tiny vocabulary, else transformers warns that 50256 is out of range
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=100,
                        bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return str(folder), hf


# a tiny model that trains in a second or two
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=20",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--plot=False", "--dataset=shakespeare_char",
        "--gradient_accumulation_steps=1"]


# A script started by the tests spends ~2-3 s importing torch before it does anything (most of the suite's
# time), and every one that trains ~1 s more importing torch's compiler (torch.optim's optimizers load
# torch._dynamo when built, compiling or not). So each test worker keeps one Python that has imported
# torch, its compiler and numpy and nothing else, and runs each script in a fork of it: a new process,
# with the script's own argv, working folder, environment, stdin (empty), stdout and stderr, run as
# __main__ as `python script.py` runs it, its exit code, excepthook (the one-line errors), threads and
# atexit handlers at the end. What torch reads when it is imported (the CPU capability it may use,
# oneDNN's ISA, threads, the C++ compiler) must be the same as the fork server's; a run that sets those
# differently, a launcher (torchrun), or NANOFORGE_TEST_FORK=0 gets a fresh interpreter.
FORK_SERVER = r"""
import atexit, json, os, runpy, sys, threading, traceback, types
import numpy, torch, torch._dynamo  # the cost paid once, not by every script


def exit_code(e):
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)
    return 1


def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            f = os.open(path, flags, 0o644)
            os.dup2(f, fd)
            os.close(f)
        argv = req["argv"]
        try:
            if argv[0] == "-c":
                sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
                main = types.ModuleType("__main__")
                sys.modules["__main__"] = main
                exec(compile(argv[1], "<string>", "exec"), main.__dict__)
            else:
                sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = exit_code(e)
        except BaseException:
            try:
                sys.excepthook(*sys.exc_info())  # the scripts' hook: one line and its own exit code
            except SystemExit as e:
                code = exit_code(e)
        threading._shutdown()  # as the interpreter does at exit: wait for non-daemon threads,
        atexit._run_exitfuncs()  # then the atexit handlers
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


for line in sys.stdin:
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        child(json.loads(line))
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""
IMPORT_TIME_ENV = ("ATEN_", "ONEDNN_", "DNNL_", "MKL", "KMP_", "OMP_", "TORCH", "PYTORCH", "CUDA", "LD_", "PYTHON",
                   "CXX", "CC", "INDUCTOR", "AOT")  # the compiler's configuration reads these when imported


class ForkServer:
    def __init__(self):
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, text=True, env=self.env)
        self.tmp = tempfile.mkdtemp(prefix="forks")

    def takes(self, env):
        changed = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        return self.proc.poll() is None and not any(k.startswith(IMPORT_TIME_ENV) for k in changed)

    def run(self, argv, env, timeout, cwd):
        out, err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env, "cwd": cwd, "out": out, "err": err}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        code = json.loads(self.proc.stdout.readline())["code"]
        with open(out, encoding="utf-8") as f, open(err, encoding="utf-8") as g:
            stdout, stderr = f.read(), g.read()
        if not ready:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
        return subprocess.CompletedProcess([sys.executable, *argv], code, stdout, stderr)


_fork_server = []


def new_caches(m, B):
    """One float32 model.KVCache per layer of model m, for B rows, on the CPU: what generate_stream makes."""
    import torch
    from model import KVCache
    cfg = m.config
    return [KVCache(B, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, "cpu", torch.float32)
            for _ in range(cfg.n_layer)]


def run(script, *args, check=True, env=None, timeout=300, launcher=None, cwd=ROOT):
    """Runs a script of the repo (or `-c CODE`) from a folder (the repo root unless told) as a user does, in a
    new process (a fork of the worker's fork server, above, where it can); with check, a non-zero exit fails
    the test with the script's output."""
    argv = [script] if script == "-c" else [os.path.join(ROOT, script)]
    env_used = dict(os.environ if env is None else env)
    if launcher is None and os.environ.get("NANOFORGE_TEST_FORK", "1") != "0" and not _fork_server:
        _fork_server.append(ForkServer())
    if launcher is None and _fork_server and _fork_server[0].takes(env_used):
        proc = _fork_server[0].run([*argv, *args], env_used, timeout, str(cwd))
    else:
        proc = subprocess.run([*(launcher or [sys.executable]), *argv, *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


# Runs a script with time.perf_counter replaced by a clock that moves TICK seconds each time it is read,
# whatever the real time: a time budget then ends a run after the same steps on a fast machine or a slow,
# busy one (train.py reads the clock 3 times a step and counts 2 ticks of it as training time; a tick of
# 1/64 s keeps the sums exact in floating point)
FAKE_CLOCK = """
import itertools, runpy, sys, time
ticks, tick = itertools.count(), float(sys.argv[1])
time.perf_counter = lambda: next(ticks) * tick
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TICK = 1 / 64


def run_fake_clock(script, *args, tick=TICK):
    return run("-c", FAKE_CLOCK, str(tick), os.path.join(ROOT, script), *args)


def assert_one_line_error(proc, *fragments):
    """What a user sees for bad input: exit status 2, no traceback, one line `error: ...` on stderr that
    holds each fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def machine_of(stdout, results):
    """A benchmark's machine line (asserted to come once, before any result) and its JSON's machine figures."""
    lines = stdout.splitlines()
    machine = [i for i, ln in enumerate(lines) if ln.startswith("machine:")]
    assert len(machine) == 1, stdout
    first_result = min(i for i, ln in enumerate(lines) if any(u in ln for u in ("tokens/s", "tok/s", "ms/step", "MiB", "documents/s")))
    assert machine[0] < first_result, stdout
    m = results["machine"]
    assert m["line"] == lines[machine[0]]
    return m


def read_log(out_dir):
    """A run's log.jsonl, read here independently of nanoforge.runlog."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in read_log(out_dir) if "loss" in r}


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A character-level dataset folder (train.bin, val.bin, meta.json) prepared by the real prepare script
    from the first 200k characters of Tiny Shakespeare (180k train, 20k val)."""
    d = tmp_path_factory.mktemp("char_data")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        (d / "input.txt").write_text(f.read()[:200_000], encoding="utf-8")
    run("data/shakespeare_char/prepare.py", f"--input={d / 'input.txt'}", f"--out_dir={d}")
    return str(d)


@pytest.fixture(scope="session")
def sharded_char_data(char_data, tmp_path_factory):
    """char_data's splits written as shards of 8,000 tokens (train_000000.bin, ..., val_000000.bin, ...),
    the layout `prepare.py --shard_tokens` writes for corpora too big for one file."""
    import shutil

    import numpy as np

    from nanoforge import tokens
    d = tmp_path_factory.mktemp("sharded_char_data")
    meta = tokens.read_meta(char_data)
    for split in ("train", "val"):
        with tokens.ShardWriter(str(d), split, meta["vocab_size"], 8_000) as writer:
            writer.write(np.asarray(tokens.open_tokens(tokens.split_path(char_data, split))))
        assert len(writer.paths) > 1
    shutil.copy(os.path.join(char_data, "meta.json"), d)
    return str(d)


@pytest.fixture(scope="session")
def chrome():
    """Headless Chromium through selenium, logging the browser console and the DevTools network events, so
    a test can check a page's errors and every request it made. The browser is a test dependency, as
    .ci/run installs it (apt-get install chromium chromium-driver): a missing one fails, never skips."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    driver_path = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
    assert os.path.exists(binary) and os.path.exists(driver_path), \
        f"the page tests need {binary} and {driver_path}: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def open_page(chrome, path):
    """Opens a page file in the browser: it must fetch nothing and log no error or warning."""
    chrome.get_log("browser"), chrome.get_log("performance")  # start from empty logs
    chrome.get("file://" + os.path.abspath(path))
    requested = chrome.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    network = [json.loads(e["message"])["message"] for e in chrome.get_log("performance")]
    urls = [m["params"]["request"]["url"] for m in network if m["method"] == "Network.requestWillBeSent"]
    assert requested == [], f"the page fetched {requested}"
    assert all(u.startswith("file://") for u in urls), f"the page requested {urls}"
    errors = [e for e in chrome.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, errors
