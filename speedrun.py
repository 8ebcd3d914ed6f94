"""
From raw text to a chat model and its report card, in one command. Each stage is an ordinary command of
this repo, printed before it runs, so any one can be rerun by hand:

  curate -> tokenizer -> prepare -> pretrain -> evaluate -> chat_data -> finetune -> chat_eval -> export
  -> explain -> report

$ python speedrun.py                                  # TinyStories, then the shop's chat, in 30 minutes
$ python speedrun.py --input=my_texts/ --time=2h      # your corpus: files, folders, .jsonl, .parquet, a hub name
$ python speedrun.py --from=finetune                  # redo the fine-tune and every stage after it
$ python speedrun.py config/speedrun_mini.py          # the miniature recipe the tests run (about a minute)

Everything goes into run_dir: each stage's output folder, its log (logs/<stage>.log), stages.json (the
stages done, their commands and wall times) and the report card, report.md and report.html (one file,
offline). A rerun skips the stages done: Ctrl-C and rerun resumes (an interrupted pretraining continues
from its checkpoint). --time is the wall-clock budget of the whole run: the short stages take what they
take; pretraining gets pretrain_share of what they leave, and fine-tuning what is left when it starts.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from time import monotonic

from configurator import configure, knobs, overrides
from nanoforge import chat_template, errors, files, report_card, runlog, tasks
from nanoforge.corpus import is_hub, read_text, split_stories
from nanoforge.errors import UserError
from nanoforge.tokenizer import tokenizer_from_arg

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
run_dir = "speedrun"  # where every stage's output, the logs and the report card go
input = ""  # your corpus (comma-separated files, folders, a hub dataset); '' = TinyStories (see default_input)
chat_data = ""  # a folder with train.jsonl, val.jsonl, facts.jsonl; '' = the shop's chat, generated
time = "30m"  # the wall-clock budget ('900s', '30m', '1.5h'); '0' = no clock: the recipes' own iterations
from_stage = ""  # (or --from=STAGE) redo this stage and every one after it
until = ""  # stop after this stage
tokenizer = "bpe"  # 'bpe' (byte-level BPE) or 'unigram' (SentencePiece's model, over bytes: no GGUF export)
vocab_size = 2048  # the tokenizer's, special tokens included
curate_args = "--min_words=20 --val_fraction=0.05"  # for curate.py, after its defaults
pretrain_config = "config/train_shakespeare_char_cpu.py"  # the quick start's block, optimizer and clock
pretrain_args = "--eval_interval=100 --eval_iters=20 --log_interval=10 --keep_checkpoints=8 --max_epochs=4"  # train.py
finetune_config = "config/finetune_shop_chat.py"
finetune_args = "--block_size=256 --max_iters=600 --eval_interval=100"  # for finetune.py, after the config
evaluate_args = ""  # for evaluate.py on the held-out text
chat_data_args = ""  # for data/shop_chat/prepare.py
chat_eval_args = ""  # for evaluate.py on the chat questions
pretrain_share = 0.7  # of the time the short stages leave; fine-tuning gets the rest
prompt = "Once upon a time"  # the samples' and the explain page's
# -----------------------------------------------------------------------------------------------------
STAGES = ["curate", "tokenizer", "prepare", "pretrain", "evaluate", "chat_data", "finetune", "chat_eval", "export",
          "explain", "report"]
# the short stages' wall time on 2 cores with the default recipe (dev/LOG.md), for planning the budget
ESTIMATES = {"curate": 30, "tokenizer": 10, "prepare": 15, "evaluate": 25, "chat_data": 5, "chat_eval": 60,
             "export": 30, "explain": 25, "report": 5}
OVERHEAD = 0.85  # the share of a training stage's wall time its time_budget gets (startup, evaluations, saving)
MIN_BYTES_PER_VOCAB = 64  # a corpus smaller than this many bytes per token of the vocabulary is refused
HERE = os.path.dirname(os.path.abspath(__file__))

argv = ["--from_stage=" + a[len("--from="):] if a.startswith("--from=") else a for a in sys.argv[1:]]
defaults = knobs(globals())
config = configure(defaults, argv)
globals().update(config)
if tokenizer not in ("bpe", "unigram"):
    raise UserError(f"--tokenizer={tokenizer}: use bpe or unigram")
for key in ("from_stage", "until"):
    if config[key] and config[key] not in STAGES:
        raise UserError(f"--{key.replace('_stage', '')}={config[key]}: the stages are {', '.join(STAGES)}")


def seconds(text):
    """'90s', '30m', '1.5h' or a number of seconds -> seconds."""
    text = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        return float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise UserError(f"--time={text}: give seconds, minutes or hours, e.g. 900s, 30m, 1.5h (0: no clock)") from None


budget = seconds(time)
path = {name: os.path.join(run_dir, name) for name in ("input", "curated", "tokenizer", "data", "base", "chat_data",
                                                      "chat", "export", "logs")}
record_path = os.path.join(run_dir, "stages.json")

# -----------------------------------------------------------------------------------------------------
# the record of a run: settings and the stages done. A rerun with other settings (other than the clock and
# which stages to run) would mix two runs, so it is refused


def read_record():
    if not os.path.exists(record_path):
        return {"settings": {}, "stages": {}}
    with open(record_path) as f:
        return json.load(f)


def write_record():
    """stages.json, its stages in the order they ran (which files.write_json's sorted keys would lose)."""
    os.makedirs(run_dir, exist_ok=True)
    with files.atomic_path(record_path) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=2)


settings = {k: v for k, v in config.items() if k not in ("time", "from_stage", "until")}
record = read_record()
if from_stage:
    for name in STAGES[STAGES.index(from_stage):]:
        record["stages"].pop(name, None)
changed = sorted(k for k in settings if record["stages"] and record["settings"].get(k, settings[k]) != settings[k])
if changed:
    raise UserError(f"{run_dir} holds a run made with other settings ({', '.join(changed)}); pass --from={STAGES[0]} to "
                    f"redo it with these, or a new --run_dir")
record["settings"] = settings

# -----------------------------------------------------------------------------------------------------
# running one stage: its command printed, its output shown and kept in logs/<stage>.log


def run(stage, *command):
    """Runs a repo script in a child Python; a failure stops the run with the child's last line."""
    cmd = [sys.executable, *command]
    commands.append(shlex.join(["python", *command]))
    print(f"\n=== {stage}: {shlex.join(['python', *command])}", flush=True)
    os.makedirs(path["logs"], exist_ok=True)
    with open(os.path.join(path["logs"], f"{stage}.log"), "a") as log:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        last = ""
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                last = line.strip() or last
            proc.wait()
        except KeyboardInterrupt:  # the child got the Ctrl-C too: let it stop cleanly (train.py saves)
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    if proc.returncode:
        raise UserError(f"stage {stage} failed: {last} (whole output: {log.name})")


def estimate(stages):
    return sum(ESTIMATES.get(s, 0) for s in stages)


def allot(stage):
    """A training stage's time_budget: its share of what the clock has left, the later short stages set aside."""
    left = budget - spent() - estimate(STAGES[STAGES.index(stage) + 1:])
    share = pretrain_share if stage == "pretrain" else 1.0
    allotted = left * share * OVERHEAD
    if allotted < 10:
        raise UserError(f"--time={time} leaves {max(left, 0):.0f}s for {stage}; give more time (or --time=0: the "
                        f"recipes' iterations)")
    return allotted


def spent():
    """Wall time of the run so far: the stages done before this invocation, and this invocation's."""
    return sum(s["seconds"] for name, s in record["stages"].items() if name not in done_here) + monotonic() - t_start


# -----------------------------------------------------------------------------------------------------
# the stages


def default_input():
    """TinyStories as JSON lines, one story a record: data/tinystories/input.txt if you have it, else the
    sample beside the repo (../shared), else the hub's validation file (~19 MB, kept as that input.txt)."""
    local = os.path.join(HERE, "data", "tinystories", "input.txt")
    shared = os.path.normpath(os.path.join(HERE, "..", "shared", "data", "tinystories", "tinystories_valid_head.txt"))
    url = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt"
    text, _, source = read_text("", [local, shared], url, save_to=local)
    out = os.path.join(path["input"], "tinystories.jsonl")
    os.makedirs(path["input"], exist_ok=True)
    with files.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for story in split_stories(text):
            f.write(json.dumps({"text": story}) + "\n")
    print(f"TinyStories from {source} -> {out}")
    return out


def stage_curate():
    corpus = input or default_input()
    for part in corpus.split(","):
        if not is_hub(part) and not os.path.exists(part):
            raise UserError(f"--input: {part} not found; give files or folders of text, .jsonl or .parquet, or a "
                            f"hub dataset name")
    shutil.rmtree(path["curated"], ignore_errors=True)
    run("curate", "curate.py", "config/curate_web.py", f"--input={corpus}", f"--output={path['curated']}",
        "--id_field=", *shlex.split(curate_args))
    report = report_card.read_json(os.path.join(path["curated"], "report.json"))
    kept = report["summary"]["bytes_out"]
    if kept < MIN_BYTES_PER_VOCAB * vocab_size:
        raise UserError(f"stage curate: {kept:,} bytes of text are left after curation ({report['summary']['kept']:,}"
                        f" documents); a {vocab_size:,}-token vocabulary and a model need at least "
                        f"{MIN_BYTES_PER_VOCAB * vocab_size:,}: give more text (or a smaller --vocab_size)")


def stage_tokenizer():
    shutil.rmtree(path["tokenizer"], ignore_errors=True)
    run("tokenizer", "train_tokenizer.py", f"--input={path['curated']}", f"--kind={tokenizer}",
        f"--vocab_size={vocab_size}", f"--out={path['tokenizer']}", "--progress=False")
    got = tokenizer_from_arg(path["tokenizer"]).vocab_size
    if got < vocab_size:
        raise UserError(f"stage tokenizer: the corpus gave a vocabulary of {got:,} tokens, not the {vocab_size:,} "
                        f"asked: give more text or pass --vocab_size={got}")


def stage_prepare():
    shutil.rmtree(path["data"], ignore_errors=True)
    run("prepare", "data/your_text/prepare.py", f"--input={path['curated']}", f"--tokenizer={path['tokenizer']}",
        f"--out_dir={path['data']}")


def stage_pretrain():
    resume = os.path.exists(os.path.join(path["base"], "ckpt.pt"))  # an interrupted run goes on
    clock = [f"--time_budget={allot('pretrain'):.0f}"] if budget else []
    run("pretrain", "train.py", pretrain_config, f"--data_dir={path['data']}", f"--out_dir={path['base']}",
        *shlex.split(pretrain_args), *clock, *(["--init_from=resume"] if resume else []))


def stage_evaluate():
    run("evaluate", "evaluate.py", f"--out_dir={path['base']}", *shlex.split(evaluate_args))
    run("evaluate", "sample.py", f"--out_dir={path['base']}", f"--start={prompt}", "--num_samples=3",
        "--max_new_tokens=200", f"--samples_file={os.path.join(path['base'], 'samples.jsonl')}")


def check_chat_data():
    """Your chat data, checked before anything runs (not after an hour of pretraining): train.jsonl and
    val.jsonl of conversations, facts.jsonl of questions with the facts a right reply states."""
    for name in ("train.jsonl", "val.jsonl", "facts.jsonl"):
        if not os.path.isfile(os.path.join(chat_data, name)):
            raise UserError(f"stage chat_data: {chat_data} has no {name}; it needs train.jsonl and val.jsonl "
                            f"({{\"messages\": [...]}} a line) and facts.jsonl ({{\"messages\", \"expect\"}} a line)")
    for name in ("train.jsonl", "val.jsonl"):
        examples, problems = chat_template.read_examples(os.path.join(chat_data, name))
        if not examples:
            where = f"line {problems[0][0]}: {problems[0][1]}" if problems else "it is empty"
            raise UserError(f"stage chat_data: {chat_data}/{name} holds no conversation ({where}); a line is "
                            f"{{\"messages\": [{{\"role\": \"user\", \"content\": ...}}, {{\"role\": \"assistant\", ...}}]}}")
        if problems:
            print(chat_template.report(name, problems, len(examples), limit=3))
    try:
        tasks.load_chat_task(os.path.join(chat_data, "facts.jsonl"))
    except UserError as e:
        raise UserError(f"stage chat_data: {e}") from None


def stage_chat_data():
    if not chat_data:
        run("chat_data", "data/shop_chat/prepare.py", f"--out_dir={path['chat_data']}", *shlex.split(chat_data_args))
        return
    check_chat_data()
    os.makedirs(path["chat_data"], exist_ok=True)
    for name in ("train.jsonl", "val.jsonl", "facts.jsonl"):
        shutil.copy(os.path.join(chat_data, name), os.path.join(path["chat_data"], name))


def stage_finetune():
    shutil.rmtree(path["chat"], ignore_errors=True)  # a stopped fine-tune is rerun, not resumed
    clock = [f"--time_budget={allot('finetune'):.0f}"] if budget else []
    run("finetune", "finetune.py", finetune_config, f"--init_from={path['base']}", f"--out_dir={path['chat']}",
        f"--train_file={os.path.join(path['chat_data'], 'train.jsonl')}",
        f"--val_file={os.path.join(path['chat_data'], 'val.jsonl')}", *shlex.split(finetune_args), *clock)


def stage_chat_eval():
    run("chat_eval", "evaluate.py", f"--out_dir={path['chat']}", "--dataset=",
        f"--chat_task={os.path.join(path['chat_data'], 'facts.jsonl')}", *shlex.split(chat_eval_args))


def stage_export():
    shutil.rmtree(path["export"], ignore_errors=True)
    run("export", "export.py", f"--out_dir={path['chat']}", f"--dest={os.path.join(path['export'], 'hf')}")
    if tokenizer == "unigram":
        print("GGUF: not written (llama.cpp reads a byte-level BPE, not a byte-level Unigram)")
        return
    run("export", "export.py", f"--out_dir={path['chat']}", "--to=gguf", "--gguf_type=q8_0",
        f"--dest={os.path.join(path['export'], 'model.gguf')}")


def stage_explain():
    run("explain", "explain.py", f"--out_dir={path['base']}", f"--prompt={prompt}")


def stage_report():
    for run_out in (path["base"], path["chat"]):  # the loss curves as pictures, for report.md
        if os.path.exists(os.path.join(run_out, "log.jsonl")) and not os.path.exists(os.path.join(run_out, "loss.png")):
            runlog.plot_losses(run_out)
    card = report_card.build(run_dir, record)
    for name, text in (("report.md", report_card.markdown(card)), ("report.html", report_card.html(card))):
        with files.atomic_path(os.path.join(run_dir, name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"\nthe report card: {os.path.join(run_dir, 'report.md')} and {os.path.join(run_dir, 'report.html')}")


# -----------------------------------------------------------------------------------------------------
# the plan, then each stage not yet done

t_start, done_here = monotonic(), set()
todo = [s for s in STAGES if s not in record["stages"]]
todo = todo[:todo.index(until) + 1] if until in todo else ([] if until else todo)
print(f"speedrun in {run_dir}: {overrides(defaults, config) or 'the default recipe'}")
if record["stages"]:
    print(f"done before: {', '.join(record['stages'])} ({sum(s['seconds'] for s in record['stages'].values()):.0f}s)")
if budget and todo:
    short = estimate(todo)
    left = budget - sum(s["seconds"] for s in record["stages"].values()) - short
    plan = {"pretrain": left * pretrain_share, "finetune": left * (1 - pretrain_share)}
    print(f"plan for --time={time}: the short stages ~{short:.0f}s, " +
          ", ".join(f"{s} ~{plan[s]:.0f}s" for s in ("pretrain", "finetune") if s in todo))
if chat_data and "chat_data" in todo:
    check_chat_data()
stage = None
try:  # around the whole loop: a Ctrl-C just after a stage is recorded, before the next begins, is one too
    for stage in todo:
        t0, commands = monotonic(), []
        try:
            globals()["stage_" + stage]()
        except UserError:
            write_record()
            raise
        record["stages"][stage] = {"seconds": round(monotonic() - t0, 1), "commands": commands}
        done_here.add(stage)
        write_record()
except KeyboardInterrupt:
    write_record()
    when = f"after {stage}" if stage in record["stages"] else f"during {stage}"
    print(f"\nstopped {when}; rerun the same command to go on from there")
    sys.exit(130)
print(f"\nspeedrun: {', '.join(todo) or 'nothing to do'} done in {monotonic() - t_start:.0f}s "
      f"({sum(s['seconds'] for s in record['stages'].values()):.0f}s for the whole run)")
