"""
What train.py and finetune.py share around their loops: the start-up lines, fitting a loaded model's
context and vocabulary, the check that a step's loss is finite, and setting the learning rate.
"""
import math
import signal

import torch
from torch import nn

from nanoforge import hardware, runlog
from nanoforge.errors import UserError


def startup_lines(log, device, device_why, dtype, dtype_why, changed, save_memory):
    """The lines a run starts with: the device and precision with the reason for each, how freed memory is
    treated (hardware.malloc_policy), and what the config files and --key=value arguments changed (the
    script's configurator.overrides)."""
    log(f"device: {device} ({device_why}); dtype: {dtype} ({dtype_why})")
    if kept := hardware.malloc_policy(device, save_memory=save_memory):
        log(kept)
    log("overrides: " + (", ".join(f"{k}={v!r}" for k, v in changed.items()) if changed else "none"))


# what a resumed run may not change: the batches each step draws, the model's shape, the optimizer's state (the
# data may move: dataset and data_dir may change, and a vocabulary that differs is refused by the checkpoint)
CONTINUATION_KEYS = ("batch_size", "gradient_accumulation_steps", "total_batch_size", "seed",
                     "optimizer_name", "n_layer", "n_head", "n_embd", "block_size", "bias", "pos_emb", "norm", "mlp",
                     "qk_norm", "tie_embeddings", "zero_init", "logit_softcap")


def resume_config(config, given, out_dir):
    """The config of a resumed run: the run's own, as its run.json recorded it, with the knobs given on this
    command line on top, so `--init_from=resume --out_dir=X` alone goes on where X stopped. Returns (config, a
    line naming what the command changes, or None); a change that would not continue the run exactly is refused."""
    try:
        saved = runlog.read_run_json(out_dir)["config"]
    except FileNotFoundError:
        return config, None  # no run there: the checkpoint check that follows says so
    except (OSError, ValueError, KeyError):
        raise UserError(f"--init_from=resume: {out_dir}/run.json is unreadable, so the run's settings are unknown; "
                        f"give its config file and --key=value arguments as it was started") from None
    changed = {k: config[k] for k in sorted(given) if k != "init_from" and k in saved and saved[k] != config[k]}
    for key in changed:
        if key in CONTINUATION_KEYS:
            raise UserError(f"--init_from=resume: {key}={saved[key]!r} there, {config[key]!r} here: the run in "
                            f"{out_dir} would not continue as it was; drop --{key}, or start a new run in another "
                            f"--out_dir")
    resumed = {**config, **{k: v for k, v in saved.items() if k in config and k not in given}, "init_from": "resume"}
    line = ("resume: the run's settings, except " + ", ".join(f"{k}={v!r} (was {saved[k]!r})" for k, v in changed.items())
            if changed else None)
    return resumed, line


def fit_context(model, block_size, source, log=print):
    """Fits a loaded model's context to block_size: cropped (its position table and masks), or, for a
    rotary model, lengthened, said in one line (it learns the longer distances as it trains at them). A
    learned position table cannot grow: a longer block_size is then an error, not a silent extrapolation."""
    if block_size > model.config.block_size and model.config.pos_emb == "rope":
        log(f"context: {source} was trained on {model.config.block_size} tokens; training at {block_size} "
            f"(rotary positions have no table to grow)")
        model.set_block_size(block_size)
    elif block_size > model.config.block_size:
        raise UserError(f"block_size={block_size} is longer than {source}'s context {model.config.block_size} "
                        f"(learned positions: there are no rows for the rest); use block_size <= "
                        f"{model.config.block_size}, or a base trained longer or with pos_emb=rope")
    elif block_size < model.config.block_size:
        model.set_block_size(block_size)


def grow_vocab(model, vocab_size):
    """Grows the token embedding (and the output layer, tied or not) to vocab_size rows, for special tokens
    a fine-tuning adds. New rows start at the mean of the old ones: their logits start near the average,
    neither dominating the softmax nor far below it, and fine-tuning moves them from there."""
    def grown(old):  # (V_old, C) -> (V, C)
        assert vocab_size >= old.size(0)
        return nn.Parameter(torch.cat([old.data, old.data.mean(0, keepdim=True).expand(vocab_size - old.size(0), -1)]))
    model.transformer.wte.weight = grown(model.transformer.wte.weight)
    model.lm_head.weight = model.transformer.wte.weight if model.config.tie_embeddings else grown(model.lm_head.weight)
    model.transformer.wte.num_embeddings = model.lm_head.out_features = vocab_size
    model.config.vocab_size = vocab_size


def check_finite(loss, iter_num, out_dir):
    """A step whose loss is inf or nan stops the run before it saves anything: the last good checkpoint stays."""
    if not math.isfinite(loss):
        raise UserError(f"loss is {loss} at iteration {iter_num}; stopped without saving, so {out_dir} keeps the "
                        f"last good checkpoint. Lower learning_rate, raise warmup_iters, or check grad_clip")


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def check_heads(n_embd, n_head, pos_emb):
    """n_embd must split into n_head heads of equal size (an even size for rotary positions); the error
    suggests the nearest head count that fits."""
    if n_embd % n_head or (pos_emb == "rope" and (n_embd // n_head) % 2):
        raise UserError(f"n_embd={n_embd} must split into n_head={n_head} heads of equal size"
                        + (" (an even size, for rope)" if n_embd % n_head == 0 else "")
                        + f"; try --n_head={next(h for h in range(min(n_head, n_embd), 0, -1) if n_embd % h == 0)}")


def accumulation_steps(steps, total_batch_size, batch_size, block_size, world_size):
    """Micro-steps per optimizer step over all ranks, and per rank: `steps`, or as many as make
    total_batch_size tokens when that is set (> 0)."""
    if total_batch_size > 0:
        micro_tokens = batch_size * block_size
        if total_batch_size % micro_tokens:
            raise UserError(f"total_batch_size={total_batch_size} is not a multiple of batch_size * block_size = "
                            f"{micro_tokens}; change one of them")
        steps = total_batch_size // micro_tokens
    if steps % world_size:
        raise UserError(f"gradient_accumulation_steps={steps} does not split over {world_size} processes; make it "
                        f"a multiple of {world_size}")
    return steps, steps // world_size


EVAL_SHARE = 1 / 3  # the most of a run's compute its fixed-set evaluations may take


def eval_windows(eval_iters, batch_size, block_size, eval_interval, planned_iters, tokens_per_iter):
    """How many windows of each split the fixed evaluation set holds: eval_iters * batch_size, or fewer
    (whole batches) where the run's evaluations would otherwise cost more than EVAL_SHARE of its compute:
    a short run on a big vocabulary can spend more on scoring than on learning. The evaluations of a run
    of planned_iters: one at the start, one every eval_interval iterations, one at the end, of both splits;
    each token scored costs a forward pass, a third of a training token's forward and backward.
    Returns (windows, a line for the log saying the share)."""
    evals = planned_iters // eval_interval + 2
    train = 3 * planned_iters * tokens_per_iter  # in forward passes of one token

    def share(windows):
        scored = evals * 2 * windows * block_size
        return scored / (train + scored)

    windows = asked = eval_iters * batch_size
    if share(windows) > EVAL_SHARE:  # scored <= share / (1 - share) * train
        most = EVAL_SHARE / (1 - EVAL_SHARE) * train / (evals * 2 * block_size)
        windows = max(1, int(most) // batch_size) * batch_size
    capped = ""
    if windows < asked and share(windows) <= EVAL_SHARE:
        capped = f" (eval_iters={eval_iters} capped to {windows // batch_size}: at most {EVAL_SHARE:.0%})"
    elif windows < asked:  # even one batch is more than the share: say so, never "at most" beside a bigger figure
        capped = (f" (eval_iters={eval_iters} capped to 1, the fewest, still over the {EVAL_SHARE:.0%} aimed at: "
                  f"raise eval_interval, or train longer)")
    return windows, (f"evaluation: {windows:,} fixed windows of each split, ~{share(windows):.0%} of the run's "
                     f"compute{capped}")


class Stopped(Exception):
    """Raised inside an evaluation when a stop is asked for: the evaluation is dropped, the training is kept."""


class StopSignals:
    """Ctrl-C and SIGTERM ask a run to stop (`requested`): a training step is finished first, an evaluation
    (which on a big set could run for minutes) is dropped at once by raising Stopped where `in_eval` is set;
    either way the loop then saves the model as of its last finished step. Under torchrun all ranks agree
    through the loop's all-reduce, and an evaluation there runs to its end (a rank that left it would leave the
    others waiting in its all-reduce). Asked a second time, it stops at once, saying what out_dir holds:
    `saved_iter`, the iteration of the last checkpoint written or found (None: no checkpoint)."""

    def __init__(self, log, out_dir, saved_iter=None, interrupt_evaluations=True):
        self.requested, self.in_eval, self.log, self.out_dir = False, False, log, out_dir
        self.saved_iter, self.interrupt_evaluations = saved_iter, interrupt_evaluations
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def kept(self):
        if self.saved_iter is None:
            return f"nothing was saved to {self.out_dir}"
        return f"{self.out_dir} keeps the checkpoint of iteration {self.saved_iter}"

    def handle(self, signum, frame):
        if self.requested:  # a save is atomic: stopping in the middle of one keeps the previous file whole
            self.log(f"stopped at once; {self.kept()}")
            raise KeyboardInterrupt
        self.requested = True
        if self.in_eval and self.interrupt_evaluations:
            self.in_eval = False
            raise Stopped
