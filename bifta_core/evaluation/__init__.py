"""Evaluation: every method scored from one set of embeddings (``metrics``), those embeddings as
Arrow/Parquet (``embeddings``), and the Markdown/PNG report (``report``)."""
