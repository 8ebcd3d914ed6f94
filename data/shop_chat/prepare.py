"""
A small customer-service chat dataset, generated here, offline: a shop's assistant answers questions about
orders, returns, opening hours and broken goods, filling the customer's name, item and day into fixed
replies. It writes data/shop_chat/train.jsonl and val.jsonl ({"messages": [...]} per line). Every
character is one the Tiny Shakespeare vocabulary has, so a character-level Shakespeare model can learn it.

$ python data/shop_chat/prepare.py                       # 2,000 train and 100 val conversations
$ python data/shop_chat/prepare.py --n_train=5000 --seed=7

The held-out conversations use the same templates with their own random draws; the reply to a question
depends only on what the conversation says, so the held-out loss can go far down.
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root, for the library modules

from configurator import configure  # noqa: E402
from nanoforge import errors, files  # noqa: E402

NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Mary", "Nick", "Olivia", "Paul", "Rose", "Sam", "Tom", "Una", "Victor", "Wendy", "Yusuf", "Zoe"]
ITEMS = ["lamp", "kettle", "teapot", "blanket", "chair", "candle", "mirror", "clock", "basket", "jacket",
         "umbrella", "vase", "pillow", "scarf", "bowl", "radio", "toaster", "rug", "hat", "book"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEM = "You are the helpful clerk of the Globe Shop."


def track(r, name, item, day):
    q = r.choice([f"Hello, I am {name}. Where is my {item}?", f"Has my {item} shipped yet? {name} here.",
                  f"This is {name}. When will my {item} arrive?"])
    return q, f"Dear {name}, your {item} is on its way and will arrive within three days."


def give_back(r, name, item, day):
    q = r.choice([f"I want to return the {item} I bought.", f"Can I send back my {item}?",
                  f"The {item} is not what I wanted. Can I return it?"])
    return q, f"Of course. Send the {item} back within thirty days and we will refund you in full."


def hours(r, name, item, day):
    q = r.choice([f"When are you open on {day}?", f"Are you open on {day}?", f"What are your hours on {day}?"])
    if day == "Sunday":
        return q, "On Sunday we are closed. Come back on Monday!"
    late = "eight" if day in ("Friday", "Saturday") else "six"
    return q, f"On {day} we are open from nine in the morning till {late} in the evening."


def broken(r, name, item, day):
    q = r.choice([f"My {item} arrived broken.", f"The {item} you sent me is damaged!",
                  f"Hi, {name} here. My new {item} does not work."])
    return q, f"I am sorry that your {item} arrived broken. We will send you a new {item} today, free of charge."


INTENTS = [track, give_back, hours, broken]


def conversation(r):
    messages = [{"role": "system", "content": SYSTEM}] if r.random() < 0.5 else []
    for turn in range(r.choice([1, 1, 2])):
        q, a = r.choice(INTENTS)(r, r.choice(NAMES), r.choice(ITEMS), r.choice(DAYS))
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if r.random() < 0.3:
        messages += [{"role": "user", "content": r.choice(["Thank you!", "Thanks a lot.", "Great, thanks."])},
                     {"role": "assistant", "content": "You are welcome. Have a good day!"}]
    return {"messages": messages}


if __name__ == "__main__":
    errors.friendly_errors()
    cfg = configure({"n_train": 2000, "n_val": 100, "seed": 1337, "out_dir": HERE}, sys.argv[1:])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    for split, n, seed in (("train", cfg["n_train"], cfg["seed"]), ("val", cfg["n_val"], cfg["seed"] + 1)):
        r = random.Random(seed)
        path = os.path.join(cfg["out_dir"], f"{split}.jsonl")
        with files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(conversation(r)) + "\n" for _ in range(n))
        print(f"wrote {n} conversations to {path}")
