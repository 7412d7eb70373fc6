"""Data: the synthetic lifelong-behaviour world, source loaders and the polars/pyarrow pipeline
that turns raw logs into vocabularies, a per-user history store and training requests.

Never imports ``models``, ``pipelines`` or ``serving``.
"""
