"""Feature steps: ``LazyFrame -> LazyFrame`` functions with a declared output schema.

A step is composed with ``.pipe`` and checked when it is composed (lazily, before any data is
read): if the frame it returns lacks a declared column or has another dtype, that is a bug in the
step and fails at once with the step's name, not deep inside a later join.

Example:
    >>> import polars as pl
    >>> @feature_step({"y": pl.Int64})
    ... def add_y(lf: pl.LazyFrame) -> pl.LazyFrame:
    ...     return lf.with_columns(y=pl.col("x") * 2)
    >>> pl.LazyFrame({"x": [1, 2]}).pipe(add_y).collect()["y"].to_list()
    [2, 4]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import ParamSpec

import polars as pl

P = ParamSpec("P")


def feature_step(
    output: Mapping[str, pl.DataType | type[pl.DataType]],
) -> Callable[[Callable[P, pl.LazyFrame]], Callable[P, pl.LazyFrame]]:
    """Declare the columns (and dtypes) a step's output must contain."""

    def wrap(fn: Callable[P, pl.LazyFrame]) -> Callable[P, pl.LazyFrame]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> pl.LazyFrame:
            lf = fn(*args, **kwargs)
            schema = lf.collect_schema()
            for name, dtype in output.items():
                if name not in schema:
                    raise RuntimeError(f"feature step {fn.__name__} did not produce column {name!r}")
                if not schema[name].is_(dtype if isinstance(dtype, pl.DataType) else dtype()):
                    raise RuntimeError(
                        f"feature step {fn.__name__}: column {name!r} is {schema[name]}, declared {dtype}"
                    )
            return lf

        return run

    return wrap
