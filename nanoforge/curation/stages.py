"""
The curation stages, each a plain function of one document (curate.py runs them in order, PII is in
pii.py). A stage returns the new text, or the reason it drops the document ("quality:min_words"), so the
same functions run in a `datasets` map here or in any distributed engine's map step.

    cleanup(text, repeated, cfg) -> (text, [what changed])       formatting, boilerplate lines
    language(text) -> (code, confidence)                        py3langid, probabilities normalised
    quality_reason(text, lang, cfg) -> None or reason           Gopher / C4 heuristics
    harmful_reason(text, url, words, domains, cfg) -> reason    blocklists
    dedup_key(text), minhash(text, cfg)                         exact and near-duplicate keys
    band_keys, band_edges, components                           near-duplicates as connected components
    split_of(text, seed, val_fraction)                          stable held-out split
"""
import functools
import hashlib
import html.parser
import re
import unicodedata
from collections import Counter

import ftfy
import numpy as np

# ------------------------------------------------------------------------------------------------------
# 1. formatting cleanup

# control characters except tab and newline; zero-width spaces/joiners, BOM, soft hyphen, bidi marks
INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
# navigation and cookie lines that carry no text (matched against a whole short line, lower-cased)
BOILERPLATE = re.compile(
    r"^(?:.*\b(?:cookies?|cookie policy)\b.*|.*all rights reserved.*|skip to (?:main )?content|"
    r"(?:log ?in|sign ?in|sign ?up|register|log ?out|subscribe|share|tweet|print|email|menu|home|search|"
    r"next|previous|back to top|read more|reply|comments?|privacy policy|terms of (?:use|service)|"
    r"contact us|about us)(?:\s*[|/·•»>-]\s*\w+(?: \w+)?)*|.*\b(?:share on|follow us on) "
    r"(?:facebook|twitter|instagram|linkedin).*|copyright ©?.*|© ?\d{4}.*|powered by \w+.*)$")
HTML_TAG = re.compile(r"</?(?:html|body|div|p|br|span|a|table|li|head|script)\b[^>]*>", re.I)
BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "section",
              "article", "header", "footer", "ul", "ol", "blockquote", "pre", "title"}


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: scripts and styles dropped, block elements on lines of their own."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style", "noscript")
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style", "noscript") and self.skip > 0
        if tag in BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_to_text(text):
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def looks_like_html(text):
    return len(HTML_TAG.findall(text[:20000])) >= 3


def line_key(line):
    """Lines compare case- and space-insensitively when counting repeats across documents, by a 64-bit
    hash (a few bytes a line, so a large sample fits in little memory)."""
    return int.from_bytes(hashlib.blake2b(" ".join(line.lower().split()).encode(), digest_size=8).digest(), "little", signed=True)


def repeated_lines(texts, min_docs):
    """The keys of lines found in at least `min_docs` of `texts` (an iterable over a sample of the corpus):
    menus, footers and templates that no single document reveals as boilerplate."""
    keys = [np.unique(np.array([line_key(l) for l in (t or "").split("\n") if l.strip()] or [0], np.int64))
            for t in texts]  # each document counts a line once
    if not keys:
        return set()
    values, counts = np.unique(np.concatenate(keys), return_counts=True)
    return set(values[counts >= min_docs].tolist()) - {line_key("")}


def cleanup(text, repeated, cfg):
    """(cleaned text, list of the cleanups that changed it)."""
    changes, before = [], text

    def mark(name, new):
        nonlocal before
        if new != before:
            changes.append(name)
        before = new
        return new
    if cfg["fix_mojibake"]:
        # ftfy without its NFC step (done next, counted apart), keeping HTML entities for the parser and
        # curly quotes as written (they are not mojibake)
        text = mark("mojibake", ftfy.fix_text(text, normalization=None, unescape_html=False, uncurl_quotes=False))
    text = mark("nfc", unicodedata.normalize("NFC", text))
    text = mark("invisible_chars", INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
    if cfg["html_to_text"] and looks_like_html(text):
        text = mark("html", html_to_text(text))
    lines = [SPACES.sub(" ", l).strip() for l in text.split("\n")]
    text = mark("whitespace", re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip())
    kept = []
    for line in text.split("\n"):
        low = " ".join(line.lower().split())
        if cfg["boilerplate_lines"] and low and len(low) < 120 and BOILERPLATE.match(low):
            continue
        if low and repeated and line_key(line) in repeated:
            continue
        kept.append(line)
    text = mark("boilerplate_lines", re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip())
    return text, changes


# ------------------------------------------------------------------------------------------------------
# 2. language

_identifier = None


def language(text):
    """(ISO 639-1 code, probability) from py3langid on the first 5,000 characters (enough, and fast)."""
    global _identifier
    if _identifier is None:  # loaded once per process, on first use: worker processes each load their own
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
        _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    code, prob = _identifier.classify(text[:5000])
    return code, float(prob)


# ------------------------------------------------------------------------------------------------------
# 3. quality heuristics (Gopher: Rae et al. 2021, appendix A; C4: Raffel et al. 2020; FineWeb's line ratio)

STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}  # Gopher's English stop words
WORD = re.compile(r"\w+(?:['’]\w+)*")


def _dup_ngram_fraction(words, n):
    """Share of characters inside word n-grams that occur more than once (Gopher's duplicate n-grams)."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(words), bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = True
    lengths = np.array([len(w) for w in words])
    return float(lengths[covered].sum() / max(1, lengths.sum()))


def quality_reason(text, lang, cfg):
    """None for a document that passes, else 'quality:<rule>' for the first rule it fails."""
    words = WORD.findall(text)
    n = len(words)
    if n < cfg["min_words"]:
        return "quality:min_words"
    if n > cfg["max_words"]:
        return "quality:max_words"
    mean = sum(map(len, words)) / n
    if not cfg["min_mean_word_length"] <= mean <= cfg["max_mean_word_length"]:
        return "quality:mean_word_length"
    tokens = text.split()
    if (text.count("#") + text.count("...") + text.count("…")) / max(1, len(tokens)) > cfg["max_symbol_word_ratio"]:
        return "quality:symbol_word_ratio"
    if sum(any(c.isalpha() for c in t) for t in tokens) / max(1, len(tokens)) < cfg["min_alpha_word_fraction"]:
        return "quality:alpha_words"
    lines = [l for l in text.split("\n") if l.strip()]
    if sum(l.lstrip().startswith(("•", "-", "*", "·", "‣", "–")) for l in lines) / len(lines) > cfg["max_bullet_line_fraction"]:
        return "quality:bullet_lines"
    if sum(l.rstrip().endswith(("...", "…")) for l in lines) / len(lines) > cfg["max_ellipsis_line_fraction"]:
        return "quality:ellipsis_lines"
    if 1 - len(set(lines)) / len(lines) > cfg["max_duplicate_line_fraction"]:
        return "quality:duplicate_lines"
    lower = [w.lower() for w in words]
    if n >= 2:
        top = Counter(zip(lower, lower[1:])).most_common(1)[0]
        if top[1] > 1 and top[1] * (len(top[0][0]) + len(top[0][1])) / sum(map(len, lower)) > cfg["max_top_2gram_fraction"]:
            return "quality:top_2gram"
    if _dup_ngram_fraction(lower, 5) > cfg["max_duplicate_5gram_fraction"]:
        return "quality:duplicate_5grams"
    if lang == "en" and len(STOP_WORDS.intersection(lower)) < cfg["min_stop_words"]:
        return "quality:stop_words"  # only English has a stop-word list here
    if sum(l.rstrip().endswith((".", "!", "?", '"', "'", "”", "。", "!", "?")) for l in lines) / len(lines) < cfg["min_punct_line_fraction"]:
        return "quality:punctuation_lines"
    return None


# ------------------------------------------------------------------------------------------------------
# 4. harmful content

def read_list(paths):
    """Entries of one or more list files (comma-separated paths), one a line, # comments, lower-cased."""
    entries = set()
    for path in filter(None, (p.strip() for p in paths.split(","))):
        with open(path, encoding="utf-8") as f:
            entries |= {l.split("#")[0].strip().lower() for l in f} - {""}
    return entries


def domain_of(url):
    host = re.sub(r"^[a-z]+://", "", (url or "").strip().lower()).split("/")[0].split(":")[0]
    return host[4:] if host.startswith("www.") else host


def harmful_reason(text, url, words, domains, cfg):
    """'harmful:domain' if the URL's host or a parent domain is blocklisted; 'harmful:words' if the
    blocklisted words/phrases occur at least harmful_min_hits times (one stray word is not a page about it)."""
    host = domain_of(url)
    parts = host.split(".")
    if any(".".join(parts[i:]) in domains for i in range(len(parts) - 1)):
        return "harmful:domain"
    if words:
        # whole words and phrases only ("sussex" is not "sex"), overlapping repeats counted; re caches the pattern
        pattern = re.compile(r"(?<!\S)(?:" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + r")(?!\S)")
        hits = len(pattern.findall(" ".join(WORD.findall(text.lower()))))
        if hits >= cfg["harmful_min_hits"]:
            return "harmful:words"
    return None


# ------------------------------------------------------------------------------------------------------
# 5. deduplication keys

def normalise(text):
    """Lower case, words only: what two documents must share to count as the same."""
    return " ".join(WORD.findall(text.lower()))


def dedup_key(text):
    """64-bit hash of the normalised text (as a signed int, for Arrow): exact duplicates share it."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode(), digest_size=8).digest(), "little", signed=True)


MINHASH_SCHEME = "affine32"  # datasketch's hashing scheme, named so signatures rebuild the same way


def minhash(text, num_perm, shingle_size, seed):
    """MinHash signature (datasketch) of the document's word shingles, as a list of uint32 values."""
    from datasketch import MinHash
    words = normalise(text).split()
    shingles = {" ".join(words[i:i + shingle_size]) for i in range(max(1, len(words) - shingle_size + 1))}
    m = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)
    m.update_batch([s.encode() for s in sorted(shingles)])
    return m.hashvalues.astype(np.uint32).tolist()


def lsh_shape(threshold, num_perm):
    """The bands b and rows per band r of a MinHash signature that datasketch picks for this threshold."""
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(signatures, b, r):
    """(n, num_perm) MinHash signatures -> (n, b) uint64: one key per band of r values. Documents whose
    keys agree in some band are near-duplicate candidates (LSH). 8 bytes a band a document, rather than
    datasketch's MinHashLSH, whose Python set per bucket costs ~5 KB a document."""
    if not len(signatures):
        return np.zeros((0, b), np.uint64)
    sig = np.asarray(signatures, np.uint64)[:, :b * r].reshape(len(signatures), b, r)  # (n, b, r)
    with np.errstate(over="ignore"):
        return (sig * _band_mix(r)).sum(axis=2)  # (n, b), wrapping


@functools.lru_cache(maxsize=None)
def _band_mix(r):
    return np.random.default_rng(0).integers(1, 2 ** 63, size=r, dtype=np.uint64) | np.uint64(1)  # odd: a fixed mix


def band_edges(index, keys):
    """Documents index (m,), ascending, with one band's keys (m,) -> edges (u, v): every document whose
    key an earlier one had, to the first document that had it. The same for any split of the documents
    by key (the engines group them differently)."""
    _, first, bucket = np.unique(keys, return_index=True, return_inverse=True)
    v = index[first][bucket.reshape(-1)]  # (m,): the first document of each one's bucket
    u = index
    keep = u != v
    return u[keep], v[keep]


def components(u, v, n):
    """Connected components of the graph on n documents with edges (u, v): (n,) int64, each document's
    smallest connected document (itself when alone). Near-duplicates are whole components: chains of
    similar pages all go, and the first in input order stays. Labels only ever move to smaller documents
    of the same component, and pointer jumping halves the paths each round, so it ends in a few rounds."""
    label = np.arange(n, dtype=np.int64)
    u, v = np.asarray(u, np.int64), np.asarray(v, np.int64)
    while True:
        m = np.minimum(label[u], label[v])  # (E,): the smaller label at each edge's ends
        new = label.copy()
        for ends in (u, v, label[u], label[v]):  # the ends and the roots they point to take it
            np.minimum.at(new, ends, m)
        jumped = new[new]
        while not np.array_equal(jumped, new):
            new, jumped = jumped, jumped[jumped]
        if np.array_equal(new, label):
            return label
        label = new


# ------------------------------------------------------------------------------------------------------
# 8. held-out split

def split_hash(text, seed):
    """A stable number in [0, 1) from the document (and the seed): the document is held out when it falls
    below val_fraction, so it lands in the same split on every run and machine, whatever else is in the
    corpus. Taken after deduplication: near-duplicates are gone, so none straddles train and val."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}\n{text}".encode(), digest_size=8).digest(), "little")
    return h / 2 ** 64


# ------------------------------------------------------------------------------------------------------
# 7. model-based quality (CCNet: Wenzek et al. 2019, perplexity under a model of trusted text)

def perplexity(model, tok, text, max_tokens):
    """Perplexity of the document's first max_tokens tokens (and at most the model's context) under a
    nanoforge model: lower means closer to the text the model was trained on."""
    import torch
    if getattr(tok, "stoi", None) is not None:  # a character model: characters it never saw are skipped
        text = "".join(c for c in text if c in tok.stoi)
    ids = tok.encode(text)[:min(max_tokens, model.config.block_size) + 1]
    if len(ids) < 2:
        return float("inf")
    x = torch.tensor(ids[:-1])[None]  # (1, T)
    y = torch.tensor(ids[1:])[None]  # (1, T)
    with torch.no_grad():
        _, loss = model(x, y)
    return float(torch.exp(loss))
