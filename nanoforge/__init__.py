"""
What nanoforge's scripts share, one concern a module. The scripts at the repository's root (train.py,
sample.py, evaluate.py, ...) are what you run; model.py (the transformer) and configurator.py (the
--key=value overrides) sit beside them. Nothing here runs on import.
"""
