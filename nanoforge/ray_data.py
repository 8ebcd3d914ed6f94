"""
The data stages on Ray, for corpora past one machine (curate.py and data/your_text/prepare.py with
--engine=ray): the same functions the local engine runs, on a Ray cluster's workers through Ray Data,
giving the same bytes.

    ray start --head                                  # on one machine; on the others:
    ray start --address=HEAD_IP:6379
    python data/your_text/prepare.py --input=s3://bucket/web/ --engine=ray --ray_address=auto ...

Without --ray_address, Ray does what ray.init() does: joins the cluster this machine already runs, else
starts one on this machine alone (all its cores). Every node needs the same Python packages (nanoforge
installed), the input readable at the same URL or shared path, and the output at a URL (s3://...) or
in a folder on a filesystem they all see: the workers write the output files themselves (curated shards;
token files, each document's tokens at the place the driver worked out for them, tokens.PlacedWriter).
docs/scale.md is the runbook.
"""
import logging

import numpy as np

from nanoforge.errors import UserError


def connect(address=""):
    """Joins the Ray cluster at `address` ('auto': the one `ray start` made this machine part of; or
    HOST:PORT); with '', that one if there is one, else a new one on this machine. Ray Data then keeps
    every dataset in input order."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--engine=ray needs Ray: pip install 'ray[data]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, log_to_driver=False, logging_level="ERROR",
                     configure_logging=True)
        except ray.exceptions.AuthenticationError as e:
            raise UserError(f"Ray refused this shell ({' '.join(str(e).split())[:160]}); a cluster with token "
                            f"authentication needs RAY_AUTH_MODE=token and its token here (~/.ray/auth_token or "
                            f"RAY_AUTH_TOKEN): docs/scale.md") from None
        except ConnectionError as e:
            raise UserError(f"no Ray cluster answered at --ray_address={address or 'its default'} "
                            f"({' '.join(str(e).split())[:200]}): none is running (`ray start --head`; or leave "
                            f"--ray_address out for one on this machine), or it uses token authentication and "
                            f"this shell lacks RAY_AUTH_MODE=token and its token (docs/scale.md)") from None
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the input's order, on any cluster
    # groupby's shuffle: Ray's sort-based one took 1.5 s for a groupby of 7,000 rows on 2 cores where the
    # default hash shuffle's actors took 7 s, and a curation run makes a dozen (dev/LOG.md)
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    # a plan and a log path per pass are not news, and a worker's error is raised here by run() (one line
    # for a UserError, else its traceback), not logged again
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    return ray


def user_error(e):
    """The UserError a Ray task raised (wrapped by Ray in its own exceptions), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError: the worker's exception (it is a UserError too)
        if isinstance(cause, BaseException):
            e = cause
        elif isinstance(e, UserError):
            return e
        else:
            e = e.__cause__ or e.__context__
    return None


def run(fn):
    """fn() with a worker's UserError raised here as itself, one line, not Ray's traceback of it."""
    try:
        return fn()
    except Exception as e:
        error = user_error(e)
        if error is None:
            raise
        raise UserError(str(error).splitlines()[0]) from None  # Ray appends lines of its own advice


def cpus():
    """The cluster's CPUs, all nodes together."""
    return max(1, int(connect().cluster_resources().get("CPU", 1)))


def file_runs(keyed_files):
    """The reading tasks: [(key, path)] in order -> [(key, paths)], consecutive files of one key in runs of
    about a quarter of each worker's share of the bytes (a task per small file spent more time in datasets'
    setup than in reading it: 0.15 s against 0.25 s to tokenize a 3 MB file), a larger file alone. The sizes
    are read here: find_files has just listed these files, and fsspec keeps a bucket's listing."""
    from nanoforge.corpus import input_size
    sizes = [input_size(path) for _, path in keyed_files]
    share = sum(sizes) / (4 * cpus())
    runs = []
    for (key, path), size in zip(keyed_files, sizes):
        if runs and runs[-1][0] == key and runs[-1][2] + size <= share:
            runs[-1][1].append(path)
            runs[-1][2] += size
        else:
            runs.append([key, [path], size])
    return [(key, paths) for key, paths, _ in runs]


def map_items(fn, items):
    """[fn(item) for item in items], one Ray task each, in order."""
    ray = connect()
    task = ray.remote(fn)
    return run(lambda: ray.get([task.remote(item) for item in items]))


def documents(items, read, transform=None):
    """Pass one over the input: read(item) on a worker yields pyarrow tables of documents (an item: a run
    of input files), which transform(table), if given, turns into other columns on any worker, in order.
    Each row gets `item` (the item's position in `items`) and `row` (the document's position in its
    item), so a later pass knows every document's place in the whole input. Returns the materialized
    dataset (in Ray's object store, spilled to disk when large)."""
    import pyarrow as pa
    ray = connect()

    def read_item(batch):  # a batch of one item: its documents, in tables
        k = int(batch["item"][0].as_py())
        row = 0
        for table in read(items[k]):
            n = table.num_rows
            yield table.append_column("item", pa.array(np.full(n, k, np.int64))).append_column(
                "row", pa.array(np.arange(row, row + n, dtype=np.int64)))
            row += n

    def apply(table):
        out = transform(table.drop_columns(["item", "row"]))
        return out.append_column("item", table.column("item")).append_column("row", table.column("row"))

    ds = ray.data.from_items([{"item": k} for k in range(len(items))], override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(read_item, batch_size=1, batch_format="pyarrow")
    if transform is not None:
        ds = ds.map_batches(apply, batch_format="pyarrow")
    return run(ds.materialize)


def columns(ds, names):
    """The chosen (small) columns of a materialized dataset, in order, as numpy arrays on the driver."""
    parts = {name: [] for name in names}
    for batch in ds.select_columns(names).iter_batches(batch_size=None, batch_format="numpy"):
        for name in names:
            parts[name].append(batch[name])
    return {name: np.concatenate(p) if p else np.zeros(0, np.int64) for name, p in parts.items()}


def head(ds, names, n):
    """The chosen columns of a materialized dataset's first n rows, as one pyarrow table, on the driver."""
    import pyarrow as pa
    tables = list(ds.limit(n).select_columns(names).iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(tables) if tables else None


def rows(ds, names):
    """(index, {name: value}) for every row of a materialized dataset, in order, streamed to the driver."""
    i = 0
    for batch in ds.select_columns(names).iter_batches(batch_size=4096, batch_format="pyarrow"):
        cols = {name: batch.column(name).to_pylist() for name in names}
        for j in range(batch.num_rows):
            yield i, {name: cols[name][j] for name in names}
            i += 1


def map_blocks(ds, fn, **shared):
    """fn(table, **shared) -> a table, on every block of a materialized dataset, on the workers, in order;
    materialized. `shared` (the corpus' arrays, a model) goes to the object store once."""
    ray = connect()
    refs = {name: ray.put(value) for name, value in shared.items()}
    return run(lambda: ds.map_batches(lambda table: fn(table, **{name: ray.get(ref) for name, ref in refs.items()}),
                                      batch_format="pyarrow").materialize())


def each_block(ds, fn, **shared):
    """fn(table, **shared) on every block of a materialized dataset, on the workers, for what it writes
    (as map_blocks); returns the number of rows done."""
    import pyarrow as pa

    def done(table, **kwargs):
        fn(table, **kwargs)
        return pa.table({"rows": [table.num_rows]})
    return int(columns(map_blocks(ds, done, **shared), ["rows"])["rows"].sum())


def group_map(ds, by, fn, **shared):
    """fn(group, **shared) -> {column: numpy array} for each group of rows of ds sharing `by` (a column
    or a list of them; group: {column: numpy array}, in no particular order), on the workers, through Ray
    Data's shuffle; materialized. `shared` goes to the object store once."""
    ray = connect()
    refs = {name: ray.put(value) for name, value in shared.items()}
    each = lambda group: fn(group, **{name: ray.get(ref) for name, ref in refs.items()})  # noqa: E731
    return run(lambda: ds.groupby(by).map_groups(each, batch_format="numpy").materialize())


def _large_star(group):
    """Large-star at node u: every larger neighbour links to the smallest of u and its neighbours."""
    u, nbrs = int(group["u"][0]), np.unique(group["v"])
    m, big = min(u, int(nbrs[0])), nbrs[nbrs > u]
    changed = np.zeros(len(big), np.int64)
    changed[:1] = m < u  # a link moved: (u, v) became (v, m)
    return {"u": big, "v": np.full(len(big), m, np.int64), "changed": changed}


def _small_star(group):
    """Small-star at node u over its smaller neighbours: u and all of them link to the smallest."""
    u, nbrs = int(group["u"][0]), np.unique(group["v"])
    m, rest = int(nbrs[0]), np.append(nbrs[1:], u)
    changed = np.zeros(len(rest), np.int64)
    changed[:1] = len(nbrs) > 1  # u had more than one smaller neighbour
    return {"u": rest, "v": np.full(len(rest), m, np.int64), "changed": changed}


def components(edges):
    """Connected components of the graph whose edges (u, v) (int64 columns) a dataset holds, computed on the
    workers: large-star and small-star steps in turn (Kiveris et al., "Connected Components in MapReduce
    and Beyond", 2014), each a groupby by node, until neither changes a link. Then every component is a
    star around its smallest node. Returns {node: smallest node of its component} for every node of an
    edge but those smallest ones, on the driver (the same as stages.components gives on one machine)."""
    both = lambda b: {"u": np.concatenate([b["u"], b["v"]]), "v": np.concatenate([b["v"], b["u"]])}  # noqa: E731
    down = lambda b: {"u": np.maximum(b["u"], b["v"])[b["u"] != b["v"]],  # noqa: E731
                      "v": np.minimum(b["u"], b["v"])[b["u"] != b["v"]]}
    edges = edges.select_columns(["u", "v"])
    if not run(edges.count):
        return {}
    while True:
        large = group_map(edges.map_batches(both, batch_format="numpy"), "u", _large_star)
        small = group_map(large.select_columns(["u", "v"]).map_batches(down, batch_format="numpy"), "u", _small_star)
        if not run(lambda: (large.sum("changed") or 0) + (small.sum("changed") or 0)):
            found = columns(small, ["u", "v"])
            return dict(zip(found["u"].tolist(), found["v"].tolist()))
        edges = small.select_columns(["u", "v"])
