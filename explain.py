"""
Looks inside a model on one prompt and writes what it sees as one page you open in a browser:
out_dir/explain/index.html (self-contained: data and script inline, nothing fetched, works offline) and
out_dir/explain/explain.json (every number behind the page).

$ python explain.py --out_dir=out-tinystories-cpu --prompt="the girl gave her dog a treat"
$ python explain.py --init_from=gpt2 --prompt="Hello world" --out=explain-gpt2
$ python explain.py --init_from=path/to/hf_gpt2_folder --prompt=FILE:prompt.txt --text=FILE:heldout.txt
$ python explain.py --out_dir=out-tinystories-cpu --screenshots=docs/tour   # also a PNG of each view

Views: tokens, embeddings, attention, logit lens, the next token, surprise (per-token loss on held-out
text: --text, else the run's val split), as it learned (the checkpoints train.py --keep_checkpoints=N
kept, beside the loss curve), the parameter budget. The computations are in nanoforge/inspection.py; the page
is nanoforge/pages/explain.html with the data put in.
"""
import json
import os
import sys
import time

import torch

from configurator import configure, knobs
from nanoforge import errors, files, inspection
from nanoforge.checkpoint import kept_checkpoints, load_model
from nanoforge.errors import UserError
from nanoforge.evaluation import run_data_dir
from nanoforge.files import atomic_path
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
init_from = "resume"  # 'resume' (the checkpoint in out_dir), a GPT-2 name, a HF folder or a checkpoint file
out_dir = "out"  # the run: its checkpoint (init_from='resume'), log.jsonl, checkpoints/ and data
out = ""  # where explain/ goes; default: out_dir/explain (init_from='resume'), else ./explain
prompt = "Once upon a time, there was a little girl"  # or "FILE:prompt.txt"
text = ""  # held-out text for the surprise view (or "FILE:x.txt"); default: the run's val split
surprise_tokens = 256  # tokens of held-out text scored (at most the model's block_size + 1)
n_near = 10  # nearest tokens listed per prompt token
n_points = 600  # tokens on the embedding map (the most frequent in the training data, when counted)
max_snapshots = 8  # kept checkpoints shown in "as it learned" (evenly spread over those found)
screenshots = ""  # a folder: also save a PNG of each view there (needs selenium and chromium)
seed = 1337
# -----------------------------------------------------------------------------------------------------
defaults = knobs(globals())
globals().update(configure(defaults, sys.argv[1:]))


t0 = time.time()
torch.manual_seed(seed)
source = out_dir if init_from == "resume" else init_from
model, tok_spec, meta = load_model(source, map_location="cpu")
model.eval()
tok = load_tokenizer(tok_spec)
cfg = model.config
out = out or os.path.join(out_dir if init_from == "resume" else ".", "explain")
prompt = files.text_arg(prompt, "prompt")
ids = tok.encode(prompt)
if not ids:
    raise UserError("the prompt is empty: pass --prompt=\"some text\"")
if len(ids) > cfg.block_size:
    raise UserError(f"the prompt is {len(ids)} tokens; this model reads at most {cfg.block_size}: shorten it")
run_dir = out_dir if init_from == "resume" else ""
data_dir = run_data_dir(meta)
if data_dir and not os.path.isabs(data_dir) and not os.path.isdir(data_dir):
    data_dir = os.path.join(files.REPO, data_dir)

# -----------------------------------------------------------------------------------------------------
# the views

counts, counted = inspection.train_counts(data_dir, tok.vocab_size)
logits, resid, att = inspection.trace_prompt(model, ids)
views = {
    "tokens": inspection.tokens_view(tok, ids, counts, counted),
    "embeddings": inspection.embeddings_view(model, tok, ids, counts, n_near, n_points),
    "attention": inspection.attention_view(att),
    "lens": inspection.logit_lens_view(model, tok, resid),
    "next": inspection.next_token_view(tok, logits[-1]),
}
n = min(surprise_tokens, cfg.block_size) + 1
if text:
    held, where = tok.encode(files.text_arg(text, "text"))[:n], "--text"
else:
    held, where = inspection.val_ids(data_dir, n), f"the val split of {data_dir}"
if not held or len(held) < 2:
    held, where = ids, "the prompt (no held-out text found: pass --text)"
views["surprise"] = inspection.surprise_view(model, tok, held, where) if len(held) >= 2 else None
views["budget"] = inspection.budget_view(model)

kept = kept_checkpoints(run_dir) if run_dir else []
if len(kept) > max_snapshots:  # evenly spread, the first and the last always in
    kept = [kept[round(i * (len(kept) - 1) / (max_snapshots - 1))] for i in range(max_snapshots)]
snapshots = []
for iter_num, path in kept:
    m, _, m_meta = load_model(path)
    snapshots.append(inspection.snapshot_view(m.eval(), tok, ids, iter_num, m_meta.get("val_loss")))
views["learned"] = {"snapshots": snapshots, "curve": inspection.loss_curve(run_dir)}

header = {"source": source, "prompt": prompt, "iter_num": meta.get("iter_num"), "n_params": model.get_num_params(),
          "seconds": None}

# -----------------------------------------------------------------------------------------------------
# write: the JSON, then the page with the data inline; each written beside its place and renamed in

os.makedirs(out, exist_ok=True)
header["seconds"] = round(time.time() - t0, 2)
data = dict(header, views=views)
try:  # compact: GPT-2's attention alone is 590k numbers
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
except ValueError:  # nan or inf, which JSON (and the page) cannot hold
    raise UserError(f"the model in {source} computes nan or inf on this prompt: its weights are not finite "
                    f"(a diverged run?); explain an earlier checkpoint") from None
with atomic_path(os.path.join(out, "explain.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(blob)
with open(os.path.join(files.REPO, "nanoforge", "pages", "explain.html"), encoding="utf-8") as f:
    page = f.read()
# inside <script> only "</" could end the element early; "<\/" reads the same to JSON.parse
blob = blob.replace("</", "<\\/")
page_path = os.path.join(out, "index.html")
with atomic_path(page_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(page.replace("/*DATA*/{}", blob, 1))
print(f"{len(ids)} tokens, {cfg.n_layer} layers x {cfg.n_head} heads, {len(snapshots)} snapshots: "
      f"{page_path} (and explain.json) in {time.time() - t0:.1f} s")

# -----------------------------------------------------------------------------------------------------
# screenshots: each view as the browser draws it, for docs/TOUR.md

if screenshots:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
    except ImportError:
        raise UserError("--screenshots needs selenium (pip install selenium) and chromium with chromedriver") from None
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1600",
                "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=options)
    try:
        driver.get("file://" + os.path.abspath(page_path))
        os.makedirs(screenshots, exist_ok=True)
        for section in driver.find_elements(By.CSS_SELECTOR, "section[id]"):
            if section.is_displayed():
                driver.execute_script("arguments[0].scrollIntoView()", section)
                with atomic_path(os.path.join(screenshots, f"{section.get_attribute('id')}.png")) as tmp, open(tmp, "wb") as f:
                    f.write(section.screenshot_as_png)
        driver.set_window_size(1100, 700)
        driver.execute_script("window.scrollTo(0, 0)")
        with atomic_path(os.path.join(screenshots, "page.png")) as tmp, open(tmp, "wb") as f:
            f.write(driver.get_screenshot_as_png())
    finally:
        driver.quit()
    print(f"screenshots of each view in {screenshots}")
