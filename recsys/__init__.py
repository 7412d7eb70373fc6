"""recsys: CTR prediction over lifelong user behaviour sequences.

Top-level packages, one direction of use::

    recsys (config, shared types, errors, CLI) <- features (polars/pyarrow data)
        <- models (torch/torchrec) <- pipelines (Ray training, evaluation) and serving (HTTP)
"""

__version__ = "0.1.0"
