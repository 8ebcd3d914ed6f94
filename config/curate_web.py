# curate.py: curate raw Common Crawl text (the JSONL that ../shared/data/cc_web holds) into an English corpus:
#   python curate.py config/curate_web.py --input=../shared/data/cc_web --output=data/ccweb/curated
#   python data/your_text/prepare.py --input=data/ccweb/curated --out_dir=data/ccweb
# A Hugging Face dataset instead (online): --input=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT
# --hf_max_documents=100000 (its first 100,000 documents, streamed; 0 downloads the whole split)
# On a Ray cluster, the same output: --engine=ray --ray_address=auto (docs/scale.md).
# Every key is one of curate.py's defaults; this file names the ones a web corpus tunes.
text_field = "text"
id_field = "id"
url_field = "metadata.url"
# 1. cleanup: lines found in 5+ documents of the first 20,000 are menus and footers
repeated_line_min_docs = 5
# 2. language: py3langid's normalised probability
languages = "en"
min_language_confidence = 0.65
# 3. quality: Gopher's thresholds (Rae et al. 2021), FineWeb's 12% of lines ending in punctuation
min_words = 50
max_words = 100000
max_duplicate_line_fraction = 0.3
max_duplicate_5gram_fraction = 0.15
min_punct_line_fraction = 0.12
# 4. harmful: the shipped lists (data/blocklists); 3 hits before a page counts as about it
harmful_min_hits = 3
# 5. dedup: word bigram shingles at Jaccard 0.5 catch copies with 5-10% of words changed
minhash_threshold = 0.5
minhash_shingle_size = 2
minhash_num_perm = 128
# 7. the DCLM-style classifier is off until a reference set you trust is named, e.g.
#   --classifier_reference=../shared/data/tinystories/tinystories_valid_head.txt (a .txt split at blank lines);
# trained on 5,000 documents of it against the corpus's first 5,000, it keeps the 80% most reference-like
classifier_reference = ""
classifier_train_docs = 5000
classifier_keep_fraction = 0.8
# 8. 1% of documents held out, by a stable hash of each
val_fraction = 0.01
