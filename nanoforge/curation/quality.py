"""
Stage 7's DCLM-style quality classifier (Li et al. 2024, "DataComp-LM": a fastText model that tells a
trusted reference set from raw web text, the documents scoring most like the reference kept). Here a
logistic regression over hashed word unigrams and bigrams (scikit-learn), trained once up front on a
reference set the user trusts (positives) and the first documents of the corpus being curated
(negatives, raw web). After training, score(model, text) is a plain function of one document, so it runs
in curate.py's parallel map like the other per-document stages. Training is deterministic: hashing needs
no fitted vocabulary and lbfgs on a fixed input gives the same weights.
"""
import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression

from nanoforge.errors import UserError

# 2^18 hashed features: collisions are rare for the few thousand documents it is trained on, and the
# weights stay 2 MB, cheap to send to every worker process
VECTORIZER = HashingVectorizer(n_features=2 ** 18, ngram_range=(1, 2), alternate_sign=False, norm="l2",
                               lowercase=True, dtype=np.float64)


def train(reference, web):
    """A fitted classifier of reference (label 1) against web (label 0) texts. class_weight='balanced'
    keeps the two sides equal however many documents each has."""
    reference, web = [t for t in reference if t.strip()], [t for t in web if t.strip()]
    if not reference or not web:
        raise UserError(f"the classifier needs reference and web documents; got {len(reference)} reference and "
                        f"{len(web)} web documents with text: check --classifier_reference")
    x = VECTORIZER.transform(reference + web)  # (N, 2^18) sparse
    y = np.array([1] * len(reference) + [0] * len(web))
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000, solver="lbfgs")
    model.fit(x, y)
    return model


def score(model, text):
    """The probability (0-1) that the text comes from the reference set: higher means more like it."""
    x = VECTORIZER.transform([text])  # (1, 2^18)
    return float(model.predict_proba(x)[0, 1])
