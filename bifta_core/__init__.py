"""bifta_core: pure algorithms for fine-grained zero-shot labelling with CLIP.

Nothing in this package imports Ray; every function is usable and testable on its own.
"""

__version__ = "0.1.0"
