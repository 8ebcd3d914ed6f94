"""
A small customer-service chat dataset, generated here, offline: a shop's assistant answers questions about
orders, returns, opening hours and broken goods, filling the customer's name, item and day into fixed
replies. It writes, in data/shop_chat/:
- train.jsonl and val.jsonl: conversations, {"messages": [...]} per line, for finetune.py;
- facts.jsonl: held-out questions with the facts a right reply states ({"messages", "expect"}), for
  `evaluate.py --chat_task`: new conversations (their own random draws) asked in the training wordings;
- facts_reworded.jsonl: the same facts asked in wordings the training data never uses: how far the model
  understands the question rather than recognises it.
Every character is one the Tiny Shakespeare vocabulary has, so a character-level Shakespeare model can
learn it, and every conversation fits in block_size characters with its chat markers.

$ python data/shop_chat/prepare.py                       # 2,000 train, 100 val, 200 + 200 questions
$ python data/shop_chat/prepare.py --n_train=5000 --seed=7
"""
import argparse
import json
import os
import random

from nanoforge import errors, files
from nanoforge.errors import UserError

HERE = os.path.dirname(os.path.abspath(__file__))

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Mary", "Nick", "Olivia", "Paul", "Rose", "Sam", "Tom", "Una", "Victor", "Wendy", "Yusuf", "Zoe"]
ITEMS = ["lamp", "kettle", "teapot", "blanket", "chair", "candle", "mirror", "clock", "basket", "jacket",
         "umbrella", "vase", "pillow", "scarf", "bowl", "radio", "toaster", "rug", "hat", "book"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEM = "You are the Globe Shop's clerk."

# Each intent: the wordings of its question (those after the "|" are held out: only the reworded
# questions use them), and its reply with the facts a right one states.
WORDINGS = {
    "track": ["Hello, I am {name}. Where is my {item}?", "Has my {item} shipped yet? {name} here.",
              "This is {name}. When will my {item} arrive?", "Where is the {item} I ordered?",
              "|", "Is my {item} on its way?", "{name} here. How long until my {item} comes?"],
    "give_back": ["I want to return the {item} I bought.", "Can I send back my {item}?",
                  "The {item} is not what I wanted. Can I return it?", "How do I return a {item}?",
                  "|", "Could I give back this {item}?", "I do not like my {item}. May I return it?"],
    "hours": ["When are you open on {day}?", "Are you open on {day}?", "What are your hours on {day}?",
              "Is the shop open on {day}?",
              "|", "Can I come in on {day}?", "What time do you open on {day}?"],
    "broken": ["My {item} arrived broken.", "The {item} you sent me is damaged!",
               "Hi, {name} here. My new {item} does not work.", "My {item} came in pieces.",
               "|", "The {item} I got is broken.", "{name} here. My {item} is cracked."],
}


def reply(intent, item, day):
    """(the clerk's reply, the facts a right reply states)."""
    if intent == "track":
        return f"Dear customer, your {item} is on its way and will arrive within three days.", [item, "three days"]
    if intent == "give_back":
        return (f"Of course. Send the {item} back within thirty days and we will refund you in full.",
                [item, "thirty days", "refund"])
    if intent == "hours":
        if day == "Sunday":
            return "On Sunday we are closed. Come back on Monday!", ["Sunday", "closed"]
        late = "eight" if day in ("Friday", "Saturday") else "six"
        return (f"On {day} we are open from nine in the morning till {late} in the evening.",
                [day, "nine in the morning", f"{late} in the evening"])
    return f"Sorry that your {item} arrived broken! We will send a new {item} today, free of charge.", \
        [f"new {item}", "free of charge"]


def question(r, reworded=False):
    """(question, reply, facts) of a random intent, in a training wording or a held-out one."""
    intent = r.choice(list(WORDINGS))
    cut = WORDINGS[intent].index("|")
    wording = r.choice(WORDINGS[intent][cut + 1:] if reworded else WORDINGS[intent][:cut])
    name, item, day = r.choice(NAMES), r.choice(ITEMS), r.choice(DAYS)
    return (wording.format(name=name, item=item, day=day), *reply(intent, item, day))


def conversation(r):
    messages = [{"role": "system", "content": SYSTEM}] if r.random() < 0.5 else []
    for turn in range(r.choice([1, 1, 2])):
        q, a, _ = question(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if r.random() < 0.3:
        messages += [{"role": "user", "content": r.choice(["Thank you!", "Thanks a lot.", "Great, thanks."])},
                     {"role": "assistant", "content": "You are welcome. Have a good day!"}]
    return {"messages": messages}


def fact_question(r, reworded):
    """A question to score: sometimes after a system message or an earlier exchange, as in a real chat."""
    messages = [{"role": "system", "content": SYSTEM}] if r.random() < 0.5 else []
    if r.random() < 0.3:
        q, a, _ = question(r)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    q, _, facts = question(r, reworded)
    return {"messages": messages + [{"role": "user", "content": q}], "expect": facts}


def length(record):
    """The conversation's length in characters with its chat markers (one per turn start and end)."""
    return sum(len(m["content"]) + 2 for m in record["messages"]) + 1


if __name__ == "__main__":
    errors.friendly_errors()
    parser = argparse.ArgumentParser(description="Generate the shop's chat dataset, offline.")
    parser.add_argument("--n_train", type=int, default=2000, help="training conversations (%(default)s)")
    parser.add_argument("--n_val", type=int, default=100, help="held-out conversations (%(default)s)")
    parser.add_argument("--n_facts", type=int, default=200,
                        help="questions to score, in the training wordings and again reworded (%(default)s each)")
    parser.add_argument("--block_size", type=int, default=384,
                        help="no conversation, with its chat markers, may be longer (%(default)s characters)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the draws (%(default)s)")
    parser.add_argument("--out_dir", default=HERE, help="where the .jsonl files go (%(default)s)")
    cfg = vars(parser.parse_args())
    for key, least in (("n_train", 1), ("n_val", 1), ("n_facts", 0), ("block_size", 1)):
        if cfg[key] < least:
            raise UserError(f"--{key} must be at least {least}, got {cfg[key]}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    outputs = (("train", cfg["n_train"], lambda r: conversation(r)), ("val", cfg["n_val"], conversation),
               ("facts", cfg["n_facts"], lambda r: fact_question(r, False)),
               ("facts_reworded", cfg["n_facts"], lambda r: fact_question(r, True)))
    for k, (split, n, draw) in enumerate(outputs):
        r = random.Random(cfg["seed"] + k)  # each file its own draws: held out from the others
        records = [draw(r) for _ in range(n)]
        longest = max(map(length, records), default=0)
        if longest > cfg["block_size"]:
            raise UserError(f"a {split} conversation is {longest} characters, over block_size={cfg['block_size']}; "
                            f"raise --block_size (and train with it)")
        path = os.path.join(cfg["out_dir"], f"{split}.jsonl")
        with files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
        print(f"wrote {n} {'questions' if 'facts' in split else 'conversations'} to {path} "
              f"(longest {longest} characters)")
