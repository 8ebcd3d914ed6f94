"""
Shared test setup: the library modules are flat top-level files, so the repo root goes on sys.path.
Tests never touch the network: tiktoken reads GPT-2's BPE from the shared cache beside the repo, and
Hugging Face is told to stay offline (its GPT-2s are built randomly and saved to tmp_path instead).
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(ROOT, "..", "shared", "assets", "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny test models gain nothing from threads, and spinning OpenMP threads on a busy 2-core machine
# (or two DDP ranks on it) slow each step by orders of magnitude; subprocesses inherit this
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def small_char_data(tmp_path_factory):
    """A character-level dataset folder (train.bin, val.bin, meta.json) prepared by the real prepare script
    from the first 100k characters of Tiny Shakespeare (90k train, 10k val)."""
    import subprocess
    d = tmp_path_factory.mktemp("small_char_data")
    with open(os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        (d / "input.txt").write_text(f.read()[:100_000], encoding="utf-8")
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "shakespeare_char", "prepare.py"),
                    f"--input={d / 'input.txt'}", f"--out_dir={d}"], check=True, capture_output=True)
    return str(d)


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by selenium, shared by the tests of web pages; it keeps the console log
    (driver.get_log("browser")) so a test can check a page ran without errors. Skips where Chromium or
    its driver is not installed."""
    import shutil
    if not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")) or not os.path.exists("/usr/bin/chromedriver"):
        pytest.skip("needs chromium and chromium-driver (apt install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    yield driver
    driver.quit()
