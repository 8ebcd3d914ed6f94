"""
speedrun.py as a user runs it: the miniature recipe from raw TinyStories (../shared's sample) to a chat model
and its report card, stopped by Ctrl-C after pretraining and rerun; the card's numbers against the stages'
own outputs; the HTML card in a real browser; each bad input stopped at its stage in one line.
"""
import hashlib
import html
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, open_page, run

MINI = "config/speedrun_mini.py"


def speedrun(run_dir, *args, check=True, timeout=600):
    return run("speedrun.py", MINI, f"--run_dir={run_dir}", *args, check=check, timeout=timeout)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stages(run_dir):
    with open(os.path.join(run_dir, "stages.json")) as f:
        return json.load(f)["stages"]


def signal_masks(pid):
    """The signals process pid blocks, ignores and catches (/proc's hex masks; SIGINT is 0x2)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return ", ".join(ln.strip() for ln in f if ln.startswith(("SigBlk", "SigIgn", "SigCgt")))
    except OSError:
        return "its masks unreadable"


def last_json_line(path):
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A miniature speedrun interrupted (SIGINT to its process group, as Ctrl-C does) once pretraining is
    recorded as done, then rerun to the end. Returns (run_dir, the rerun's output, digests taken at the stop)."""
    run_dir = str(tmp_path_factory.mktemp("speedrun") / "run")
    # Ctrl-C reaches a terminal's foreground job. A suite started in the background by a script (`... &`)
    # inherits SIGINT ignored, and so would the run: with a handler here, the run starts with SIGINT's default
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "speedrun.py"), MINI, f"--run_dir={run_dir}"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline, sent = time.monotonic() + 600, None
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(os.path.join(run_dir, "stages.json")) and "pretrain" in stages(run_dir):
            sent = signal_masks(proc.pid)  # for a failure's message
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, f"SIGINT {'sent, ' + sent if sent else 'never sent'}\n{out[-3000:]}"
    assert "rerun the same command to go on" in out
    done_first = list(stages(run_dir))
    assert done_first[:4] == ["curate", "tokenizer", "prepare", "pretrain"] and "report" not in done_first
    kept = {p: digest(os.path.join(run_dir, p)) for p in ("curated/report.json", "tokenizer/ranks.tiktoken",
                                                          "data/train.bin", "base/ckpt.pt")}
    rerun = speedrun(run_dir)
    return run_dir, rerun.stdout, kept, done_first


@pytest.mark.slow
def test_rerun_after_ctrl_c_skips_what_was_done_and_finishes(finished):
    run_dir, out, kept, done_first = finished
    assert f"done before: {', '.join(done_first)}" in out
    for stage in done_first:  # no stage done before the stop ran again
        assert f"=== {stage}:" not in out, stage
    for path, sha in kept.items():  # and its outputs are the ones the first run wrote
        assert digest(os.path.join(run_dir, path)) == sha, path
    assert list(stages(run_dir)) == ["curate", "tokenizer", "prepare", "pretrain", "evaluate", "chat_data", "finetune",
                                     "chat_eval", "export", "explain", "report"]
    for stage, rec in stages(run_dir).items():  # each command is recorded, so a stage can be rerun by hand
        assert rec["seconds"] >= 0 and (rec["commands"] or stage == "report"), stage
    for path in ("report.md", "report.html", "export/hf/config.json", "export/model.gguf", "export/model.Modelfile",
                 "base/explain/index.html", "chat/ckpt.pt", "base/loss.png", "chat/loss.png"):
        assert os.path.exists(os.path.join(run_dir, path)), path


@pytest.mark.slow
def test_report_card_numbers_are_the_stages_own(finished):
    run_dir, _, _, _ = finished
    md = open(os.path.join(run_dir, "report.md"), encoding="utf-8").read()
    page = open(os.path.join(run_dir, "report.html"), encoding="utf-8").read()
    at = lambda *p: os.path.join(run_dir, *p)  # noqa: E731
    curated = json.load(open(at("curated", "report.json")))["summary"]
    tok = json.load(open(at("tokenizer", "report.json")))
    meta = json.load(open(at("data", "meta.json")))
    held = last_json_line(at("base", "eval.jsonl"))
    chat = last_json_line(at("chat", "eval.jsonl"))["chat_task"]
    check = json.load(open(at("export", "hf", "nanoforge_check.json")))
    base_log = [json.loads(line) for line in open(at("base", "log.jsonl"))]
    samples = [json.loads(line) for line in open(at("base", "samples.jsonl"))]
    expected = [f"{curated['documents_in']:,} -> {curated['kept']:,}", f"{curated['bytes_in']:,} -> {curated['bytes_out']:,}",
                f"{tok['bytes_per_token']:.3f}", f"{tok['gpt2_bytes_per_token']:.3f}", f"{meta['train_tokens']:,}",
                f"{held['loss']:.4f} nats/token", f"{held['bpb']:.4f}", f"{held['train_loss']:.4f}",
                f"{[r for r in base_log if 'val_loss' in r][-1]['val_loss']:.4f}",
                f"{chat['correct']} of {chat['n']}: {chat['acc']:.1%}", f"{check['max_logit_diff']:.1e}",
                f"{check['greedy_equal']} of {check['greedy_tokens']} greedy tokens equal", check["class"]]
    for text in expected:
        assert text in md, text
        assert html.escape(text) in page, text
    for stage, rec in stages(run_dir).items():
        if stage != "report":  # the card is written during its own stage
            assert f"| {stage} | {rec['seconds']:.0f} s |" in md, stage
    assert len(samples) == 3
    for s in samples:  # each sample, as the card quotes it (one line)
        assert "> " + (s["prompt"] + s["text"]).replace("\n", " ") in md
    for key in ("curate", "tokenizer", "prepare", "pretrain", "evaluate", "chat_data", "finetune", "chat_eval",
                "export", "explain", "machine"):
        assert f'<section id="{key}">' in page, key
    assert check["max_logit_diff"] < 1e-4 and check["same_prompt_ids"]  # the exported folder computes our model
    # each training's last held-out loss, read back from the card, is the log's to 2-3 digits, however small
    # (a fine-tune on templated replies ends near 2e-7, which four decimals printed as 0.0000)
    shown = [float(v) for v in re.findall(r"\| held-out loss at the end \| (\S+) \|", md)]
    logged = [[json.loads(line) for line in open(at(d, "log.jsonl"))] for d in ("base", "chat")]
    logged = [[r for r in log if "val_loss" in r][-1]["val_loss"] for log in logged]
    assert len(shown) == 2 and all(s == pytest.approx(v, rel=5e-3) for s, v in zip(shown, logged)), (shown, logged)


@pytest.mark.slow
def test_report_card_opens_offline_in_a_browser(finished, chrome):
    from selenium.webdriver.common.by import By
    run_dir = finished[0]
    open_page(chrome, os.path.join(run_dir, "report.html"))  # no request, no console error
    for section in chrome.find_elements(By.TAG_NAME, "section"):
        assert section.is_displayed() and section.size["height"] > 40
    assert len(chrome.find_elements(By.CSS_SELECTOR, "svg polyline")) == 4  # train and held-out, twice


@pytest.mark.slow
def test_from_redoes_a_stage_and_the_ones_after(finished):
    run_dir = finished[0]
    before = {p: os.path.getmtime(os.path.join(run_dir, p)) for p in ("report.md", "base/ckpt.pt", "chat/ckpt.pt")}
    time.sleep(0.05)
    out = speedrun(run_dir, "--from=report").stdout
    assert "=== " not in out  # the report stage runs no script; none of the others ran
    after = {p: os.path.getmtime(os.path.join(run_dir, p)) for p in before}
    assert after["report.md"] > before["report.md"]
    assert after["base/ckpt.pt"] == before["base/ckpt.pt"] and after["chat/ckpt.pt"] == before["chat/ckpt.pt"]
    refused = speedrun(run_dir, "--vocab_size=512", check=False)  # another recipe in the same folder: refused
    assert refused.returncode == 2 and "vocab_size" in refused.stderr and "--from=curate" in refused.stderr


# -----------------------------------------------------------------------------------------------------
# bad input: one line, at the stage that needs it, before the expensive ones


def one_line_error(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_chat_data_in_the_wrong_shape_is_refused_before_anything_runs(tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    (chat / "train.jsonl").write_text('{"question": "hi", "answer": "hello"}\n')
    (chat / "val.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    (chat / "facts.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}], "expect": ["hello"]}\n')
    line = one_line_error(speedrun(str(tmp_path / "run"), f"--chat_data={chat}", check=False))
    assert line.startswith("error: stage chat_data:") and "train.jsonl" in line and "messages" in line
    assert not os.path.exists(tmp_path / "run" / "curated")  # stopped before curation, not after pretraining
    (chat / "train.jsonl").write_text((chat / "val.jsonl").read_text())
    (chat / "facts.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    line = one_line_error(speedrun(str(tmp_path / "run2"), f"--chat_data={chat}", check=False))
    assert line.startswith("error: stage chat_data:") and "expect" in line


def test_ctrl_c_just_after_a_stage_is_recorded_still_says_how_to_go_on(tmp_path):
    """Ctrl-C in the moment between stages (stages.json written, the next stage not begun) stops with the same
    hint and record as one during a stage: it had exited 130 in silence (a loaded machine's CI caught it). The
    interrupt is made to land exactly there: os.replace raises it right after stages.json first holds a stage."""
    corpus = tmp_path / "stories.jsonl"  # a small corpus: curation is all that runs, quickly
    corpus.write_text("".join(json.dumps({"text": f"Story {i}. The cat sat on the mat and saw a dog number {i}. "
                                                   f"Then the dog ran to the park, where {i % 7} birds sang in a tall "
                                                   f"tree, and the cat went home for supper."}) + "\n"
                              for i in range(300)))
    wrapper = tmp_path / "interrupted.py"
    wrapper.write_text(f"""import json, os, runpy, sys
real = os.replace
def replace(src, dst):
    real(src, dst)
    if dst.endswith("stages.json") and json.load(open(dst))["stages"] and not getattr(replace, "done", False):
        replace.done = True
        raise KeyboardInterrupt
os.replace = replace
sys.argv = [{os.path.join(ROOT, "speedrun.py")!r}, {MINI!r}, {"--run_dir=" + str(tmp_path / "run")!r},
            {"--input=" + str(corpus)!r}]
runpy.run_path(sys.argv[0], run_name="__main__")
""")
    proc = subprocess.run([sys.executable, str(wrapper)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stopped after curate; rerun the same command to go on from there" in proc.stdout, proc.stdout[-2000:]
    assert "=== tokenizer" not in proc.stdout and list(stages(tmp_path / "run")) == ["curate"]


def test_missing_or_empty_corpus_stops_at_curation(tmp_path):
    line = one_line_error(speedrun(str(tmp_path / "run"), f"--input={tmp_path / 'nowhere'}", check=False))
    assert "nowhere not found" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    line = one_line_error(speedrun(str(tmp_path / "run2"), f"--input={empty}", check=False))
    assert line.startswith("error: stage curate failed:"), line
    assert list(stages(tmp_path / "run2")) == []


@pytest.mark.slow
def test_corpus_too_small_for_the_model_or_the_vocabulary(tmp_path):
    # a thousand short stories made of 30 words: enough bytes for 2,000 tokens, too few distinct words to
    # give 2,000 tokens of BPE
    import random
    words = ("the cat dog sat ran saw a big red small happy sad girl boy tree ball sun day and "
             "then she he was to home park play fun went with").split()
    r = random.Random(0)
    stories = [" ".join(" ".join(r.choice(words) for _ in range(9)).capitalize() + "." for _ in range(5))
               for _ in range(1000)]
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in stories))
    line = one_line_error(speedrun(str(tmp_path / "vocab"), f"--input={corpus}", "--vocab_size=2000", check=False))
    assert line.startswith("error: stage tokenizer:") and "--vocab_size=" in line, line
    assert list(stages(tmp_path / "vocab")) == ["curate"]
    line = one_line_error(speedrun(str(tmp_path / "tiny"), f"--input={corpus}", "--vocab_size=4096", check=False))
    assert line.startswith("error: stage curate:") and "bytes of text are left" in line, line
