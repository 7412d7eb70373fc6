"""``recsys bench data``: throughput of the data jobs, and the history build against pandas.

Figures: events/s of ``data synth`` and of ``data build`` on one world, and the history build
(encode ids through the vocabularies, sort by (user, time), write the store) by our polars path
(:func:`features.build.build_history`, the code the build runs) against a plain pandas
implementation of the same job on the same events, in the same run. Both outputs are compared
array by array before any figure is reported. Times are wall-clock seconds, best of ``repeat``.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features.build import build, build_history
from features.history import HistoryStore, write_history
from features.synth import generate
from features.vocab import Vocab
from recsys.progress import note
from recsys.schemas import BuildConfig, SynthConfig
from recsys.types import BEHAVIOR_CODE

HISTORY_VOCABS = ("user_id", "item_id", "category_id")


def history_pandas(events_path: Path, vocab_dir: Path, out: Path) -> None:
    """The same job as ``build_history`` written the way a pandas user would."""
    import pandas as pd

    df = pd.read_parquet(events_path, columns=["user_id", "item_id", "category_id", "behavior", "timestamp"])
    for column, name in (("user_id", "user"), ("item_id", "item"), ("category_id", "category")):
        vocab = pd.read_parquet(vocab_dir / f"{column}.parquet").iloc[1:]
        mapping = pd.Series(vocab["index"].to_numpy(), index=vocab["raw"].to_numpy())
        df[name] = df[column].map(mapping).fillna(0).astype("int32")
    df["behavior"] = df["behavior"].astype(str).map(BEHAVIOR_CODE).astype("int8")
    df = df.sort_values(["user", "timestamp"], kind="stable")
    n_users = len(pd.read_parquet(vocab_dir / "user_id.parquet"))
    write_history(
        out, num_users=n_users, user=df["user"].to_numpy(), item=df["item"].to_numpy(),
        category=df["category"].to_numpy(), behavior=df["behavior"].to_numpy(),
        timestamp=df["timestamp"].to_numpy(), presorted=True,
    )


def history_polars(events_path: Path, vocab_dir: Path, out: Path) -> None:
    vocabs = {name: Vocab.load(vocab_dir, name) for name in HISTORY_VOCABS}
    events = (
        pl.scan_parquet(events_path)
        .with_row_index("line")
        .with_columns(
            pl.col("behavior").cast(pl.String).replace_strict(BEHAVIOR_CODE, return_dtype=pl.Int8)
        )
    )
    build_history(events, vocabs, out)


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_data(cfg: SynthConfig, *, preset: str | None, work: Path, repeat: int = 3) -> dict[str, Any]:
    work = Path(work)
    world, data, scratch = work / "world", work / "data", work / "scratch"
    shutil.rmtree(work, ignore_errors=True)
    scratch.mkdir(parents=True)

    note(f"[bench] data synth --preset {preset} ...")
    start = time.perf_counter()
    manifest = generate(cfg, world, preset=preset)
    synth_s = time.perf_counter() - start
    events = manifest["counts"]["events"]

    note("[bench] data build ...")
    start = time.perf_counter()
    report = build(f"synth:{world}", data, BuildConfig())
    build_s = time.perf_counter() - start

    note(f"[bench] history build, polars vs pandas, best of {repeat} ...")
    ours, theirs = scratch / "polars.arrow", scratch / "pandas.arrow"
    polars_s = _best(lambda: history_polars(world / "events.parquet", data / "vocab", ours), repeat)
    pandas_s = _best(lambda: history_pandas(world / "events.parquet", data / "vocab", theirs), repeat)
    a, b = HistoryStore.open(ours), HistoryStore.open(theirs)
    for field in ("offsets", "item", "category", "behavior", "timestamp"):
        if not np.array_equal(getattr(a, field), getattr(b, field)):
            raise RuntimeError(f"polars and pandas history builds differ in {field}: benchmark invalid")
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "polars": pl.__version__},
        "preset": preset,
        "events": events,
        "impressions": manifest["counts"]["impressions"],
        "synth": {"seconds": round(synth_s, 2), "events_per_s": round(events / synth_s)},
        "build": {"seconds": round(build_s, 2), "events_per_s": round(events / build_s),
                  "steps": report["seconds"]},
        "history": {"polars_s": round(polars_s, 3), "pandas_s": round(pandas_s, 3),
                    "speedup_vs_pandas": round(pandas_s / polars_s, 2), "identical": True},
    }


def format_bench(r: dict[str, Any]) -> str:
    m = r["machine"]
    return "\n".join([
        f"recsys bench data --preset {r['preset']}   ({m['cpus']} CPUs, {m['platform']}, Python {m['python']})",
        f"  world: {r['events']:,} events, {r['impressions']:,} impressions",
        f"  data synth   {r['synth']['seconds']:>8.2f} s   {r['synth']['events_per_s']:>12,} events/s",
        f"  data build   {r['build']['seconds']:>8.2f} s   {r['build']['events_per_s']:>12,} events/s",
        f"  history build: polars {r['history']['polars_s']:.3f} s, pandas {r['history']['pandas_s']:.3f} s "
        f"-> {r['history']['speedup_vs_pandas']:.2f}x faster than pandas (outputs identical)",
    ])
