"""
curate.py's report: documents and bytes into and out of each stage, the drop reasons, what changed, a few
examples of each (report.json), the same as a readable page (report.md) with the document lengths before
and after (lengths.png). Examples of personal data show the placeholder, never the data.
"""
import io
import math
import os
from collections import Counter

import numpy as np

from nanoforge.files import write_bytes, write_json

SNIPPET = 160

STAGES = ("input", "empty", "cleanup", "language", "quality", "harmful", "dedup:exact", "dedup:near", "model")

# what each drop reason means, in a few words, for report.md (a reason not listed is shown as it is)
REASONS = {
    "input:not_utf8": "bytes that are not UTF-8 text", "empty": "no text at all",
    "cleanup:nothing_left": "nothing left once menus, boilerplate and markup were removed",
    "language:low_confidence": "language identification unsure",
    "quality:min_words": "too few words", "quality:max_words": "too many words",
    "quality:mean_word_length": "words too short or too long on average",
    "quality:symbol_word_ratio": "too many # and ... symbols for its words",
    "quality:alpha_words": "too few words with a letter", "quality:bullet_lines": "mostly bullet-point lines",
    "quality:ellipsis_lines": "mostly lines cut off with ...", "quality:duplicate_lines": "the same lines repeated",
    "quality:top_2gram": "one word pair repeated throughout", "quality:duplicate_5grams": "repeated 5-word runs",
    "quality:stop_words": "too few common English words to be prose",
    "quality:punctuation_lines": "too few lines ending in punctuation (menus, lists)",
    "harmful:words": "blocklisted words or phrases", "harmful:domain": "from a blocklisted domain",
    "dedup:exact": "the same words as an earlier document", "dedup:near": "nearly the same as an earlier document",
    "model:perplexity": "least like the trusted text (perplexity)",
    "model:classifier": "least like the reference text (classifier)",
}


def explain(reason):
    if reason in REASONS:
        return REASONS[reason]
    if reason.startswith("language:not_"):
        return f"not in the kept languages ({reason[len('language:not_'):].replace('_', ', ')})"
    return reason


def build_report(status, lengths_in, lengths_clean, lengths_out, val, pii_counts, pii_docs, changes, n_changed, ex):
    """report.json's content from what the passes counted. status: per input document, '' or its drop reason."""
    n = len(status)
    reasons = Counter(status)
    kept = [i for i in range(n) if not status[i]]
    # documents and bytes into and out of each stage, in order; a stage's bytes in are the previous one's
    # out, so the columns add up: raw sizes until cleanup rewrites the text, PII's replacements (counted
    # on the documents every filter kept) last
    stages, alive, carried = [], np.ones(n, bool), int(lengths_in.sum())
    for stage in STAGES:
        drop = np.array([s == stage or s.startswith(stage + ":") for s in status]) if n else np.zeros(0, bool)
        before = alive.copy()
        alive &= ~drop
        size = lengths_in if stage in ("input", "empty") else lengths_clean
        stages.append({"stage": stage, "docs_in": int(before.sum()), "docs_out": int(alive.sum()),
                       "bytes_in": carried, "bytes_out": int(size[alive].sum()),
                       "dropped": {r: c for r, c in sorted(reasons.items()) if r and (r == stage or r.startswith(stage + ":"))}})
        carried = stages[-1]["bytes_out"]
    stages.append({"stage": "pii", "docs_in": len(kept), "docs_out": len(kept), "bytes_in": carried,
                   "bytes_out": int(lengths_out[kept].sum()), "replaced": dict(sorted(pii_counts.items())),
                   "documents_changed": dict(sorted(pii_docs.items()))})
    summary = {"documents_in": n, "kept": len(kept), "changed": n_changed, "dropped": n - len(kept),
               "train_documents": len(kept) - len(val), "val_documents": len(val),
               "bytes_in": int(lengths_in.sum()), "bytes_out": int(lengths_out.sum())}
    assert summary["kept"] + summary["dropped"] == n  # nothing lost silently
    return {"summary": summary, "stages": stages, "drop_reasons": {r: c for r, c in sorted(reasons.items()) if r},
            "changes": dict(sorted(changes.items())), "examples": {k: ex[k] for k in sorted(ex)},
            "lengths": {"in": lengths_in.tolist(), "out": lengths_out[kept].tolist()}}


def write_report(report, out):
    """report.json, lengths.png and report.md in out (a folder, or a staged folder at a URL)."""
    lengths = report.pop("lengths")
    write_json(os.path.join(out, "report.json"), report)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    top = max([1, *lengths["in"]])
    bins = np.logspace(0, math.log10(top) + 0.1, 40)
    ax.hist([max(1, x) for x in lengths["in"]], bins=bins, alpha=0.5, label=f"before ({len(lengths['in'])} docs)")
    ax.hist([max(1, x) for x in lengths["out"]], bins=bins, alpha=0.5, label=f"after ({len(lengths['out'])} docs)")
    ax.set_xscale("log")
    ax.set_xlabel("document length (UTF-8 bytes)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", metadata={"Software": None})  # no version stamp: byte-identical reruns
    plt.close(fig)
    write_bytes(os.path.join(out, "lengths.png"), png.getvalue())
    s = report["summary"]
    md = ["# Curation report\n", f"{s['documents_in']:,} documents in ({s['bytes_in']:,} bytes): {s['kept']:,} kept "
          f"({s['changed']:,} of them changed), {s['dropped']:,} dropped; {s['bytes_out']:,} bytes out; "
          f"{s['train_documents']:,} train and {s['val_documents']:,} val documents.\n",
          "| stage | docs in | docs out | bytes in | bytes out | what it did |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for st in report["stages"]:
        if "dropped" in st:
            did = "; ".join(f"{v:,} {explain(k)} (`{k}`)" for k, v in st["dropped"].items())
        else:
            did = ", ".join(f"{v:,} {k}" for k, v in st["replaced"].items()) and "replaced: " + ", ".join(
                f"{v:,} {k}" for k, v in st["replaced"].items())
        if st["stage"] == "cleanup" and report["changes"]:
            did = "; ".join(filter(None, [did, "rewrote, in kept documents: " + ", ".join(
                f"{k} in {v:,}" for k, v in report["changes"].items())]))
            if report["examples"].get("cleanup"):
                did += f"; e.g. {report['examples']['cleanup'][0]['excerpt'][:100]}"
        md.append(f"| {st['stage']} | {st['docs_in']:,} | {st['docs_out']:,} | {st['bytes_in']:,} | {st['bytes_out']:,} | "
                  + did + " |")
    md += ["", "Changes to kept documents (cleanup): " + (", ".join(f"{k} {v}" for k, v in report["changes"].items()) or "none"),
           "", "![document lengths before and after](lengths.png)", "", "## Examples", ""]
    for key, items in report["examples"].items():
        md.append(f"**{key}**\n")
        md += [f"- `{it['id']}`" + "".join(f", {k}: {str(v)[:SNIPPET]!r}" for k, v in it.items() if k != "id") for it in items]
        md.append("")
    write_bytes(os.path.join(out, "report.md"), ("\n".join(md) + "\n").encode("utf-8"))
