"""
Tasks for evaluate.py, loaded and checked: multiple-choice ones as a list of {context, choices, label},
and chat questions with known answers as a list of {messages, expect}.

Two formats, one JSON object per line of a .jsonl file:

    HellaSwag    {"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap ...", ...], "label": 3}
    simple       {"prompt": "The capital of France is", "choices": ["Paris", "Berlin"], "answer": 0}

`label` is the index of the right ending (a digit string is fine, as the hub's HellaSwag has it);
`answer` is the index of the right choice or its text. HellaSwag itself comes from the Hugging Face
hub (`hellaswag` means Rowan/hellaswag; any hub dataset in HellaSwag's format works by its name).

A chat task is a conversation ending in the user's turn, and the strings a right reply must contain:

    chat         {"messages": [{"role": "user", "content": "Are you open on Sunday?"}], "expect": ["closed"]}
"""
import os

from nanoforge.corpus import jsonl_records, load_hub
from nanoforge.errors import UserError

HELLASWAG = "Rowan/hellaswag"


def parse_example(record, where):
    """One task record (either format) as {context, choices, label}; UserError naming `where` if malformed."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "endings" in record:
        context, choices, label, names = record.get("ctx"), record["endings"], record.get("label"), ("ctx", "endings", "label")
    elif "choices" in record:
        context, choices, label, names = record.get("prompt"), record["choices"], record.get("answer"), ("prompt", "choices", "answer")
    else:
        raise UserError(f"{where}: a task line needs 'ctx', 'endings', 'label' (HellaSwag) or 'prompt', "
                        f"'choices', 'answer'; found keys {sorted(record)}")
    if not isinstance(context, str):
        raise UserError(f"{where}: '{names[0]}' must be a string, got {context!r}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise UserError(f"{where}: '{names[1]}' must be a list of at least 2 non-empty strings")
    if isinstance(label, str) and names[2] == "answer" and label in choices:  # the right choice's text
        label = choices.index(label)
    elif isinstance(label, str) and names[2] == "label" and label.strip().isdigit():  # the hub has "3"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise UserError(f"{where}: '{names[2]}' is {label!r}, not a choice: give an index from 0 to "
                        f"{len(choices) - 1}" + (" or the right choice's text" if names[2] == "answer" else ""))
    return {"context": context, "choices": choices, "label": label}


def read_task_file(path, max_examples=0, parse=parse_example, what="examples"):
    """The first max_examples records of a .jsonl file (0: all), each checked by `parse`."""
    examples = []
    for lineno, record in jsonl_records(path):
        examples.append(parse(record, f"{path} line {lineno}"))
        if max_examples and len(examples) >= max_examples:
            break
    if not examples:
        raise UserError(f"{path} holds no {what}")
    return examples


def read_hub_task(name, split, max_examples=0):
    """A HellaSwag-format dataset from the Hugging Face hub, through `datasets`."""
    data = load_hub(name, split=split, advice="offline, pass a local JSONL file: --task=path/to/hellaswag_val.jsonl")
    if max_examples:
        data = data.select(range(min(max_examples, len(data))))
    return [parse_example(dict(r), f"{name} ({split}) row {i}") for i, r in enumerate(data)]


def load_task(spec, split="validation", max_examples=0):
    """Examples from a local .jsonl file, or 'hellaswag' / a hub dataset name."""
    if os.path.isfile(spec):
        return read_task_file(spec, max_examples)
    if spec == "hellaswag" or ("/" in spec and not spec.endswith(".jsonl")):
        return read_hub_task(HELLASWAG if spec == "hellaswag" else spec, split, max_examples)
    raise UserError(f"task '{spec}' is neither a file nor a hub dataset; give a .jsonl file or 'hellaswag'")


# -----------------------------------------------------------------------------------------------------
# chat questions with known answers

def parse_chat_question(record, where):
    """One chat-task record as {messages, expect}; UserError naming `where` if malformed."""
    if not isinstance(record, dict) or "messages" not in record or "expect" not in record:
        raise UserError(f"{where}: a chat task line needs 'messages' (ending in a user turn) and 'expect' "
                        f"(the strings a right reply contains)")
    messages, expect = record["messages"], record["expect"]
    roles = ("system", "user", "assistant")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str) for m in messages):
        raise UserError(f"{where}: 'messages' must be a list of {{role: system|user|assistant, content: text}}")
    if messages[-1]["role"] != "user":
        raise UserError(f"{where}: the last message must be the user's question, not {messages[-1]['role']}'s")
    if isinstance(expect, str):
        expect = [expect]
    if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e.strip() for e in expect):
        raise UserError(f"{where}: 'expect' must be a non-empty string or a list of them")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "expect": expect}


def load_chat_task(path, max_examples=0):
    if not os.path.isfile(path):
        raise UserError(f"chat task {path} does not exist; give a .jsonl file of {{messages, expect}} lines")
    return read_task_file(path, max_examples, parse_chat_question, "questions")
