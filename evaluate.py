"""
Scores a model on held-out text and multiple-choice tasks, or compares runs side by side.

Held-out loss, perplexity and bits per byte over the whole val split, beside the train loss (on as many
train tokens) and the gap between them; a table on stdout and a JSON record appended to out_dir/eval.jsonl:
$ python evaluate.py --out_dir=out-shakespeare-char-cpu
$ python evaluate.py --out_dir=out-shakespeare-char-cpu --max_tokens=20000       # the first 20k tokens only
$ python evaluate.py --init_from=gpt2 --dataset=shakespeare --out_dir=eval-gpt2  # a GPT-2 or a local HF folder

Multiple-choice tasks (HellaSwag from the hub or a .jsonl file; or your own prompt/choices/answer .jsonl):
$ python evaluate.py --init_from=gpt2 --task=hellaswag --out_dir=eval-gpt2
$ python evaluate.py --out_dir=out-x --task=my_questions.jsonl

Chat questions with known answers (a chat fine-tune's greedy replies, right when they state the facts):
$ python evaluate.py --out_dir=out-sft-shop --chat_task=data/shop_chat/facts.jsonl

Every rank of torchrun takes part, and the sums are reduced over them:
$ torchrun --standalone --nproc_per_node=2 evaluate.py --out_dir=out-shakespeare-char-cpu

Side by side (the latest eval.jsonl record of each run) and a plot of their learning curves:
$ python evaluate.py --compare out-a out-b out-c
"""
import datetime
import json
import os
import sys

import torch

from configurator import configure, knobs
from nanoforge import errors, files, hardware, parallel, runlog, tokens
from nanoforge.checkpoint import load_model
from nanoforge.corpus import jsonl_records
from nanoforge.errors import UserError
from nanoforge.evaluation import chat_questions, evaluate, generalisation, multiple_choice, run_data_dir, score_split
from nanoforge.quantize import decoding_weights
from nanoforge.tasks import load_chat_task, load_task
from nanoforge.tokenizer import load_tokenizer

errors.friendly_errors()

# -----------------------------------------------------------------------------------------------------
out_dir = "out"  # the run to score (init_from='resume'), and where eval.jsonl goes
init_from = "resume"  # 'resume' (out_dir's checkpoint), a checkpoint file, a GPT-2 name or a local HF folder
dataset = "auto"  # data/<dataset>; 'auto': the checkpoint's own; '' for tasks only
data_dir = ""  # if set, overrides data/<dataset>
split = "val"  # the held-out split
max_tokens = 0  # score only the first max_tokens tokens of the split; 0 = all of it
batch_size = 16  # windows per forward pass
block_size = 0  # window length; 0 = the model's context
gap_warning = 0.1  # warn when held-out loss exceeds train loss by more than this fraction of it
task = ""  # a multiple-choice task: a .jsonl file, 'hellaswag' (Rowan/hellaswag) or a hub dataset name
task_split = "validation"  # hub split of the task
max_examples = 0  # 0 = every question
chat_task = ""  # chat questions with known answers, scored by greedy reply: a .jsonl of {messages, expect} lines
max_new_tokens = 160  # chat_task: the longest reply
compare_plot = ""  # --compare writes its plot here; '' = compare.png inside the first run's folder
record = True  # append the result to out_dir/eval.jsonl
device = "auto"
dtype = "auto"
quantize = "none"  # 'bf16' or 'int8': the Linear layers' and head's weights in 2 or 1 bytes (nanoforge/quantize.py)
backend = "auto"
# -----------------------------------------------------------------------------------------------------
argv = sys.argv[1:]
runs = []
if argv and argv[0] == "--compare":  # --compare takes run folders, then optional --key=value
    runs = [a for a in argv[1:] if not a.startswith("--")]
    argv = [a for a in argv[1:] if a.startswith("--")]
    if not runs:
        raise UserError("--compare needs run folders: python evaluate.py --compare out-a out-b")
defaults = knobs(globals())
config = configure(defaults, argv)
globals().update(config)


def print_table(header, rows):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def fmt(value, spec=".4f"):
    return "-" if value is None else format(value, spec)


# -----------------------------------------------------------------------------------------------------
# --compare: the latest eval.jsonl record of each run, and their learning curves

if runs:
    latest, curves = [], []  # lists, not dicts: the same run may be listed twice
    for run in runs:
        path = os.path.join(run, "eval.jsonl")
        if not os.path.exists(path):
            raise UserError(f"{run} has no eval.jsonl; run: python evaluate.py --out_dir={run}")
        latest.append((run, [record for _, record in jsonl_records(path)][-1]))
        if evals := runlog.evaluations(runlog.read_log(run)):
            curves.append((run, [(r.get("train_time", r["iter"]), r["val_loss"]) for r in evals]))
    rows = []
    for run, r in latest:
        acc, chat = r.get("task", {}).get("acc_norm"), r.get("chat_task", {}).get("acc")
        rows.append([run, r.get("iter", "-"), fmt(r.get("train_time"), ".1f"), fmt(r.get("loss")), fmt(r.get("perplexity"), ".3f"),
                     fmt(r.get("bpb")), fmt(r.get("train_loss")), fmt(r.get("gap")), fmt(acc, ".3f"), fmt(chat, ".3f")])
    print_table(["run", "iter", "train s", f"{split} loss", "ppl", "bpb", "train loss", "gap", "acc_norm",
                 "chat acc"], rows)
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run, points in curves:
        ax1.plot(*zip(*points), "o-", ms=3, label=run)
    ax1.set(xlabel="seconds of training", ylabel="val loss (train.py's fixed set)", title="learning curves")
    scored = [(run, r["loss"]) for run, r in latest if r.get("loss") is not None]
    if scored:
        ax2.barh(range(len(scored)), [loss for _, loss in scored], tick_label=[run for run, _ in scored])
        ax2.set_xlim(min(loss for _, loss in scored) * 0.95, max(loss for _, loss in scored) * 1.01)
    ax2.set(xlabel="held-out loss (evaluate.py)", title="held-out loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    if curves:
        ax1.legend()
    fig.tight_layout()
    compare_plot = compare_plot or os.path.join(runs[0], "compare.png")  # with the runs, not wherever we are
    with files.atomic_path(compare_plot) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    print(f"plot: {compare_plot}")
    sys.exit(0)

# -----------------------------------------------------------------------------------------------------
# model, data, devices

device, _ = hardware.resolve_device(device)
ddp, rank, _, world_size, device = parallel.setup_distributed(backend, device)
master = rank == 0
log = print if master else (lambda *a, **k: None)

source = out_dir if init_from == "resume" else init_from
model, tok_spec, meta = load_model(source, map_location=device)
n_params = model.get_num_params()  # counted before int8: its weights are buffers, not parameters
model = decoding_weights(model.eval().to(device), quantize)
tok = load_tokenizer(tok_spec)
if tok.vocab_size > model.config.vocab_size:  # a token id past the embedding table would crash mid-run
    raise UserError(f"{source} has {model.config.vocab_size} token embeddings but its tokenizer ({tok_spec['kind']}) "
                    f"{tok.vocab_size} ids; it cannot be scored with this tokenizer")
block_size = block_size or model.config.block_size
if block_size > model.config.block_size:
    raise UserError(f"block_size={block_size} is longer than the model's context {model.config.block_size}")
# measured at this model's matmuls (a tiny model stays float32 on every machine); every rank takes rank 0's
dtype, _ = parallel.rank0_choice(hardware.resolve_dtype(dtype, device, (batch_size * block_size, model.config.n_embd)))
autocast_ctx = hardware.autocast(device, dtype)
if dataset == "auto":
    data_dir = data_dir or run_data_dir(meta)
    if data_dir and not os.path.exists(os.path.join(data_dir, "meta.json")) and (task or chat_task):
        data_dir = ""  # a chat fine-tune's data is conversations, not token files: score the tasks only
    if not data_dir and not (task or chat_task):
        raise UserError(f"{source} does not say which data it was trained on; pass --dataset or --data_dir")
elif dataset and not data_dir:
    data_dir = tokens.dataset_dir(dataset)
if not data_dir and not (task or chat_task):
    raise UserError("nothing to score: pass --dataset/--data_dir (held-out text), --task and/or --chat_task")
log(f"model: {source}, {n_params / 1e6:.2f}M parameters, context {model.config.block_size}; "
    f"device {device}, {dtype}, {world_size} process(es)")

result = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "source": source,
          "iter": meta.get("iter_num"), "world_size": world_size, "dtype": dtype}
if quantize != "none":  # the scores are the quantized model's, not the checkpoint's own
    result["quantize"] = quantize
if init_from == "resume" and (evals := runlog.evaluations(runlog.read_log(out_dir))):
    result["train_time"] = evals[-1].get("train_time")

# -----------------------------------------------------------------------------------------------------
# held-out text: the whole split, and as many tokens of the train split, spread over it

if data_dir:
    data_meta = tokens.read_meta(data_dir)
    if data_meta["tokenizer"] != tok_spec:
        raise UserError(f"{data_dir} was prepared with tokenizer {data_meta['tokenizer']['kind']} but {source} uses "
                        f"{tok_spec['kind']}; score it on data prepared with the model's tokenizer")
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.float64)
    held = score_split(model, data_dir, split, token_bytes, batch_size, device, autocast_ctx, block_size, max_tokens,
                       rank, world_size, progress=True)
    # train loss on as many windows, spread over the train split (which may be far larger)
    train_starts = tokens.eval_starts(tokens.split_length(data_dir, "train", block_size), block_size,
                                      held["tokens"] // block_size)
    train = evaluate(model, tokens.split_files(data_dir, "train"), train_starts, block_size, batch_size, token_bytes,
                     device, autocast_ctx, rank, world_size, progress="train")
    gap, memorising = generalisation(train["loss"], held["loss"], gap_warning)
    result.update(data_dir=data_dir, split=split, block_size=block_size, tokens=held["tokens"], loss=held["loss"],
                  perplexity=held["perplexity"], bpb=held["bpb"], train_loss=train["loss"], train_bpb=train["bpb"],
                  gap=gap, memorising=memorising)
    if master:
        print()
        if small := tokens.small_split_warning(held["tokens"], split, data_dir):
            print(small)
        print_table(["", "loss (nats/token)", "perplexity", "bits/byte", "tokens"],
                    [[f"{split} (held out)", fmt(held["loss"]), fmt(held["perplexity"], ".3f"), fmt(held["bpb"]),
                      f"{held['tokens']:,}"],
                     ["train (as many tokens)", fmt(train["loss"]), fmt(train["perplexity"], ".3f"),
                      fmt(train["bpb"]), f"{train['tokens']:,}"],
                     ["gap (held out - train)", fmt(gap), "", "", ""]])
    if memorising:
        log(f"warning: held-out loss is {gap:.3f} above train loss ({gap / held['loss']:.0%} of it, over the "
            f"{gap_warning:.0%} gap_warning): the model is memorising its training text. More data, more "
            f"dropout or weight decay, a smaller model or fewer iterations would help")

# -----------------------------------------------------------------------------------------------------
# multiple-choice task

if task:
    examples = load_task(task, task_split, max_examples)
    try:
        scores = multiple_choice(model, examples, tok, device, autocast_ctx, rank, world_size, progress=True)
    except ValueError as e:
        raise UserError(f"task {task}: {e}") from None
    result["task"] = dict(scores, name=task)
    log("")
    if master:
        print_table(["task " + os.path.basename(task), "accuracy", "95% interval", "questions"],
                    [["summed log-likelihood", f"{scores['acc']:.4f}", "{:.3f}-{:.3f}".format(*scores["acc_ci"]), scores["n"]],
                     ["per-token (length-norm.)", f"{scores['acc_norm']:.4f}",
                      "{:.3f}-{:.3f}".format(*scores["acc_norm_ci"]), scores["n"]]])

# -----------------------------------------------------------------------------------------------------
# chat questions with known answers, by greedy reply

if chat_task and master:  # one process: a few hundred short greedy replies
    questions = load_chat_task(chat_task, max_examples)
    try:
        scores = chat_questions(model, tok, questions, device, dtype, max_new_tokens)
    except UserError as e:  # e.g. a model without chat tokens, or a character a char model lacks
        raise UserError(f"chat task {chat_task}: {e}") from None
    wrong = [r for r in scores["results"] if not r["right"]]
    for r in wrong[:5]:
        print(f"wrong: {r['question']!r} -> {r['reply']!r} (expected {' and '.join(map(repr, r['expect']))})")
    print_table(["chat task " + os.path.basename(chat_task), "accuracy", "95% interval", "questions"],
                [["greedy reply states the facts", f"{scores['acc']:.4f}", "{:.3f}-{:.3f}".format(*scores["acc_ci"]),
                  scores["n"]]])
    result["chat_task"] = dict(name=chat_task, n=scores["n"], correct=scores["correct"], acc=scores["acc"],
                               acc_ci=scores["acc_ci"], wrong=wrong, first=scores["results"][:5])

# -----------------------------------------------------------------------------------------------------
# the record: eval.jsonl gets one more line, written beside it and renamed into place

if master and record:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "eval.jsonl")
    old = open(path).read() if os.path.exists(path) else ""
    with files.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(old + json.dumps(result) + "\n")
    log(f"\nrecorded in {path}")
if ddp:
    torch.distributed.destroy_process_group()
