"""
The data-curation stages curate.py runs: per-document cleanup, language, quality and safety filters
(stages.py), PII redaction (pii.py), the quality classifier (quality.py), the parallel pipeline with
deduplication (pipeline.py) and the report (report.py).
"""
