"""
Curation (curate.py, stages.py, pii.py, pipeline.py) on a synthetic corpus built here: clean documents,
planted exact and near-duplicates (5-10% of words changed), personal data of every kind and clean
look-alikes (dates, versions, prices, ISBNs, long numbers). Each stage is checked on its own, then the
whole pipeline in-process and once as a user runs it (determinism, refusal to overwrite, errors).
"""
import gzip
import json
import os
import pathlib
import random
import shutil

import numpy as np
import pytest

import curate
from nanoforge.corpus import find_files, is_hub, load_documents, parse_ext
from nanoforge.curation import pii
from nanoforge.curation import pipeline
from nanoforge.curation import quality
from nanoforge.curation import stages
from nanoforge.curation.report import explain, write_report
from nanoforge.errors import UserError

from conftest import ROOT, run  # noqa: E402
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river garden kitchen window mountain village teacher "
         "doctor market letter music story morning evening summer winter city country family friend school "
         "water money history science language picture question answer reason result moment paper road "
         "walked found made took gave told asked called needed wanted looked seemed felt tried left kept began "
         "small large early young important public bright quiet careful simple different similar local "
         "quickly slowly often never always usually almost nearly together perhaps").split()
STOPS = "the the the of of and and to to a in that with have be for on it was".split()


def sentence(rng, n):
    words = [rng.choice(STOPS) if rng.random() < 0.35 else rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + "."


def document(rng, n_sentences=12):
    """English-looking prose: lines of sentences ending in full stops, stop words, no repeats."""
    lines = [" ".join(sentence(rng, rng.randint(8, 14)) for _ in range(3)) for _ in range(n_sentences // 3)]
    return "\n".join(lines)


def perturb(rng, text, fraction):
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, round(fraction * len(words)))):
        words[i] = rng.choice(WORDS)
    return " ".join(words)


def card(rng, prefix, length):
    digits = [int(c) for c in prefix] + [rng.randint(0, 9) for _ in range(length - len(prefix) - 1)]
    for check in range(10):
        if pii.luhn_ok("".join(map(str, digits + [check]))):
            return "".join(map(str, digits + [check]))


def iban(rng):
    country, bban = rng.choice([("DE", 18), ("GB", 18), ("FR", 23), ("NL", 14)])
    body = "".join(str(rng.randint(0, 9)) for _ in range(bban))
    if country in ("GB", "NL"):
        body = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + body[4:]
    check = 98 - int("".join(str(int(c, 36)) for c in body + country + "00")) % 97
    s = f"{country}{check:02d}{body}"
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4)) if rng.random() < 0.5 else s


def pii_samples(rng, kind):
    """One piece of personal data of `kind`, in one of the formats people write it in."""
    d = lambda k: "".join(str(rng.randint(0, 9)) for _ in range(k))  # noqa: E731
    if kind == "EMAIL":
        return f"{rng.choice(WORDS)}.{rng.choice(WORDS)}{d(2)}@{rng.choice(WORDS)}-mail.{rng.choice(['com', 'org', 'co.uk', 'de'])}"
    if kind == "PHONE":
        return rng.choice([f"+1 {d(3)} {d(3)} {d(4)}", f"+44 20 {d(4)} {d(4)}", f"+49 30 {d(8)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
                           f"({rng.randint(200, 989)}) {d(3)}-{d(4)}", f"{rng.randint(200, 989)}-{d(3)}-{d(4)}",
                           f"{rng.randint(200, 989)}.{d(3)}.{d(4)}", f"+91-{d(5)}-{d(5)}", f"020 {d(4)} {d(4)}", f"+81 3-{d(4)}-{d(4)}"])
    if kind == "IP":
        if rng.random() < 0.5:
            return ".".join(str(rng.randint(1, 254)) for _ in range(4))
        groups = [f"{rng.randint(0, 65535):x}" for _ in range(8)]
        return ":".join(groups) if rng.random() < 0.5 else f"2001:db8::{groups[0]}:{rng.randint(1, 9999)}"
    if kind == "CREDIT_CARD":
        number = card(rng, *rng.choice([("4", 16), ("51", 16), ("55", 16), ("37", 15), ("6011", 16), ("2221", 16)]))
        sep = rng.choice(["", " ", "-"])
        return sep.join(number[i:i + 4] for i in range(0, len(number), 4)) if sep else number
    if kind == "SSN":
        return f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    if kind == "IBAN":
        return iban(rng)
    if kind == "SECRET":
        a = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        s = lambda k: "".join(rng.choice(a) for _ in range(k))  # noqa: E731
        return rng.choice([f"AKIA{s(16).upper()}", f"ghp_{s(36)}", f"xoxb-{d(11)}-{s(24)}", f"AIza{s(35)}",
                           f"sk_live_{s(24)}", f"sk-proj-{s(40)}", f"hf_{s(34)}", f"eyJ{s(20)}.eyJ{s(30)}.{s(40)}"])


def look_alike(rng):
    """Numbers that are not personal data and must stay as written."""
    d = lambda k: "".join(str(rng.randint(0, 9)) for _ in range(k))  # noqa: E731
    return rng.choice([
        f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",  # ISO date
        f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/{rng.randint(1990, 2030)}", f"{rng.randint(1, 28)}.{rng.randint(1, 12)}.{rng.randint(1990, 2030)}",
        f"version {rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}", f"v{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 999)}",
        f"${rng.randint(1, 9)},{d(3)}.{d(2)}", f"€{rng.randint(1, 999)}.{d(2)}", f"{rng.randint(1, 99)}:{d(2)}:{d(2)}",
        f"ISBN 978-{rng.randint(0, 1)}-{d(3)}-{d(5)}-{rng.randint(0, 9)}", f"ISBN 0-{d(3)}-{d(5)}-{rng.randint(0, 9)}",
        f"ISBN 978{d(10)}", f"{rng.randint(1, 9)},{d(3)},{d(3)},{d(3)} people", f"order {d(9)}", f"{rng.randint(1, 9)}{d(11)} visitors",
        f"{rng.randint(1900, 2000)}-{rng.randint(2001, 2030)}", f"{rng.randint(1, 99)}.{d(6)} percent", f"page {rng.randint(1, 999)}",
        f"1.{d(3)}.{d(3)}", f"{d(2)}-{d(2)}-{d(4)}"])


# ------------------------------------------------------------------------------------------------------
# stages on their own

@pytest.mark.parametrize("kind", pii.KINDS)
def test_pii_recall_per_kind(kind):
    rng = random.Random(kind)
    found = 0
    for _ in range(200):
        value = pii_samples(rng, kind)
        text, counts = pii.redact(f"Please write to me, my number is {value}, thanks.")
        found += text == f"Please write to me, my number is <{kind}>, thanks." and counts == {kind: 1}
    assert found / 200 >= 0.98, f"{kind}: recall {found / 200:.3f}"


def test_pii_leaves_look_alikes():
    rng = random.Random(1)
    texts = [f"On the record, {look_alike(rng)} and {look_alike(rng)} were noted." for _ in range(1000)]
    changed = [t for t in texts if pii.redact(t)[0] != t]
    assert len(changed) <= 10, changed[:10]  # <= 1%


def test_cleanup_repairs_and_strips():
    cfg = curate.DEFAULTS
    text, changes = stages.cleanup("The cafÃ© is open.\u200b\r\nSkip to content\n\n\n\nShe  said\u00a0hello.", set(), cfg)
    assert text == "The café is open.\n\nShe said hello."
    assert changes == ["mojibake", "invisible_chars", "whitespace", "boilerplate_lines"]
    html = "<html><head><script>var x=1;</script></head><body><p>First para.</p><div>Second &amp; last.</div></body></html>"
    assert stages.cleanup(html, set(), cfg)[0] == "First para.\n\nSecond & last."
    repeated = stages.repeated_lines(["Menu Home\nreal text one", "menu  home\nother", "Menu Home\nthird"], 3)
    assert stages.cleanup("Menu Home\nThe text stays.", repeated, cfg)[0] == "The text stays."
    rng = random.Random(0)
    clean = [document(rng) for _ in range(200)]
    assert all(stages.cleanup(t, set(), cfg) == (t, []) for t in clean)  # clean text is not touched


def test_language_and_quality():
    cfg = curate.DEFAULTS
    rng = random.Random(2)
    clean = [document(rng) for _ in range(300)]
    langs = [stages.language(t) for t in clean]
    assert sum(code != "en" or p < cfg["min_language_confidence"] for code, p in langs) <= 3
    assert stages.language("Le chat est sur la table et il dort depuis ce matin.")[0] == "fr"
    assert sum(stages.quality_reason(t, "en", cfg) is not None for t in clean) <= 3
    assert stages.quality_reason("Too short to be a page.", "en", cfg) == "quality:min_words"
    assert stages.quality_reason("\n".join(["Buy now and save big today on all of the items."] * 20), "en", cfg) == "quality:duplicate_lines"
    assert stages.quality_reason(" ".join(["#tag"] * 80), "en", cfg) is not None
    no_stops = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(8))
    assert stages.quality_reason(no_stops, "en", cfg) == "quality:stop_words"


def test_harmful_lists(tmp_path):
    cfg = curate.DEFAULTS
    words = stages.read_list(cfg["blocklist_words"])
    domains = stages.read_list(cfg["blocklist_domains"])
    rng = random.Random(3)
    text = document(rng)
    assert stages.harmful_reason(text, "https://example.org/a", words, domains, cfg) is None
    assert stages.harmful_reason(text, "https://www.pornhub.com/x", words, domains, cfg) == "harmful:domain"
    assert stages.harmful_reason(text, "de.xhamster.com/x", words, domains, cfg) == "harmful:domain"
    assert stages.harmful_reason(text + " porn xxx hardcore sex.", "", words, domains, cfg) == "harmful:words"
    assert stages.harmful_reason(text + " one porn mention.", "", words, domains, cfg) is None  # below the threshold
    mine = tmp_path / "mine.txt"
    mine.write_text("# a user's list\nzebra crossing\n")
    assert stages.harmful_reason("zebra crossing " * 3, "", stages.read_list(str(mine)), set(), cfg) == "harmful:words"


def test_split_hash_is_stable():
    assert stages.split_hash("a document", 0) == stages.split_hash("a document", 0)
    assert stages.split_hash("a document", 0) != stages.split_hash("a document", 1)
    rng = random.Random(4)
    share = sum(stages.split_hash(document(rng, 3), 0) < 0.1 for _ in range(2000)) / 2000
    assert 0.07 < share < 0.13


def test_near_duplicates_are_whole_components():
    """A chain of similar pages (a ~ b ~ c, a not ~ c) goes as one: only its first document stays; the
    labels are each document's smallest connected one, for any graph (checked against union-find)."""
    index = np.array([0, 2, 5, 7])
    u, v = stages.band_edges(index, np.array([9, 4, 9, 1], np.uint64))  # one band: 5 shares 0's bucket
    assert (u.tolist(), v.tolist()) == ([5], [0])
    # band 1 joins 0 and 2, band 2 joins 2 and 7: the chain 0 - 2 - 7 (0 and 7 share no band)
    edges = [stages.band_edges(index, np.array(keys, np.uint64)) for keys in ([1, 1, 3, 4], [5, 6, 7, 6])]
    root = stages.components(np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges]), 8)
    assert root.tolist() == [0, 1, 0, 3, 4, 5, 6, 0]
    rng = np.random.default_rng(1)
    for _ in range(30):
        n, m = int(rng.integers(1, 120)), int(rng.integers(0, 200))
        u, v = rng.integers(0, n, m), rng.integers(0, n, m)
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                x = parent[x]
            return x
        for a, b in zip(u.tolist(), v.tolist()):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
        smallest = {}
        for i in range(n):
            smallest.setdefault(find(i), i)
        assert stages.components(u, v, n).tolist() == [smallest[find(i)] for i in range(n)]


# ------------------------------------------------------------------------------------------------------
# the whole pipeline, on a corpus with planted duplicates and personal data

def corpus(rng):
    """(rows, expected): rows for a JSONL file; expected maps each id to 'clean', 'dup', 'pii:KIND' or 'alike'."""
    rows, expected = [], {}
    base = [document(rng) for _ in range(300)]
    for i, text in enumerate(base):
        rows.append({"id": f"base{i}", "text": text, "metadata": {"url": f"https://site{i}.example/page"}})
        expected[f"base{i}"] = "clean"
    for i in range(60):  # exact duplicates, up to case and spacing
        text = rng.choice(base[:150])
        rows.append({"id": f"exact{i}", "text": text.upper() if i % 2 else text.replace(" ", "  "), "metadata": {"url": ""}})
        expected[f"exact{i}"] = "dup"
    for i in range(60):  # near-duplicates: 5-10% of words changed
        rows.append({"id": f"near{i}", "text": perturb(rng, base[150 + i], rng.uniform(0.05, 0.10)), "metadata": {"url": ""}})
        expected[f"near{i}"] = "dup"
    for kind in pii.KINDS:
        for i in range(15):
            value = pii_samples(rng, kind)
            rows.append({"id": f"pii{kind}{i}", "text": document(rng) + f"\nYou can reach the office at {value} today.",
                         "metadata": {"url": ""}})
            expected[f"pii{kind}{i}"] = f"pii:{kind}"
    for i in range(100):
        rows.append({"id": f"alike{i}", "text": document(rng) + f"\nIt was {look_alike(rng)} and then {look_alike(rng)} later.",
                     "metadata": {"url": ""}})
        expected[f"alike{i}"] = "alike"
    return rows, expected


def write_jsonl(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_output(folder):
    docs = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".jsonl.gz"):
            with gzip.open(os.path.join(folder, name), "rt", encoding="utf-8") as f:
                for line in f:
                    d = json.loads(line)
                    docs[d["id"]] = (name.split("-")[0], d["text"])
    return docs


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(5)
    rows, expected = corpus(rng)
    folder = tmp_path_factory.mktemp("raw")
    write_jsonl(folder / "part0.jsonl.gz", rows[:400])
    write_jsonl(folder / "part1.jsonl.gz", rows[400:])
    return folder, rows, expected


def test_pipeline_on_planted_corpus(planted, tmp_path):
    folder, rows, expected = planted
    cfg = dict(curate.DEFAULTS, val_fraction=0.05, map_chunk_docs=300)  # chunks: ids and order must survive them
    dset = load_documents([str(folder / "part0.jsonl.gz"), str(folder / "part1.jsonl.gz")], cfg, str(tmp_path / "cache"), 1)
    report = pipeline.run(dset, cfg, str(tmp_path), 1)
    out = read_output(tmp_path)
    source = {r["id"]: r["text"] for r in rows}
    s = report["summary"]
    assert s["documents_in"] == len(rows) == s["kept"] + s["dropped"]
    assert s["kept"] == len(out) and s["val_documents"] == sum(split == "val" for split, _ in out.values()) > 0
    dups = [i for i, e in expected.items() if e == "dup"]
    assert sum(i not in out for i in dups) / len(dups) >= 0.95  # duplicate recall
    clean = [i for i, e in expected.items() if e in ("clean", "alike")]
    wrong = [i for i in clean if i not in out or out[i][1] != source[i]]
    assert len(wrong) <= 0.01 * len(clean), wrong  # clean documents dropped or altered
    for kind in pii.KINDS:
        ids = [i for i, e in expected.items() if e == f"pii:{kind}"]
        hits = sum(i in out and f"<{kind}>" in out[i][1] for i in ids)
        assert hits / len(ids) >= 0.98, kind
    assert report["stages"][-1]["replaced"] == {k: 15 for k in pii.KINDS}
    assert report["drop_reasons"]["dedup:exact"] + report["drop_reasons"]["dedup:near"] >= 114
    assert all(len(v) <= cfg["examples_per_reason"] for v in report["examples"].values())


def test_model_perplexity_filter(tmp_path):
    """A tiny character model trained here on trusted prose keeps prose and drops word salad."""
    import torch
    from nanoforge import checkpoint
    from model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer
    rng = random.Random(6)
    trusted = " ".join(document(rng) for _ in range(40)).lower()
    tok = CharTokenizer.from_text(trusted + "\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, dropout=0.0))
    data = torch.tensor(tok.encode(trusted))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (16,))
        x = torch.stack([data[s:s + 64] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1:s + 65] for s in starts])  # (B, T)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    checkpoint.save_checkpoint(str(tmp_path / "ckpt.pt"), model, {"tokenizer": tok.spec})
    good = [document(rng).lower() for _ in range(20)]
    salad = ["\n".join(" ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(3, 8))) for _ in range(12)) + "."
                       for _ in range(8)) for _ in range(20)]
    rows = [{"id": f"g{i}", "text": t} for i, t in enumerate(good)] + [{"id": f"s{i}", "text": t} for i, t in enumerate(salad)]
    write_jsonl(tmp_path / "in.jsonl.gz", rows)
    cfg = dict(curate.DEFAULTS, language_filter=False, quality_filter=False, model_filter=True,
               model_source=str(tmp_path), model_keep_fraction=0.5, val_fraction=0.0, url_field="")
    dset = load_documents([str(tmp_path / "in.jsonl.gz")], cfg, str(tmp_path / "cache"), 1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = pipeline.run(dset, cfg, str(out_dir), 1)
    assert sorted(read_output(out_dir)) == sorted(f"g{i}" for i in range(20))
    assert report["drop_reasons"] == {"model:perplexity": 20}


def test_load_errors(tmp_path):
    cfg = dict(curate.DEFAULTS)
    write_jsonl(tmp_path / "a.jsonl.gz", [{"body": "hello"}])
    with pytest.raises(UserError, match="no field 'text'.*body"):
        load_documents([str(tmp_path / "a.jsonl.gz")], cfg, str(tmp_path / "c1"), 1)
    # bytes that are not UTF-8: in JSON lines a counted reason (the rest goes on), in a .txt file an error
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "caf\xe9 latin-1"}\n{"text": "fine"}\n')
    dset = load_documents([str(tmp_path / "b.jsonl")], dict(cfg, quality_filter=False, language_filter=False), str(tmp_path / "c2"), 1)
    (tmp_path / "out").mkdir()
    report = pipeline.run(dset, dict(cfg, quality_filter=False, language_filter=False), str(tmp_path / "out"), 1)
    assert report["drop_reasons"] == {"input:not_utf8": 1} and report["summary"]["kept"] == 1
    (tmp_path / "d.txt").write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(UserError, match="(?i)utf-8") as e:
        load_documents([str(tmp_path / "d.txt")], cfg, str(tmp_path / "c4"), 1)
    assert f"input {tmp_path / 'd.txt'}:" in str(e.value)  # the file it failed on
    # a line that is not JSON, in the second of two files: the error names that file and line
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(UserError, match=f"input {tmp_path / 'bad.jsonl'} line 3: "):
        load_documents([str(tmp_path / "good.jsonl"), str(tmp_path / "bad.jsonl")], cfg, str(tmp_path / "c5"), 1)
    write_jsonl(tmp_path / "c.jsonl.gz", [{"text": 12}])
    with pytest.raises(UserError, match="not text"):
        load_documents([str(tmp_path / "c.jsonl.gz")], cfg, str(tmp_path / "c3"), 1)



def test_inputs_at_urls_read_as_the_same_files(planted, tmp_path):
    """s3://, gs://, hf:// go through fsspec; file:// takes the same code path, so it stands in for them here."""
    raw, rows, _ = planted
    folder = tmp_path / "raw"
    shutil.copytree(raw, folder)
    (folder / "notes.md").write_text("a note\n")  # skipped by kind, either way
    local, found = find_files([str(folder)], parse_ext(".jsonl,.jsonl.gz"))
    urls, found_at_url = find_files([folder.as_uri()], parse_ext(".jsonl,.jsonl.gz"))
    assert urls == [pathlib.Path(p).as_uri() for p in local] and len(local) == 2 and found_at_url == found
    cfg = dict(curate.DEFAULTS)
    a = load_documents(local, cfg, str(tmp_path / "c1"), 1)
    b = load_documents(urls, cfg, str(tmp_path / "c2"), 1)
    assert a.to_list() == b.to_list() and len(a) == len(rows)
    # the errors name the URL: a missing one, a line that is not JSON, a protocol whose package is missing
    with pytest.raises(UserError, match="not found"):
        find_files([(tmp_path / "missing").as_uri()])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(UserError, match=f"input {(tmp_path / 'bad.jsonl').as_uri()} line 3: "):
        load_documents([(tmp_path / "bad.jsonl").as_uri()], cfg, str(tmp_path / "c3"), 1)
    with pytest.raises(UserError, match="cannot read nosuchprotocol://bucket/x"):
        find_files(["nosuchprotocol://bucket/x"])
    assert not is_hub("hf://datasets/owner/name/train.parquet") and is_hub("hf:owner/name")


def test_hub_dataset_input(tmp_path):
    """A Hugging Face dataset goes through load_dataset: tested offline on a local folder of parquet files
    (hf:FOLDER, the same path a hub name takes), whole and streamed; a hub name offline is one error line."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(8)
    texts = [document(rng) for _ in range(30)]
    folder = tmp_path / "hub"
    folder.mkdir()
    table = pa.table({"uid": [f"d{i}" for i in range(30)], "content": texts, "url": [f"https://s{i}.example" for i in range(30)]})
    pq.write_table(table.slice(0, 12), folder / "part-0.parquet")
    pq.write_table(table.slice(12), folder / "part-1.parquet")
    assert is_hub("HuggingFaceFW/fineweb-edu") and is_hub(f"hf:{folder}") and not is_hub(str(folder))
    cfg = dict(curate.DEFAULTS, text_field="content", id_field="uid", url_field="url")
    whole = load_documents([], cfg, str(tmp_path / "c1"), 1, hub=[f"hf:{folder}"])
    assert whole["id"] == [f"d{i}" for i in range(30)] and whole["text"] == texts
    assert whole["url"] == [f"https://s{i}.example" for i in range(30)]
    streamed = load_documents([], dict(cfg, hf_max_documents=5), str(tmp_path / "c2"), 1, hub=[f"hf:{folder}"])
    assert streamed["text"] == texts[:5]
    with pytest.raises(UserError, match="no field 'text'.*content"):
        load_documents([], curate.DEFAULTS, str(tmp_path / "c3"), 1, hub=[f"hf:{folder}"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    result = run_curate("--input=HuggingFaceFW/fineweb-edu", "--hf_config=sample-10BT", f"--output={tmp_path / 'x'}")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "could not load the Hugging Face dataset HuggingFaceFW/fineweb-edu" in lines[0]
    assert not (tmp_path / "x").exists()


def test_classifier_filter(tmp_path):
    """The DCLM-style classifier, trained on a reference set of prose against the raw corpus, keeps the
    prose-like documents and drops the keyword spam; training twice gives the same scores."""
    rng = random.Random(9)
    reference = tmp_path / "reference.txt"  # documents separated by blank lines, as in TinyStories
    reference.write_text("\n\n".join(document(rng) for _ in range(60)) + "\n")
    spam_words = ("buy cheap best price deal discount casino bonus free shipping click here now online "
                  "offer sale download coupon login signup win prize crypto loans").split()
    good = [document(rng) for _ in range(20)]
    junk = [". ".join(" ".join(rng.choice(spam_words) for _ in range(10)) for _ in range(12)) + "." for _ in range(20)]
    rows = [{"id": f"g{i}", "text": t} for i, t in enumerate(good)] + [{"id": f"j{i}", "text": t} for i, t in enumerate(junk)]
    rng.shuffle(rows)
    write_jsonl(tmp_path / "in.jsonl.gz", rows)
    cfg = dict(curate.DEFAULTS, language_filter=False, quality_filter=False, harmful_filter=False, near_dedup=False,
               classifier_keep_fraction=0.5, val_fraction=0.0, url_field="")
    dset = load_documents([str(tmp_path / "in.jsonl.gz")], cfg, str(tmp_path / "cache"), 1)
    ref = load_documents([str(reference)], dict(cfg, txt_split="blank"), str(tmp_path / "ref"), 1)
    web = pipeline.first_texts(dset, cfg["classifier_train_docs"])
    model = pipeline.train_classifier(ref, web, cfg)
    again = pipeline.train_classifier(ref, web, cfg)
    scores = [quality.score(model, r["text"]) for r in rows]
    assert scores == [quality.score(again, r["text"]) for r in rows]  # deterministic
    assert min(s for s, r in zip(scores, rows) if r["id"][0] == "g") > max(s for s, r in zip(scores, rows) if r["id"][0] == "j")
    with pytest.raises(UserError, match="0 reference and 40 web"):  # raised in the child, re-raised here
        pipeline.train_classifier(dset.select([]), web, cfg)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = pipeline.run(dset, cfg, str(out_dir), 1, classifier=model)
    assert sorted(read_output(out_dir)) == sorted(f"g{i}" for i in range(20))
    assert report["drop_reasons"] == {"model:classifier": 20}  # every document counted
    assert report["summary"]["kept"] + report["summary"]["dropped"] == len(rows)
    assert all(e["id"].startswith("j") and 0 <= e["score"] < report["classifier"]["lowest_score_kept"]
               for e in report["examples"]["model:classifier"])

def test_report_shows_what_cleanup_changed(planted, tmp_path):
    # report.md's cleanup row gives an excerpt of a change: here the cookie line cleanup removed
    folder, rows, expected = planted
    clean = [r for r in rows if expected[r["id"]] == "clean"][:20]
    clean[3] = dict(clean[3], text=clean[3]["text"] + "\nWe use cookies to improve your experience")
    write_jsonl(tmp_path / "docs.jsonl.gz", clean)
    cfg = dict(curate.DEFAULTS, val_fraction=0.1)
    os.makedirs(tmp_path / "out")
    report = pipeline.run(load_documents([str(tmp_path / "docs.jsonl.gz")], cfg, str(tmp_path / "cache"), 1),
                          cfg, str(tmp_path / "out"), 1)
    assert report["examples"]["cleanup"] == [{"id": clean[3]["id"], "changes": "boilerplate_lines",
                                              "excerpt": "removed: We use cookies to improve your experience"}]
    os.makedirs(tmp_path / "md")
    write_report(report, str(tmp_path / "md"))
    assert "e.g. removed: We use cookies" in (tmp_path / "md" / "report.md").read_text()


def run_curate(*args, cwd=None):
    return run("curate.py", *args, check=False, cwd=cwd or os.getcwd(), env=dict(os.environ, HF_DATASETS_OFFLINE="1"))


@pytest.mark.slow
def test_cli_deterministic_and_careful(planted, tmp_path):
    folder, rows, _ = planted
    args = [os.path.join(ROOT, "config", "curate_web.py"), f"--input={folder}", "--num_proc=2"]
    first, second = tmp_path / "first" / "curated", tmp_path / "second" / "curated"
    for out in (first, second):  # the same config (a relative --output) run from two working folders
        out.parent.mkdir()
        result = run_curate(*args, "--output=curated", cwd=out.parent)
        assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second))
    assert {"report.json", "report.md", "lengths.png", "train-00000.jsonl.gz", "val-00000.jsonl.gz"} <= set(names)
    for name in names:  # byte-identical, the report and the plot included
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # the output named by a URL (file:// takes fsspec's path, as s3:// and gs:// do): built here, published
    # there when whole, the same files (the report names its output); an existing one refused
    at_url = tmp_path / "bucket" / "curated"
    result = run_curate(*args, f"--output={at_url.as_uri()}")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(at_url)) == names and os.listdir(at_url.parent) == ["curated"]
    for name in names:
        want = (first / name).read_bytes()
        if name == "report.json":
            want = want.replace(b'"output": "curated"', f'"output": "{at_url.as_uri()}"'.encode())
        assert (at_url / name).read_bytes() == want, name
    result = run_curate(*args, f"--output={at_url.as_uri()}")
    assert result.returncode == 2 and "exists" in result.stderr and "Traceback" not in result.stderr
    result = run_curate(*args, "--output=nosuchprotocol://bucket/curated")  # or s3:// without s3fs
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: cannot use nosuchprotocol://bucket/curated: Protocol not known: nosuchprotocol"), result.stderr
    report = json.loads((first / "report.json").read_text())
    assert report["summary"]["documents_in"] == len(rows)
    # the stages' columns add up: each stage takes in what the one before put out, the first takes the input
    # and the last gives the output; every drop reason is explained in report.md, cleanup shows an example
    stages = report["stages"]
    assert stages[0]["bytes_in"] == report["summary"]["bytes_in"] and stages[-1]["bytes_out"] == report["summary"]["bytes_out"]
    for a, b in zip(stages, stages[1:]):
        assert (a["docs_out"], a["bytes_out"]) == (b["docs_in"], b["bytes_in"]), (a["stage"], b["stage"])
    md = (first / "report.md").read_text()
    for reason in report["drop_reasons"]:
        assert f"{explain(reason)} (`{reason}`)" in md
    assert os.listdir(first.parent) == ["curated"]  # no temporary folder left behind
    # an existing output is refused, and replaced only when asked
    result = run_curate(*args, f"--output={first}")
    assert result.returncode == 2 and "exists" in result.stderr and "Traceback" not in result.stderr
    (first / "stale.txt").write_text("old")
    result = run_curate(*args, f"--output={first}", "--overwrite=True")
    assert result.returncode == 0, result.stderr
    assert "stale.txt" not in os.listdir(first)
    # bad input: one line, nothing written
    for bad, words in ((f"--input={tmp_path / 'missing'}", "not found"), (f"--input={first / 'lengths.png'}", "unknown kind")):
        result = run_curate(*args[:1], bad, f"--output={tmp_path / 'x'}")
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.jsonl").write_text("")
    result = run_curate(f"--input={empty}", f"--output={tmp_path / 'x'}")
    assert result.returncode == 2 and "empty" in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()


def test_stage_6_cut_keeps_the_best_fraction_less_those_below_the_floor():
    """pipeline.rank_order and ranked_cut, which both engines' passes use, against the rule written as a
    loop over every document: best first (ties in input order), the first `keep` kept unless below the floor."""
    rng = random.Random(7)
    for trial in range(200):
        n = rng.randint(1, 40)
        index = np.array(sorted(rng.sample(range(1000), n)), np.int64)
        score = np.array([rng.choice([0.1, 0.5, 0.9, rng.random()]) for _ in range(n)])  # ties, often
        highest = trial % 2 == 0
        floor = rng.choice([None, 0.3]) if highest else None
        keep = rng.randint(1, n)
        order = pipeline.rank_order(index, score, highest)
        got = pipeline.ranked_cut(index[order], score[order], keep, highest, floor)
        ranked = sorted(range(n), key=lambda j: (-score[j] if highest else score[j], index[j]))
        dropped, last = [], None
        for rank, j in enumerate(ranked):
            if rank >= keep or (floor is not None and score[j] < floor):
                dropped.append((int(index[j]), float(score[j])))
            else:
                last = float(score[j])
        assert got == (dropped, last)
