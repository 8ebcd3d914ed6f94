"""
Chat data for instruction fine-tuning: reading and checking JSONL conversations, the one chat template,
the loss mask, and packing examples into training blocks. finetune.py trains on what this renders and
sample.py --chat talks through the same render(), so the model sees at chat time exactly the markup it
was trained on.

Each JSONL line is one example, either a conversation or a prompt/completion pair:
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}
    {"prompt": "...", "completion": "..."}          (read as one user turn and one assistant turn)

The template (special tokens from tokenizer.SPECIAL_TOKENS, added to the tokenizer when it lacks them):
    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>
The loss counts only what the model must learn to say: each assistant turn's content and the <|end|>
that closes it. Everything else (system and user turns, the <|assistant|> opener) gets target -1, which
GPT.forward ignores.
"""
import os

import torch

from nanoforge.corpus import jsonl_records
from nanoforge.errors import UserError
from nanoforge.tokenizer import SPECIAL_TOKENS, with_special_tokens

ROLES = ("system", "user", "assistant")
CHAT_TOKENS = SPECIAL_TOKENS[1:]  # <|system|> <|user|> <|assistant|> <|end|>; <|endoftext|> is not needed
END = "<|end|>"


def has_chat_tokens(tok):
    """Whether the tokenizer has all the turn markers (a model fine-tuned to chat has them)."""
    return all(t in tok.special_tokens for t in CHAT_TOKENS)


def chat_tokenizer(tok):
    """`tok` with the turn markers, appended after its vocabulary if it lacks them (GPT-2, characters)."""
    return with_special_tokens(tok, CHAT_TOKENS)


# ------------------------------------------------------------------------------------------------------
# reading and checking

def to_messages(obj):
    """One JSONL record as a list of {"role", "content"}; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
    elif "prompt" in obj and "completion" in obj:
        messages = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ValueError(f"needs 'messages', or 'prompt' and 'completion' (has {', '.join(map(repr, obj)) or 'nothing'})")
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"turn {n}: needs a string 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"turn {n}: unknown role {m.get('role')!r} (known: {', '.join(ROLES)})")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"turn {n}: empty assistant turn (nothing to learn from)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn (nothing to learn from)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_examples(path):
    """(examples, problems): examples [(line number, messages)], problems [(line number, reason)] for the
    lines that are skipped. A bad line never stops the reading; the caller reports the problems."""
    if not os.path.exists(path):
        raise UserError(f"cannot read {path}: no such file; make it with the dataset's prepare.py")
    examples, problems = [], []
    for line_no, record in jsonl_records(path, problems):  # lines that are not JSON go to problems
        try:
            examples.append((line_no, to_messages(record)))
        except ValueError as e:
            problems.append((line_no, str(e)))
    return examples, problems


def report(path, problems, kept, limit=10):
    """A few lines saying how many examples were skipped and why, with line numbers."""
    lines = [f"{path}: {kept} examples kept, {len(problems)} skipped"]
    lines += [f"  {path}:{n}: {why}" for n, why in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------
# the template and the mask

def render(tok, messages, add_generation_prompt=False):
    """(ids, mask): the conversation as token ids, and 1 where the token is one the model is trained to
    produce (assistant content and its closing <|end|>), 0 elsewhere. With add_generation_prompt the ids
    end with an open <|assistant|>, for the model to continue. Message text is encoded as ordinary text:
    a user typing "<|end|>" does not end their turn."""
    special = tok.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in special]
    if missing:
        raise UserError(f"the tokenizer lacks the chat tokens {missing}; wrap it with chat.chat_tokenizer")
    ids, mask = [], []
    for m in messages:
        learn = int(m["role"] == "assistant")
        content = tok.encode(m["content"]) + [special[END]]
        ids += [special[f"<|{m['role']}|>"]] + content
        mask += [0] + [learn] * len(content)
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
        mask.append(0)
    return ids, mask


# render()'s template in Jinja, the form Hugging Face tokenizers (apply_chat_template) and llama.cpp read;
# tests/test_export.py holds the two to the same ids
JINJA = ("{%- for message in messages -%}"
         "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
         "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
         "{%- endif -%}"
         "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
         "{%- endfor -%}"
         "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")


def shift(ids, mask):
    """Inputs and targets for next-token training: x = ids[:-1], y = ids[1:] with the unlearned
    positions set to -1 (the one place the loss mask is applied)."""
    return ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def encode_examples(tok, examples, block_size):
    """[(x, y)] for the examples that fit; (line, reason) problems for those that do not (longer than the
    context: never truncated silently, since a cut-off answer teaches the model to stop mid-sentence)."""
    pairs, problems = [], []
    for line_no, messages in examples:
        try:
            ids, mask = render(tok, messages)
        except UserError as e:  # e.g. a character the char vocabulary lacks
            problems.append((line_no, str(e)))
            continue
        if len(ids) - 1 > block_size:
            problems.append((line_no, f"too long: {len(ids) - 1} tokens > block_size {block_size}"))
            continue
        pairs.append(shift(ids, mask))
    return pairs, problems


def pack(pairs, block_size):
    """Packs (x, y) examples, in order, into rows of block_size tokens: an example goes into the current
    row if it fits, else starts a new one; the rest of a row is padding (x 0, y -1). Returns X, Y, both
    (N, block_size) long tensors. Examples in one row can attend to the ones before them; the mask keeps
    them from being scored on each other's tokens."""
    rows, row_x, row_y = [], [], []
    for x, y in pairs:
        if len(row_x) + len(x) > block_size:
            rows.append((row_x, row_y))
            row_x, row_y = [], []
        row_x, row_y = row_x + x, row_y + y
    if row_x:
        rows.append((row_x, row_y))
    X = torch.zeros(len(rows), block_size, dtype=torch.long)  # (N, T)
    Y = torch.full((len(rows), block_size), -1, dtype=torch.long)  # (N, T)
    for i, (x, y) in enumerate(rows):
        X[i, :len(x)], Y[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return X, Y


def load_split(path, tok, block_size):
    """Reads, checks, renders and packs one JSONL file: (X, Y, report text, counts)."""
    examples, problems = read_examples(path)
    pairs, too_long = encode_examples(tok, examples, block_size)
    problems = sorted(problems + too_long)
    X, Y = pack(pairs, block_size)
    counts = dict(examples=len(pairs), skipped=len(problems), rows=len(X), learned_tokens=int((Y >= 0).sum()))
    return X, Y, report(path, problems, len(pairs)), counts


# ------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def masked_loss(model, X, Y, batch_size, device, autocast_ctx):
    """Mean loss over all learned tokens of X, Y (not a mean of batch means: every token weighs the same)."""
    total, count = 0.0, 0
    for i in range(0, len(X), batch_size):
        x, y = X[i:i + batch_size].to(device), Y[i:i + batch_size].to(device)
        n = int((y >= 0).sum())
        if n == 0:
            continue
        with autocast_ctx:
            _, loss = model(x, y)
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)
