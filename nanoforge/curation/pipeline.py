"""
curate.py's machinery (corpus.load_documents reads the input): run the per-document stages of stages.py
and pii.py in a parallel map, then the corpus-wide passes (deduplication, model scores, split) over compact
keys, write the shards and the report. Every input document ends with one status: '' (kept) or the reason
it was dropped; kept documents list what changed them.
"""
import functools
import gzip
import json
import math
import os
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nanoforge import files
from nanoforge.corpus import shard_name
from nanoforge.curation import pii
from nanoforge.curation import quality
from nanoforge.curation import stages
from nanoforge.curation.report import SNIPPET, build_report


def process(batch, indices, repeated, words, domains, cfg, offset=0, classifier=None):
    """The per-document stages 1-4 and 7 (PII) on a batch, plus the dedup keys of the text before PII (stage 5
    runs later, corpus-wide; PII replacements are only counted for documents that survive it), and stage 6's
    numbers: the quality classifier's score and the perplexity under the model of trusted text (stage 6
    keeps the best of them corpus-wide)."""
    out = defaultdict(list)
    repeated = frozenset(repeated)  # a sorted list in fn_kwargs (datasets hashes it); a set to look up
    languages = set(cfg["languages"].split(","))
    kinds = set(cfg["pii_kinds"].split(","))
    # the batch is an Arrow table, its strings taken as bytes: Arrow's JSON reader lets bytes that are not
    # UTF-8 into a string column, and decoding them to str would crash halfway; each document is decoded
    # here and the bad ones counted. (Casting the whole corpus up front would read all of it once more.)
    as_bytes = lambda name: pc.cast(batch.column(name), pa.large_binary()).to_pylist()  # noqa: E731
    for i, data, url, doc_id in zip((offset + j for j in indices), as_bytes("text"), as_bytes("url"), as_bytes("id")):
        status, changes, lang, conf, pii_counts = "", [], "", 0.0, {}
        url, doc_id = (url or b"").decode("utf-8", "replace"), (doc_id or b"").decode("utf-8", "replace")
        try:
            raw = (data or b"").decode("utf-8")  # a missing value in a JSON line is an empty document
        except UnicodeDecodeError:
            raw, status = data.decode("utf-8", "replace"), "input:not_utf8"
        text = raw
        if cfg["cleanup"] and not status:
            text, changes = stages.cleanup(text, repeated, cfg)
        if not status and not text.strip():
            status = "empty" if not raw.strip() else "cleanup:nothing_left"
        if not status and (cfg["language_filter"] or cfg["quality_filter"]):
            lang, conf = stages.language(text)
            if cfg["language_filter"] and lang not in languages:
                status = f"language:not_{'_'.join(sorted(languages))}"
            elif cfg["language_filter"] and conf < cfg["min_language_confidence"]:
                status = "language:low_confidence"
        if not status and cfg["quality_filter"]:
            status = stages.quality_reason(text, lang, cfg) or ""
        if not status and cfg["harmful_filter"]:
            status = stages.harmful_reason(text, url, words, domains, cfg) or ""
        exact, sig, final, score = 0, [], text, -1.0
        if not status:
            if classifier is not None:
                score = quality.score(classifier, text)
            exact = stages.dedup_key(text)
            if cfg["near_dedup"]:
                sig = stages.minhash(text, cfg["minhash_num_perm"], cfg["minhash_shingle_size"], cfg["minhash_seed"])
            if cfg["pii"]:
                final, pii_counts = pii.redact(text, kinds)
        out["id"].append(doc_id or f"#{i}")
        out["text"].append(final if not status else "")  # dropped documents' text is not carried on
        if status:
            snippet = " ".join(raw[:SNIPPET].split())
        elif changes:  # a kept document: the first line cleanup took out, or else rewrote, for the report
            kept = {" ".join(line.split()) for line in text.splitlines()}  # re-spacing is not removing
            removed = (s for s in (" ".join(line.split()) for line in raw.splitlines()) if s and s not in kept)
            before = set(raw.splitlines())
            rewritten = (line for line in text.splitlines() if line.strip() and line not in before)
            snippet = next((f"removed: {s[:SNIPPET]}" for s in removed), "") or next(
                (f"now reads: {line[:SNIPPET]}" for line in rewritten), "")
        else:
            snippet = ""
        out["snippet"].append(snippet)
        out["status"].append(status)
        out["changes"].append(",".join(changes))
        out["pii"].append(json.dumps(pii_counts, sort_keys=True) if pii_counts else "")
        out["lang"].append(lang)
        out["exact"].append(exact)
        out["minhash"].append(sig)
        out["bytes_in"].append(len(raw.encode("utf-8", "surrogatepass")))
        out["bytes_clean"].append(len(text.encode("utf-8", "surrogatepass")))
        out["bytes_out"].append(len(final.encode("utf-8", "surrogatepass")) if not status else 0)
        out["split"].append(stages.split_hash(final, cfg["split_seed"]) if not status else 1.0)  # stage 8's number
        out["score"].append(score)
    out["perplexity"] = [-1.0] * len(out["status"])
    if cfg["model_filter"]:  # the kept text, as it will be written (after PII)
        import torch
        model, tok = trusted_model(cfg["model_source"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one thread: the same number in every engine's workers, whatever their threads
        try:
            out["perplexity"] = [stages.perplexity(model, tok, t, cfg["model_max_tokens"]) if not status else -1.0
                                 for t, status in zip(out["text"], out["status"])]
        finally:
            torch.set_num_threads(threads)
    return dict(out)


@functools.lru_cache(maxsize=1)
def trusted_model(source):
    """Stage 6's model of trusted text and its tokenizer, loaded once in each process that scores."""
    from nanoforge import checkpoint
    from nanoforge.tokenizer import load_tokenizer
    model, spec, _ = checkpoint.load_model(source)
    return model.eval(), load_tokenizer(spec)


def features():
    import datasets
    v = datasets.Value
    return datasets.Features({"id": v("string"), "text": v("string"), "snippet": v("string"), "status": v("string"),
                              "changes": v("string"), "pii": v("string"), "lang": v("string"), "exact": v("int64"),
                              "minhash": datasets.Sequence(v("uint32")), "bytes_in": v("int64"),
                              "bytes_clean": v("int64"), "bytes_out": v("int64"), "split": v("float64"),
                              "score": v("float64"), "perplexity": v("float64")})


def columns(files, names, n):
    """Yields (row index, row dict) over the chosen columns of a map's output, read from its Arrow stream
    files with plain reads rather than through datasets, whose memory map of them would leave the pages of
    a corpus read once counted in this process's memory (RSS) until the end."""
    i = 0
    for f in files:
        with pa.OSFile(f) as source:
            for batch in pa.ipc.open_stream(source):
                cols = {name: batch.column(name).to_pylist() for name in names}
                for j in range(batch.num_rows):
                    yield i, {name: cols[name][j] for name in names}
                    i += 1
    assert i == n, f"read {i} rows of {n} from the map's files"


def in_child(fn, *args):
    """fn(*args) in a forked child process, its result (or its exception) sent back: the pages of the
    corpus it reads are mapped in the child, which exits, and never count in this process's memory."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")  # the child inherits the arguments (a dataset) instead of unpickling them
    recv, send = ctx.Pipe(duplex=False)

    def child():
        try:
            send.send((True, fn(*args)))
        except Exception as e:  # a UserError stays one line in the parent
            send.send((False, e))
        send.close()
    proc = ctx.Process(target=child)
    proc.start()
    send.close()
    try:
        ok, result = recv.recv()
    except EOFError:  # killed, out of memory, ...
        ok, result = False, RuntimeError(f"the child process for {fn.__name__} died")
    proc.join()
    if not ok:
        raise result
    return result


def texts_of(table):
    """A table's documents as str, bytes that are not UTF-8 replaced (process counts them; a sample may not fail)."""
    raw = pc.cast(table.column("text"), pa.large_binary()).to_pylist()
    return [t.decode("utf-8", "replace") if t else "" for t in raw]


def first_texts(dset, n):
    """The texts of a dataset's first n documents."""
    head = dset.select(range(min(len(dset), n))).select_columns(["text"]).with_format("arrow")
    return [t for batch in head.iter(batch_size=1000) for t in texts_of(batch)]


def sample_repeated_lines(dset, cfg):
    """Stage 1's repeated lines, counted on the first repeated_line_sample documents."""
    return stages.repeated_lines(first_texts(dset, cfg["repeated_line_sample"]), cfg["repeated_line_min_docs"])


def train_classifier(reference, corpus_texts, cfg):
    """Stage 7's classifier, trained on the first classifier_train_docs documents of the reference set and
    of the corpus (corpus_texts: its first ones), in a child process, so the pages of the reference it
    reads stay out of this one's memory."""
    k = cfg["classifier_train_docs"]
    return in_child(lambda: quality.train(first_texts(reference, k), corpus_texts[:k]))


def blocklists(cfg):
    """Stage 4's word and domain lists (empty with the filter off), sorted: the map's arguments."""
    if not cfg["harmful_filter"]:
        return [], []
    return sorted(stages.read_list(cfg["blocklist_words"])), sorted(stages.read_list(cfg["blocklist_domains"]))


def run(dset, cfg, out, num_proc, classifier=None):
    """All stages on dset (with the stage 6 classifier when given), on this machine: the per-document stages
    in a datasets map over num_proc processes, then finish(). Writes the shards to `out`, returns the report."""
    n = len(dset)
    # stage 1 needs the lines repeated across documents: counted on a bounded sample, before the map
    repeated = set()
    if cfg["cleanup"] and cfg["repeated_line_min_docs"] > 0:
        repeated = in_child(sample_repeated_lines, dset, cfg)
    words, domains = blocklists(cfg)
    # in chunks of map_chunk_docs: each chunk gets fresh worker processes, so the pages of the corpus a
    # worker has read (memory-mapped Arrow, counted in its memory) never add up past one chunk's share
    kwargs = {"repeated": sorted(repeated), "words": words, "domains": domains, "cfg": cfg, "classifier": classifier}
    # Only the names of each chunk's output files are kept: the dataset datasets hands back has its files
    # memory-mapped and their pages touched (read_all), so it is dropped at once and its map closed.
    files, chunk = [], cfg["map_chunk_docs"]
    for start in range(0, n, chunk):
        part = dset.select(range(start, min(n, start + chunk)))  # contiguous: a slice of the Arrow table
        done = part.with_format("arrow").map(process, with_indices=True, batched=True, batch_size=64, remove_columns=part.column_names,
                              fn_kwargs=dict(kwargs, offset=start), features=features(),
                              num_proc=min(num_proc, max(1, len(part) // 64)),
                              desc=f"cleanup, language, quality, harmful, PII ({start:,}-{start + len(part):,} of {n:,})")
        assert len(done) == len(part), f"the map returned {len(done)} rows for {len(part)}"
        files += [c["filename"] for c in done.cache_files]
        del done, part
    return finish(LocalPasses(lambda names: columns(files, names, n)), n, cfg, out, classifier)


SHARD_COLUMNS = ["id", "text", "pii", "changes", "snippet"]  # what a shard's writer reads of a document


def finish(passes, n, cfg, out, classifier=None):
    """The corpus-wide passes over the per-document stages' output (stages 5, 6 and 8), then the shards and
    the report, for n documents. `passes` is the engine's access to that output: LocalPasses here, over
    the map's files; on Ray, curation/on_ray.py's, whose deduplication and shard writing run on the
    workers. Both give the same statuses, shards and report. Writes the shards to `out`, returns the report."""
    ex = defaultdict(list)  # reason -> a few examples

    def example(key, item):
        if len(ex[key]) < cfg["examples_per_reason"]:
            ex[key].append(item)

    status = []
    lengths_in, lengths_clean, lengths_out = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    split = np.ones(n)
    for i, row in passes.rows(["id", "status", "snippet", "bytes_in", "bytes_clean", "bytes_out", "split", "changes"]):
        s = row["status"]
        lengths_in[i], lengths_clean[i], lengths_out[i] = row["bytes_in"], row["bytes_clean"], row["bytes_out"]
        split[i] = row["split"]
        if s:
            example(s, {"id": row["id"], "text": row["snippet"]})
        for c in filter(None, row["changes"].split(",")):
            if not s:
                example(f"changed:{c}", {"id": row["id"]})
        status.append(s)

    # stage 5: exact then near duplicates, the first in input order kept (deterministic)
    duplicates = passes.duplicates(cfg) if cfg["exact_dedup"] or cfg["near_dedup"] else {}
    for i, (reason, _) in duplicates.items():
        status[i] = reason
    shown, count = [], Counter()  # the first few of each reason, in input order
    for i, (reason, of) in sorted(duplicates.items()):
        if count[reason] < cfg["examples_per_reason"]:
            shown.append((i, reason, of))
            count[reason] += 1
    names = passes.ids({k for i, _, of in shown for k in (i, of)})  # the examples name documents by id
    for i, reason, of in shown:
        example(reason, {"id": names[i], "duplicate_of": names[of]})

    # stage 6: perplexity under a model of trusted text (from the map); keep the lowest model_keep_fraction
    if cfg["model_filter"]:
        alive = np.array([not s for s in status], bool)
        dropped, _ = passes.ranked("perplexity", alive, math.ceil(cfg["model_keep_fraction"] * alive.sum()))
        for i, score in dropped:
            status[i] = "model:perplexity"
            example("model:perplexity", {"id": f"#{i}", "perplexity": round(score, 2)})

    # stage 6, DCLM style: the classifier's scores (from the map); the classifier_keep_fraction with the
    # highest scores is kept, less any below classifier_min_score
    cut = None
    if classifier is not None:
        alive = np.array([not s for s in status], bool)
        dropped, cut = passes.ranked("score", alive, math.ceil(cfg["classifier_keep_fraction"] * alive.sum()),
                                     highest=True, floor=cfg["classifier_min_score"])
        names = passes.ids({i for i, _ in dropped[:cfg["examples_per_reason"]]})
        for i, score in dropped:
            status[i] = "model:classifier"
            example("model:classifier", {"id": names.get(i), "score": round(score, 4)})

    # stage 8: split by a stable hash of the kept text (from the map); at least one val document when
    # val_fraction > 0
    kept = np.array([not s for s in status], bool)
    lengths_out[~kept] = 0
    val = {i for i in np.flatnonzero(kept).tolist() if split[i] < cfg["val_fraction"]}
    if cfg["val_fraction"] > 0 and not val and kept.sum() > 1:
        val = {min(np.flatnonzero(kept).tolist(), key=lambda i: (split[i], i))}

    # the shards, and what PII was replaced in the documents that were written
    place, shard_files = plan_shards(kept, val, lengths_out, cfg["shard_bytes"])
    done = passes.write(place, [os.path.join(out, name) for name in shard_files], cfg)
    pii_counts, pii_docs, changes = Counter(), Counter(), Counter()
    for summary in done:
        pii_counts.update(summary["pii"])
        pii_docs.update(summary["pii_docs"])
        changes.update(summary["changes"])
    n_changed = sum(summary["changed"] for summary in done)
    for key in sorted({key for summary in done for key in summary["examples"]}):  # each shard's first, in order
        found = [e for summary in done for e in summary["examples"].get(key, [])]  # (index, item)
        for _, item in sorted(found, key=lambda e: e[0]):
            example(key, item)
    report = build_report(status, lengths_in, lengths_clean, lengths_out, val, pii_counts, pii_docs, changes, n_changed, ex)
    if classifier is not None:
        report["classifier"] = {"lowest_score_kept": cut, "keep_fraction": cfg["classifier_keep_fraction"],
                                "min_score": cfg["classifier_min_score"]}
    return report


def plan_shards(kept, val, sizes, shard_bytes):
    """Where each kept document is written: (n,) shard numbers (-1: not written) and the shards' file
    names. Train and val documents go to their own shards in input order; a shard takes documents until
    it holds shard_bytes of text."""
    place, names, current, count = np.full(len(kept), -1, np.int64), [], {}, Counter()
    for i in np.flatnonzero(kept).tolist():
        split = "val" if i in val else "train"
        if split not in current or current[split][1] >= shard_bytes:
            current[split] = [len(names), 0]
            names.append(shard_name(split, count[split]))
            count[split] += 1
        place[i] = current[split][0]
        current[split][1] += sizes[i]
    return place, names


class ShardFile:
    """One shard, gzip'd JSONL, written document by document in input order, counting what the report needs
    (PII replaced, what cleanup changed) and keeping its first examples of each kind with their documents'
    positions (the report takes the first ones of all shards). mtime=0 and no file name in the gzip
    header: the same documents give byte-identical shards on every engine and run."""

    def __init__(self, path, cfg):
        self.f = files.open_output(path)  # a local file or, at a URL output, an object of the staged folder
        self.gz = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=self.f, mtime=0)
        self.k = cfg["examples_per_reason"]
        self.summary = {"pii": Counter(), "pii_docs": Counter(), "changes": Counter(), "changed": 0,
                        "examples": defaultdict(list)}

    def example(self, key, i, item):
        if len(self.summary["examples"][key]) < self.k:
            self.summary["examples"][key].append((i, item))

    def add(self, i, row):
        """Document i, a row of SHARD_COLUMNS."""
        s = self.summary
        s["changed"] += bool(row["changes"] or row["pii"])
        if row["snippet"]:
            self.example("cleanup", i, {"id": row["id"], "changes": row["changes"], "excerpt": row["snippet"]})
        s["changes"].update(filter(None, row["changes"].split(",")))
        line = json.dumps({"id": row["id"], "text": row["text"]}, ensure_ascii=False, sort_keys=True) + "\n"
        self.gz.write(line.encode("utf-8", "surrogatepass"))
        for kind, k in json.loads(row["pii"] or "{}").items():
            s["pii"][kind] += k
            s["pii_docs"][kind] += 1
            at = row["text"].find(f"<{kind}>")
            self.example(f"pii:{kind}", i, {"id": row["id"], "text": row["text"][max(0, at - 60):at + 60]})

    def close(self):
        self.gz.close()
        self.f.close()
        return self.summary


def find_duplicates(docs, cfg):
    """Stage 5 over docs, (index, {exact, minhash}) of the documents every per-document stage kept, in input
    order: {index: (reason, index of the document it duplicates)}. Exact duplicates share a key and name
    the first that had it. Near duplicates share a band of their MinHash signatures (LSH; datasketch picks
    bands b x rows r for the threshold); each connected component keeps its first document
    (stages.components; an exact duplicate shares its first copy's bands, so leaving it out of the graph
    or not gives the same components)."""
    first, exact, index, bands, signatures = {}, {}, [], [], []
    b, r = stages.lsh_shape(cfg["minhash_threshold"], cfg["minhash_num_perm"]) if cfg["near_dedup"] else (0, 0)
    for i, row in docs:
        if cfg["exact_dedup"]:
            j = first.setdefault(row["exact"], i)
            if j != i:
                exact[i] = ("dedup:exact", j)
        if b:
            index.append(i)
            signatures.append(row["minhash"])
            if len(signatures) == 4096:  # band keys a few thousand at a time: 8 bytes a band a document
                bands.append(stages.band_keys(signatures, b, r))
                signatures = []
    del first
    if not index:
        return exact
    index = np.array(index, np.int64)  # (m,)
    bands = np.concatenate(bands + [stages.band_keys(signatures, b, r)])  # (m, b)
    edges = [stages.band_edges(index, bands[:, k]) for k in range(b)]
    root = stages.components(np.concatenate([u for u, _ in edges]), np.concatenate([v for _, v in edges]),
                             int(index[-1]) + 1)
    near = {i: ("dedup:near", int(root[i])) for i in np.flatnonzero(root != np.arange(len(root))).tolist()}
    return {**near, **exact}  # an exact duplicate is named as one


def rank_order(index, score, highest):
    """The order stage 6 ranks documents in: best score first (highest, or lowest for perplexity), ties in
    input order. Returns the positions of index/score (numpy arrays) in that order."""
    return np.lexsort((index, -score if highest else score))


def ranked_cut(index, score, keep, highest=False, floor=None):
    """Stage 6's cut over documents (index, score) already in rank_order: the first `keep` are kept, less
    those scoring below floor (with highest=True those come last among them). Returns (the dropped ones
    as [(index, score)] in rank order, the score of the last one kept or None)."""
    assert floor is None or highest, "a floor is a lowest score to keep: for the highest-first ranking"
    kept = keep if floor is None else min(keep, int(np.searchsorted(-score[:keep], -floor, side="right")))
    dropped = list(zip(index[kept:].tolist(), score[kept:].tolist()))
    return dropped, (float(score[kept - 1]) if kept else None)


class LocalPasses:
    """finish()'s passes on this machine, over rows(names): (index, {name: value}) for those columns of
    every document, in input order (read from the map's files)."""

    def __init__(self, rows):
        self.rows = rows

    def duplicates(self, cfg):
        docs = ((i, row) for i, row in self.rows(["status", "exact", "minhash"]) if not row["status"])
        return find_duplicates(docs, cfg)

    def ids(self, wanted):
        return {i: row["id"] for i, row in self.rows(["id"]) if i in wanted} if wanted else {}

    def ranked(self, column, alive, keep, highest=False, floor=None):
        """ranked_cut over the documents with alive[i] and their `column` (a stage 6 number)."""
        rows = [(i, row[column]) for i, row in self.rows([column]) if alive[i]]
        index, score = np.array([i for i, _ in rows], np.int64), np.array([v for _, v in rows], np.float64)
        order = rank_order(index, score, highest)
        return ranked_cut(index[order], score[order], keep, highest, floor)

    def write(self, place, paths, cfg):
        """Each document i with place[i] >= 0 into the shard at paths[place[i]]; the shards' summaries."""
        last = np.full(len(paths), -1, np.int64)
        np.maximum.at(last, place[place >= 0], np.flatnonzero(place >= 0))  # each shard's last document
        files, done = {}, []
        try:
            for i, row in self.rows(SHARD_COLUMNS):
                p = int(place[i])
                if p < 0:
                    continue
                if p not in files:
                    files[p] = ShardFile(paths[p], cfg)
                files[p].add(i, row)
                if i == last[p]:
                    done.append(files.pop(p).close())
        finally:
            for f in files.values():
                f.close()
        return done
