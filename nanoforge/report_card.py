"""
The speedrun's report card: one section per stage, every number read from that stage's own outputs
(curate's report.json, the tokenizer's report.json, the token files' meta.json, the runs' run.json,
log.jsonl and eval.jsonl, the samples, the export's nanoforge_check.json, stages.json), never typed.
build() gathers them as a card; markdown() and html() lay it out. The HTML is one file with its style and
its curves (inline SVG) inside, so it opens offline and fetches nothing.
"""
import html as html_lib
import json
import os

from nanoforge import hardware, runlog


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def section(key, title, rows=(), text=(), curves=(), table=None, link=None):
    """rows: [(label, shown value)]; text: quoted lines; curves: [(name, [(x, y)])]; table: (head, rows)."""
    return {"key": key, "title": title, "rows": [list(r) for r in rows], "text": list(text), "curves": list(curves),
            "table": table, "link": link}


def build(run_dir, record):
    """The card of the speedrun in run_dir, from the stages record (stages.json's content) and each stage's
    outputs. A stage not run yet has no section."""
    done, at = record["stages"], lambda *p: os.path.join(run_dir, *p)
    sections, headline = [], []
    if "curate" in done:
        rep = read_json(at("curated", "report.json"))
        s = rep["summary"]
        sections.append(section("curate", "Curation", [
            ("documents in, kept", f"{s['documents_in']:,} -> {s['kept']:,} ({s['train_documents']:,} train, "
                                   f"{s['val_documents']:,} held out)"),
            ("bytes in, out", f"{s['bytes_in']:,} -> {s['bytes_out']:,}"),
            ("documents changed (cleanup, PII)", f"{s['changed']:,}")],
            table=(["dropped because", "documents"], [[r, f"{n:,}"] for r, n in rep["drop_reasons"].items()])))
    if "tokenizer" in done:
        rep = read_json(at("tokenizer", "report.json"))
        rows = [("vocabulary", f"{rep['vocab_size']:,} tokens, {'byte-level BPE' if rep['kind'] == 'bpe' else 'Unigram, over bytes'}"),
                ("trained on", f"{rep['train_bytes']:,} bytes in {rep['train_seconds']:.1f} s")]
        if "bytes_per_token" in rep:
            rows.append(("held-out bytes per token", f"{rep['bytes_per_token']:.3f} (on {rep['heldout_bytes']:,} bytes)"))
        if "gpt2_bytes_per_token" in rep:
            rows.append(("GPT-2's on the same text", f"{rep['gpt2_bytes_per_token']:.3f} (GPT-2 needs "
                                                     f"{rep['gpt2_tokens'] / rep['heldout_tokens']:.0%} as many tokens)"))
        sections.append(section("tokenizer", "Tokenizer", rows))
    if "prepare" in done:
        meta = read_json(at("data", "meta.json"))
        sections.append(section("prepare", "Token files", [
            ("train tokens", f"{meta['train_tokens']:,}"), ("held-out tokens", f"{meta['val_tokens']:,}")]))
    if "pretrain" in done:
        sections.append(training_section("pretrain", "Pretraining", at("base"), headline))
    if "evaluate" in done:
        ev = read_jsonl(at("base", "eval.jsonl"))[-1]
        samples = read_jsonl(at("base", "samples.jsonl"))
        headline.append(("held-out loss", f"{ev['loss']:.4f} nats/token, {ev['bpb']:.4f} bits/byte"))
        sections.append(section("evaluate", "Held-out evaluation", [
            ("held-out loss", f"{ev['loss']:.4f} nats/token (perplexity {ev['perplexity']:.2f})"),
            ("bits per byte", f"{ev['bpb']:.4f}"), ("train loss, as many tokens", f"{ev['train_loss']:.4f}"),
            ("gap (held out - train)", f"{ev['gap']:.4f}"), ("tokens scored", f"{ev['tokens']:,}")],
            text=[s["prompt"] + s["text"] for s in samples]))
    if "chat_data" in done:
        counts = {n: len(read_jsonl(at("chat_data", f"{n}.jsonl"))) for n in ("train", "val", "facts")}
        sections.append(section("chat_data", "Chat data", [
            ("conversations", f"{counts['train']:,} train, {counts['val']:,} held out"),
            ("questions with known facts", f"{counts['facts']:,}")]))
    if "finetune" in done:
        sections.append(training_section("finetune", "Chat fine-tuning", at("chat"), headline))
    if "chat_eval" in done:
        ev = read_jsonl(at("chat", "eval.jsonl"))[-1]["chat_task"]
        lo, hi = ev["acc_ci"]
        headline.insert(0, ("chat facts right", f"{ev['acc']:.1%} of {ev['n']} held-out questions (95% CI {lo:.1%}-{hi:.1%})"))
        shown = ev["first"] + [r for r in ev["wrong"] if r not in ev["first"]][:3]
        replies = [f"{r['question']} -> {r['reply']} ({'right' if r['right'] else 'wrong'})" for r in shown]
        sections.append(section("chat_eval", "Chat evaluation", [
            ("facts right", f"{ev['correct']} of {ev['n']}: {ev['acc']:.1%}"),
            ("95% interval", f"{lo:.1%} - {hi:.1%}")], text=replies))
    if "export" in done:
        check = read_json(at("export", "hf", "nanoforge_check.json"))
        gguf = at("export", "model.gguf")
        sections.append(section("export", "Export", [
            ("Hugging Face folder", f"export/hf: {check['class']}"),
            ("transformers against ours", f"logits within {check['max_logit_diff']:.1e}, {check['greedy_equal']} of "
                                          f"{check['greedy_tokens']} greedy tokens equal"),
            ("GGUF (llama.cpp, Ollama)", f"export/model.gguf: q8_0, {os.path.getsize(gguf) / 1e6:.2f} MB"
             if os.path.exists(gguf) else "not written: a byte-level Unigram tokenizer has no llama.cpp form")]))
    if "explain" in done:
        sections.append(section("explain", "Inside the model", [("the explain page", "base/explain/index.html")],
                                link="base/explain/index.html"))
    run = runlog.read_run_json(at("base")) if "pretrain" in done else None
    if run:
        cpu, derived = run["run"]["cpu"], run["derived"]
        machine = [("CPU", f"{hardware.describe_cpu(cpu)}; torch threads {run['run']['torch_threads']}"),
                   ("dtype, compile", f"{derived['dtype']}, {derived['compile']}"), ("torch", run["run"]["torch"])]
    else:
        machine = []
    total = sum(s["seconds"] for s in done.values())
    times = [(name, f"{s['seconds']:.0f} s") for name, s in done.items()] + [("total", f"{total:.0f} s ({total / 60:.1f} min)")]
    sections.append(section("machine", "Machine and wall time", machine + times))
    headline.append(("wall time", f"{total / 60:.1f} min"))
    return {"title": f"nanoforge speedrun: {os.path.basename(os.path.abspath(run_dir))}", "headline": headline,
            "sections": sections}


def training_section(key, title, out_dir, headline):
    run, records = runlog.read_run_json(out_dir), runlog.read_log(out_dir)
    evals = runlog.evaluations(records)
    steps = [r for r in records if "loss" in r]
    last = max((r["iter"] for r in records), default=0)
    rows = [("iterations", f"{last:,}")]
    if key == "pretrain":
        rows += [("tokens seen", f"{last * run['derived']['tokens_per_iter']:,}")]
        headline.append(("model", f"{run['config']['n_layer']} layers, {run['config']['n_embd']} wide"))
    if evals:
        # a fine-tune on templated replies reaches losses like 2e-7: four decimals would print 0.0000
        val = evals[-1]["val_loss"]
        rows.append(("held-out loss at the end", f"{val:.4f}" if val >= 1e-3 else f"{val:.2e}"))
        rows.append(("training time", f"{evals[-1].get('train_time', 0):.0f} s"))
    curves = [("train", [(r["iter"], r["loss"]) for r in steps]), ("held out", [(r["iter"], r["val_loss"]) for r in evals])]
    return section(key, title, rows, curves=curves)


# ------------------------------------------------------------------------------------------------------
# layouts


def markdown(card):
    lines = [f"# {card['title']}", ""]
    lines += [f"- **{label}**: {value}" for label, value in card["headline"]] + [""]
    for s in card["sections"]:
        lines += [f"## {s['title']}", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in s["rows"]] + [""]
        if s["table"]:
            head, rows = s["table"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        if s["curves"]:
            lines += [f"![{s['title']}: loss]({'base' if s['key'] == 'pretrain' else 'chat'}/loss.png)", ""]
        lines += ["> " + t.replace("\n", " ") for t in s["text"]] + ([""] if s["text"] else [])
    return "\n".join(lines)


def svg_curves(curves, width=560, height=220, pad=36):
    """Loss curves as an inline SVG: one polyline a curve, shared axes."""
    points = [p for _, pts in curves for p in pts]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points) or 1
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)  # noqa: E731
    sy = lambda y: height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)  # noqa: E731
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="loss curves">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" class="frame"/>']
    for k, (name, pts) in enumerate(curves):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="c{k}" points="{path}"><title>{name}</title></polyline>')
        parts.append(f'<text x="{width - pad - 80}" y="{pad + 14 + 14 * k}" class="c{k}">{name}</text>')
    parts += [f'<text x="{pad}" y="{pad - 6}">{y1:.2f}</text>', f'<text x="{pad}" y="{height - pad + 14}">{y0:.2f}</text>',
              f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">iteration {x1:,}</text>', "</svg>"]
    return "\n".join(parts)


STYLE = """body{font:15px/1.45 system-ui,sans-serif;max-width:860px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
.headline td:first-child,.rows td:first-child{color:#555}blockquote{margin:.4em 0;padding:.3em .8em;
background:#f6f6f6;border-left:3px solid #bbb;white-space:pre-wrap}svg text{font-size:11px;fill:#555}
svg .frame{fill:none;stroke:#ccc}polyline{fill:none;stroke-width:1.5}polyline.c0{stroke:#4a7bd0}
polyline.c1{stroke:#d0604a;stroke-width:2.5}text.c0{fill:#4a7bd0}text.c1{fill:#d0604a}"""


def html(card):
    e = html_lib.escape
    out = ['<!doctype html><html lang="en"><head><meta charset="utf-8">', f"<title>{e(card['title'])}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(card['title'])}</h1>", '<table class="headline">']
    out += [f"<tr><td>{e(label)}</td><td><b>{e(value)}</b></td></tr>" for label, value in card["headline"]]
    out.append("</table>")
    for s in card["sections"]:
        out += [f'<section id="{s["key"]}"><h2>{e(s["title"])}</h2><table class="rows">']
        out += [f"<tr><td>{e(label)}</td><td>{e(value)}</td></tr>" for label, value in s["rows"]]
        out.append("</table>")
        if s["table"]:
            head, rows = s["table"]
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        if s["curves"]:
            out.append(svg_curves(s["curves"]))
        if s["link"]:
            out.append(f'<p><a href="{e(s["link"])}">open {e(s["link"])}</a></p>')
        out += [f"<blockquote>{e(t)}</blockquote>" for t in s["text"]]
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)
