"""
Curate raw web text into a clean, deduplicated, private training corpus, with a report of what each stage
did. The stages (nanoforge/curation: stages.py, pii.py) run in the README's order, each switchable in the config:
cleanup -> language -> quality -> harmful -> exact dedup -> near dedup (MinHash LSH) -> PII -> model
perplexity and/or a reference-vs-web classifier (optional) -> held-out split.

    python curate.py config/curate_web.py --input=raw/ --output=data/mycorpus/curated
    python data/your_text/prepare.py --input=data/mycorpus/curated --out_dir=data/mycorpus

The output folder holds train-00000.jsonl.gz, ..., val-00000.jsonl.gz (one JSON object a line: id, text,
url), report.json, report.md and lengths.png. It is written beside its final place and renamed into it
when complete (an --output URL, s3://...: staged beside it at the URL, URL.tmpPID, and moved in); an
existing output is refused unless --overwrite=True. Per-document stages run in a
`datasets` map over num_proc processes (inputs are memory-mapped Arrow on disk, so memory stays flat);
deduplication and the split need the whole corpus and run in this process over compact per-document keys.
With --engine=ray every stage runs on a Ray cluster's workers (deduplication as groupbys, each shard
written by a worker; docs/scale.md): byte for byte the same output.
"""
import functools
import os
import sys
import tempfile
import time

from configurator import configure, knobs, overrides
from nanoforge import errors, files
from nanoforge.errors import UserError

# ------------------------------------------------------------------------------------------------------
# defaults (config/curate_web.py documents each)
input = ""                      # comma-separated: files or folders (.txt, .jsonl, .jsonl.gz, .parquet) and
                                # URLs of them (s3://, gs://, hf://, through fsspec), and Hugging Face datasets
                                # (owner/name, or hf:FOLDER for any folder datasets reads)
output = ""                     # the curated folder (must not exist unless overwrite=True)
overwrite = False
text_field = "text"
id_field = "id"                 # '' when the input has none: documents are then named by their position
url_field = "metadata.url"      # dotted path into the JSON object; '' or missing: no URL
hf_config = ""                  # Hugging Face datasets: the config (subset) name, e.g. sample-10BT
hf_split = "train"
hf_max_documents = 0            # > 0: stream only the first N documents of each (0: download the whole split)
txt_split = "file"              # .txt: one document per file ('file') or per blank-line paragraph ('blank')
num_proc = "auto"               # processes for the per-document stages; 'auto' = the CPU count
map_chunk_docs = 50000          # documents per round of worker processes (bounds their memory)
engine = "local"                # 'local': this machine's processes; 'ray': a Ray cluster's workers, the same output
ray_address = ""                # with engine='ray': 'auto' (the cluster `ray start` joined), HOST:PORT, or ''
                                # (ray.init's default: this machine's cluster, else a new one here)
# 1. cleanup
cleanup = True
fix_mojibake = True
html_to_text = True             # only where a document looks like HTML
boilerplate_lines = True        # cookie, navigation, share and copyright lines
repeated_line_min_docs = 5      # drop lines found in this many documents of the sample; 0 = off
repeated_line_sample = 20000    # documents read to find repeated lines (bounded memory)
# 2. language
language_filter = True
languages = "en"                # comma-separated ISO 639-1 codes
min_language_confidence = 0.65
# 3. quality (Gopher / C4 thresholds)
quality_filter = True
min_words = 50
max_words = 100000
min_mean_word_length = 3.0
max_mean_word_length = 10.0
max_symbol_word_ratio = 0.1
min_alpha_word_fraction = 0.8
max_bullet_line_fraction = 0.9
max_ellipsis_line_fraction = 0.3
max_duplicate_line_fraction = 0.3
max_top_2gram_fraction = 0.2
max_duplicate_5gram_fraction = 0.15
min_stop_words = 2
min_punct_line_fraction = 0.12
# 4. harmful content
harmful_filter = True
blocklist_words = os.path.join(files.REPO, "data", "blocklists", "words.txt")  # comma-separated files; '' = none
blocklist_domains = os.path.join(files.REPO, "data", "blocklists", "domains.txt")
harmful_min_hits = 3
# 5. deduplication
exact_dedup = True
near_dedup = True
minhash_threshold = 0.5         # Jaccard similarity of word shingles above which documents are near-duplicates
minhash_shingle_size = 2        # words per shingle
minhash_num_perm = 128
minhash_seed = 1
# 6. privacy
pii = True
pii_kinds = "SECRET,EMAIL,IBAN,CREDIT_CARD,SSN,IP,PHONE"
# 7. model-based quality (off by default: needs a checkpoint trained on text you trust)
model_filter = False
model_source = ""               # out_dir, ckpt.pt or Hugging Face GPT-2 folder (checkpoint.load_model)
model_keep_fraction = 0.8       # keep this share of documents, lowest perplexity first
model_max_tokens = 256
classifier_reference = ""       # DCLM-style classifier: files/folders of text you trust ('' = off)
classifier_reference_split = "blank"  # .txt references: one document per blank-line paragraph or per 'file'
classifier_train_docs = 5000    # documents of the reference and of the corpus (its first) it is trained on
classifier_keep_fraction = 0.8  # keep this share of documents, highest score (most reference-like) first
classifier_min_score = 0.0      # and drop any scoring below this (0-1: the probability of "reference")
# 8. split and output
val_fraction = 0.01
split_seed = 0
shard_bytes = 100_000_000       # uncompressed text per output shard
examples_per_reason = 3
# the literals above, for configure() and for tests that run the stages in-process
DEFAULTS = knobs(globals())
# ------------------------------------------------------------------------------------------------------

def read_runs(item, cfg):
    """engine='ray': the documents (id, text, url) of a run of input files of one kind, read on a worker into
    its own datasets cache by load_documents, as the local engine reads them; in tables of up to 10,000."""
    from nanoforge.corpus import load_documents
    _, paths = item
    with tempfile.TemporaryDirectory(prefix="nanoforge_read") as cache:
        yield from load_documents(paths, cfg, cache, 1).with_format("arrow").iter(batch_size=10_000)


if __name__ == "__main__":
    errors.friendly_errors()
    defaults = DEFAULTS
    config = configure(defaults, sys.argv[1:])
    globals().update(config)
    if not input or not output:
        raise UserError("give --input=FILES_OR_FOLDERS and --output=FOLDER")
    if files.output_exists(output) and not overwrite:
        raise UserError(f"output {output} exists; pass --overwrite=True to replace it")
    if num_proc == "auto":
        num_proc = os.cpu_count() or 1
    if map_chunk_docs < 1:
        raise UserError(f"map_chunk_docs must be at least 1, got {map_chunk_docs}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise UserError(f"num_proc must be a positive int or 'auto', got {num_proc!r}")
    if not 0 <= val_fraction < 1 or not 0 < model_keep_fraction <= 1 or not 0 < minhash_threshold < 1:
        raise UserError("val_fraction must be in [0, 1), model_keep_fraction in (0, 1], minhash_threshold in (0, 1)")
    if not 0 < classifier_keep_fraction <= 1 or classifier_train_docs < 1:
        raise UserError("classifier_keep_fraction must be in (0, 1] and classifier_train_docs at least 1")
    if engine not in ("local", "ray"):
        raise UserError(f"engine must be 'local' or 'ray', got {engine!r}")
    if model_filter and not model_source:
        raise UserError("model_filter=True needs model_source=OUT_DIR (a checkpoint of a model of trusted text)")
    print(f"curating {input} -> {output}; overrides: {overrides(defaults, config)}")
    entries = [p for p in input.split(",") if p]
    from nanoforge.corpus import by_builder, find_files, is_hub, load_documents
    hub = [p for p in entries if is_hub(p)]
    if not hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files need no network; read by datasets at import
    from nanoforge.curation import pipeline  # the per-document map and the corpus-wide passes
    from nanoforge.curation.report import write_report

    inputs, found = find_files([p for p in entries if p not in hub])
    print(found)
    if not inputs and not hub:
        raise UserError(f"no documents found in {input}: the files are empty")
    parent = None if files.is_url(output) else os.path.dirname(os.path.abspath(output))  # a URL: local scratch
    if parent:
        os.makedirs(parent, exist_ok=True)
    # the datasets caches go in a scratch folder beside the output, the curated corpus into its own, which
    # replaces an old output (overwrite=True) only once it is whole
    with tempfile.TemporaryDirectory(prefix=os.path.basename(os.path.abspath(output)) + ".cache", dir=parent) as work, \
            files.atomic_folder(output, at_url=True) as out:
        t0 = time.time()
        reference = None
        if classifier_reference:  # stage 6's classifier is trained once, up front, then scores each document
            ref_files, _ = find_files([p for p in classifier_reference.split(",") if p])
            if not ref_files:
                raise UserError(f"classifier_reference {classifier_reference} holds no documents: its files are empty")
            reference = load_documents(ref_files, dict(config, txt_split=classifier_reference_split, id_field="", url_field=""),
                                      os.path.join(work, "reference"), num_proc)
        if engine == "ray":  # the same stages on a Ray cluster's workers, the same output
            if hub:
                raise UserError("engine='ray' reads files and URLs (a hub dataset's files: hf://datasets/OWNER/NAME/...); "
                                "Hugging Face dataset names are read by the local engine")
            from nanoforge import ray_data
            ray_data.connect(ray_address)
            runs = ray_data.file_runs([(builder, path) for builder, paths in by_builder(inputs) for path in paths])
            from nanoforge.curation import on_ray
            report, n = on_ray.run(runs, functools.partial(read_runs, cfg=config), config, out, reference)
        else:
            dset = load_documents(inputs, config, os.path.join(work, "cache"), num_proc, hub)
            n = len(dset)
            print(f"{n:,} documents from {len(inputs)} file(s) and {len(hub)} Hugging Face dataset(s) "
                  f"in {time.time() - t0:.1f} s")
            classifier = None
            if reference is not None:
                classifier = pipeline.train_classifier(reference, pipeline.first_texts(dset, classifier_train_docs), config)
            report = pipeline.run(dset, config, out, num_proc, classifier)
        if reference is not None:
            print(f"quality classifier trained on {min(len(reference), classifier_train_docs):,} reference and "
                  f"{min(n, classifier_train_docs):,} corpus documents")
        report["config"] = {k: v for k, v in config.items() if k not in ("engine", "ray_address")}  # what, not how
        report["input_files"] = inputs + hub  # absolute: the report is the same from any working folder
        write_report(report, out)
    s = report["summary"]
    print(f"{s['documents_in']:,} documents in: {s['kept']:,} kept ({s['changed']:,} of them changed), "
          f"{s['dropped']:,} dropped; {s['bytes_in']:,} -> {s['bytes_out']:,} bytes; {time.time() - t0:.1f} s")
    print(f"-> {output} (report.md)")
