"""
curate.py --engine=ray: every stage on a Ray cluster's workers, the same shards and report as the local
engine (pipeline.run) byte for byte. The per-document stages are pipeline.process on blocks of documents;
the corpus-wide passes are pipeline.finish, whose heavy steps RayPasses runs on the workers as groupbys
over Ray Data's shuffle: exact duplicates grouped by key, near duplicates grouped by MinHash band and
joined into connected components (ray_data.components), and each shard written by the worker that
gathers its documents. The driver keeps a few numbers a document (status, sizes, split hash).
"""
import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa

from nanoforge import files
from nanoforge import ray_data
from nanoforge.curation import pipeline
from nanoforge.curation import stages
from nanoforge.errors import UserError


def run(items, read, cfg, out, reference=None):
    """All stages on a Ray cluster (ray_data.connect first): read(item) yields tables of documents (id,
    text, url) of each item (a run of input files), on the workers; the per-document stages run there too,
    their output kept in Ray's object store; finish() runs over it with RayPasses. reference: a dataset of
    trusted text for stage 6's classifier, or None. Returns the report and the number of documents."""
    docs = ray_data.documents(items, read)  # id, text, url; item, row: each document's place in its item
    where = ray_data.columns(docs, ["item", "row"])
    n = len(where["item"])
    if not n:
        raise UserError("no documents found in the input: it is empty")
    start = np.concatenate([[0], np.cumsum(np.bincount(where["item"], minlength=len(items)))[:-1]])  # (items,)
    assert (start[where["item"]] + where["row"] == np.arange(n)).all(), "Ray returned the documents out of order"
    print(f"{n:,} documents read on {len(ray_data.connect().nodes())} Ray node(s)")
    # stage 1's sample and the classifier's corpus side: the first documents, as the local engine takes them
    k = max(cfg["repeated_line_sample"], cfg["classifier_train_docs"] if reference is not None else 0)
    first = pipeline.texts_of(ray_data.head(docs, ["text"], k))
    repeated = set()
    if cfg["cleanup"] and cfg["repeated_line_min_docs"] > 0:
        repeated = stages.repeated_lines(first[:cfg["repeated_line_sample"]], cfg["repeated_line_min_docs"])
    classifier = None if reference is None else pipeline.train_classifier(reference, first, cfg)
    words, domains = pipeline.blocklists(cfg)
    schema = pipeline.features().arrow_schema.append(pa.field("index", pa.int64()))
    print("every stage on the workers: per document, then deduplication and the shards as groupbys")

    def stages_of(table, start, repeated, words, domains, classifier):  # a block of documents, on a worker
        index = start[table.column("item").to_numpy()] + table.column("row").to_numpy()  # in the whole input
        done = pipeline.process(table.drop_columns(["item", "row"]), index.tolist(), repeated, words, domains, cfg,
                                classifier=classifier)
        return pa.Table.from_pydict(dict(done, index=index), schema=schema) if table.num_rows else schema.empty_table()

    done = ray_data.map_blocks(docs, stages_of, start=start, repeated=sorted(repeated), words=words, domains=domains,
                               classifier=classifier)
    return pipeline.finish(RayPasses(done), n, cfg, out, classifier), n


def _same_key_edges(group, key):
    """The documents of a group sharing `key` -> edges from each to the group's first (stages.band_edges)."""
    u, v = stages.band_edges(np.sort(group["index"]), group[key])
    return {"u": u, "v": v}


def _kept_rows(table, names):
    """The rows of a block that every per-document stage kept, their columns `names`."""
    return table.filter(pa.compute.equal(table.column("status"), "")).select(names)


def _wanted_rows(table, wanted):
    return table.filter(pa.compute.is_in(table.column("index"), value_set=pa.array(wanted)))


def _ranked_rows(table, alive, column, highest):
    """A block's documents still in the running -> (index, score, order): order sorts them best first
    (pipeline.rank_order's order: the score, negated when the highest is best, then the index)."""
    table = table.filter(pa.array(alive[table.column("index").to_numpy()]))
    score = table.column(column).to_numpy()
    return pa.table({"index": table.column("index"), "score": score, "order": -score if highest else score})


def _score_rows(table, floor, below):
    """The rows of a block scoring below floor (below=True), or the others."""
    low = pa.compute.less(table.column("score"), floor)
    return table.filter(low if below else pa.compute.invert(low))


def _band_rows(table, b, r):
    """A block of documents still in the running -> one row per band: (index, band, key)."""
    index = table.column("index").to_numpy()
    keys = stages.band_keys(table.column("minhash").to_pylist(), b, r)  # (rows, b)
    return pa.table({"index": np.repeat(index, b), "band": np.tile(np.arange(b, dtype=np.int64), len(index)),
                     "key": keys.reshape(-1).view(np.int64)})


def _write_shard(group, paths, cfg):
    """The documents of one shard, gathered on a worker: written there in input order (pipeline.ShardFile);
    its summary goes back as one row of JSON."""
    order = np.argsort(group["index"])
    p = int(group["shard"][0])
    shard = pipeline.ShardFile(paths[p], cfg)
    try:
        for j in order.tolist():
            shard.add(int(group["index"][j]), {name: group[name][j] for name in pipeline.SHARD_COLUMNS})
    finally:
        summary = shard.close()
    return {"summary": np.array([json.dumps(summary, sort_keys=True)], object)}


class RayPasses:
    """finish()'s passes over the per-document output `done` (a materialized Ray dataset with an `index`
    column), their heavy steps on the workers."""

    def __init__(self, done):
        self.done = done

    def rows(self, names):
        return ray_data.rows(self.done, names)

    def live(self, names):
        """The chosen columns of the documents every per-document stage kept."""
        return ray_data.map_blocks(self.done.select_columns(["status", *names]), _kept_rows, names=names)

    def duplicates(self, cfg):
        """pipeline.find_duplicates' answer, computed as groupbys: exact keys; MinHash bands -> edges ->
        connected components."""
        found = {}
        if cfg["near_dedup"]:
            b, r = stages.lsh_shape(cfg["minhash_threshold"], cfg["minhash_num_perm"])
            bands = ray_data.map_blocks(self.live(["index", "minhash"]), _band_rows, b=b, r=r)
            edges = ray_data.group_map(bands, ["band", "key"], _same_key_edges, key="key")
            found = {i: ("dedup:near", root) for i, root in ray_data.components(edges).items()}
        if cfg["exact_dedup"]:
            pairs = ray_data.columns(ray_data.group_map(self.live(["index", "exact"]), "exact", _same_key_edges,
                                                        key="exact"), ["u", "v"])
            found.update({i: ("dedup:exact", of) for i, of in zip(pairs["u"].tolist(), pairs["v"].tolist())})
        return found

    def ids(self, wanted):
        if not wanted:
            return {}
        found = ray_data.columns(ray_data.map_blocks(self.done.select_columns(["index", "id"]), _wanted_rows,
                                                     wanted=np.array(sorted(wanted), np.int64)), ["index", "id"])
        return dict(zip(found["index"].tolist(), found["id"].tolist()))

    def ranked(self, column, alive, keep, highest=False, floor=None):
        """pipeline.ranked_cut over the documents with alive[i], ranked by Ray Data's distributed sort and
        split at `keep`: the kept part stays on the workers; what is dropped comes back (the rest, and with
        a floor the kept part's rows below it), with the score of the last one kept."""
        if not alive.any():
            return [], None
        live = ray_data.map_blocks(self.done.select_columns(["index", column]), _ranked_rows, alive=alive,
                                   column=column, highest=highest)
        ordered = ray_data.run(lambda: live.sort(["order", "index"]).materialize())
        kept, rest = ordered.split_at_indices([keep])
        out = [rest]
        if floor is not None:
            out = [ray_data.map_blocks(kept, _score_rows, floor=floor, below=True), rest]
            kept = ray_data.map_blocks(kept, _score_rows, floor=floor, below=False)
        parts = [ray_data.columns(part, ["index", "score", "order"]) for part in out]
        index, score, order = (np.concatenate([p[name] for p in parts]) for name in ("index", "score", "order"))
        ranks = np.lexsort((index, order))  # in rank order, whatever order Ray returned the rows in
        last = ray_data.run(lambda: kept.max("order")) if kept.count() else None
        return (list(zip(index[ranks].tolist(), score[ranks].astype(float).tolist())),
                None if last is None else float(-last if highest else last))

    def write(self, place, paths, cfg):
        """Each document i with place[i] >= 0 into the shard at paths[place[i]], a worker per shard (the
        output folder is on a filesystem every node sees, or staged at a URL); the shards' summaries."""
        def with_shard(table, place):
            table = table.append_column("shard", pa.array(place[table.column("index").to_numpy()]))
            return table.filter(pa.compute.greater_equal(table.column("shard"), 0))

        # absolute: a worker's working folder is not this one's (a URL is one already)
        paths = [path if files.is_url(path) else os.path.abspath(path) for path in paths]
        placed = ray_data.map_blocks(self.done.select_columns(["index", *pipeline.SHARD_COLUMNS]), with_shard,
                                     place=place)
        rows = ray_data.columns(ray_data.group_map(placed, "shard", _write_shard, paths=paths, cfg=cfg), ["summary"])
        summaries = [json.loads(s) for s in rows["summary"].tolist()]
        for s in summaries:
            s["pii"], s["pii_docs"], s["changes"] = Counter(s["pii"]), Counter(s["pii_docs"]), Counter(s["changes"])
        return summaries
