"""
How exactly an exported model runs elsewhere: exports a run with export.py, then compares greedy decoding
in nanoforge (the model's generate, as sample.py --temperature=0) with transformers on the Hugging Face
folder and with llama.cpp on the GGUF (f32 and q8_0). With --chat_file (JSONL of {"messages": [...]}), it
also asks each conversation's questions through llama-server's chat endpoint (its --jinja template, i.e. the
one in the GGUF) and compares the replies with ours. Prints one line per comparison; dev/LOG.md quotes them.

$ python dev/export_parity.py --out_dir=out-shakespeare-char-cpu --llama_cpp_bin=/path/to/llama.cpp/build/bin
$ python dev/export_parity.py --out_dir=out-sft-shop --chat_file=data/shop_chat/facts.jsonl --n_chats=20 \
      --llama_cpp_bin=/path/to/llama.cpp/build/bin
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

from nanoforge import chat_template, hf_format
from nanoforge.checkpoint import load_model
from nanoforge.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--out_dir", required=True)
p.add_argument("--llama_cpp_bin", required=True, help="the folder with llama-completion and llama-server")
p.add_argument("--prompt", default="ROMEO:")
p.add_argument("--tokens", type=int, default=64)
p.add_argument("--chat_file", default="")
p.add_argument("--n_chats", type=int, default=20)
args = p.parse_args()

model, spec, _ = load_model(args.out_dir)
model.eval()
tok = load_tokenizer(spec)
work = tempfile.mkdtemp()


def export(*extra):
    dest = os.path.join(work, "x" + str(len(os.listdir(work))) + (".gguf" if "--to=gguf" in extra else ""))
    subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--out_dir={args.out_dir}", f"--dest={dest}", *extra],
                   check=True, capture_output=True)
    return dest


prompt_ids = tok.encode(args.prompt, allow_special=True)
ours = model.generate(torch.tensor([prompt_ids]), args.tokens, temperature=0.0)[0, len(prompt_ids):].tolist()
ends = hf_format.end_ids(tok)
ours = ours[:min([ours.index(e) for e in ends if e in ours], default=len(ours))]  # the others stop at an end token

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
folder = export()
hf, hf_tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
ids = hf_tok(args.prompt, return_tensors="pt")["input_ids"]
theirs = hf.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.size(1):].tolist()
print(f"transformers ({hf_format.HF_CLASS[hf_format.family(model.config)]}): {hf_format.leading_agreement(ours, theirs)} of {len(ours)} "
      f"greedy tokens equal (up to {args.tokens}, or the end token)")

for gguf_type in ("f32", "q8_0"):
    path = export("--to=gguf", f"--gguf_type={gguf_type}")
    cmd = [os.path.join(args.llama_cpp_bin, "llama-completion"), "-m", path, "-p", args.prompt, "-n", str(args.tokens),
           "--temp", "0", "-no-cnv", "--no-warmup", "-t", "2"] + ([] if ends else ["--ignore-eos"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    text = out[len(args.prompt):] if out.startswith(args.prompt) else out
    theirs = tok.encode(text[:len(tok.decode(ours))], allow_special=True)
    if theirs != ours:
        print(f"  nanoforge: {tok.decode(ours)!r}\n  llama.cpp: {text!r}")
    print(f"llama.cpp {gguf_type}: {hf_format.leading_agreement(ours, theirs)} of {len(ours)} greedy tokens equal "
          f"({os.path.getsize(path) / 1e6:.2f} MB); command: {' '.join(cmd[:1] + ['-m', os.path.basename(path)] + cmd[3:])}")

if args.chat_file:
    with open(args.chat_file) as f:
        chats = [json.loads(line)["messages"] for line in f][:args.n_chats]
    end = tok.special_tokens[chat_template.END]
    for gguf_type in ("f32", "q8_0"):
        path = export("--to=gguf", f"--gguf_type={gguf_type}")
        server = subprocess.Popen([os.path.join(args.llama_cpp_bin, "llama-server"), "-m", path, "--jinja", "--port", "8937",
                                   "-t", "2", "-c", str(model.config.block_size)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        same, shown = 0, []
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen("http://127.0.0.1:8937/health")
                    break
                except OSError:
                    time.sleep(0.2)
            for messages in chats:
                asked = [m for m in messages if m["role"] != "assistant"]
                while asked and asked[-1]["role"] != "user":
                    asked.pop()
                ids, _ = chat_template.render(tok, asked, add_generation_prompt=True)
                room = model.config.block_size - len(ids)
                reply = model.generate(torch.tensor([ids]), room, temperature=0.0, stop_token=end)[0, len(ids):].tolist()
                reply = tok.decode(reply[:reply.index(end)] if end in reply else reply)
                body = json.dumps({"messages": asked, "temperature": 0, "max_tokens": room}).encode()
                req = urllib.request.Request("http://127.0.0.1:8937/v1/chat/completions", body, {"Content-Type": "application/json"})
                got = json.load(urllib.request.urlopen(req))["choices"][0]["message"]["content"]
                same += got == reply
                shown.append((asked[-1]["content"], reply, got))
        finally:
            server.terminate()
            server.wait()
        print(f"llama-server --jinja {gguf_type}: {same} of {len(chats)} chat replies equal to ours")
        for q, a, b in shown[:2]:
            print(f"  Q: {q}\n  nanoforge: {a}\n  llama.cpp: {b}")
