"""``recsys bench quant``: a model's embedding tables at fp32, fp16, int8 and int4, same weights.

One process, one trained model (a run's latest checkpoint or an export's weights, fp32 as trained).
For each precision of :data:`models.quant.PRECISIONS`: a copy of the model with its tables converted
(:func:`models.quant.quantize_embeddings`; the dense part stays fp32), then

* ``table_bytes``: the bytes of every table as stored (:func:`models.quant.table_bytes`: values,
  per-row scale and bias, row padding) and ``bytes_ratio`` to fp32;
* the metrics of ``recsys eval`` on the split (:func:`pipelines.train.evaluate_model`, the same
  scoring and metric code): ``auc``, ``logloss``, ``gauc``, and ``delta_auc`` = auc - fp32's auc;
* ``max_abs_prob_diff``: the largest difference of a candidate's click probability from fp32's.

The issue's target for ``full`` (its bytes are mostly CAN's 160-wide induction rows): int8 at most
30% of fp32's table bytes with |delta AUC| <= 0.001 (``target`` in the result, ``int8_meets_target``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from models.ctr import CTRModel
from models.export import load_export
from models.quant import PRECISIONS, quantize_embeddings, table_bytes
from pipelines.runs import Run, dataset_spec
from pipelines.train import evaluate_model
from recsys.errors import RecsysError
from recsys.progress import note
from recsys.timing import machine_info

#: The issue's target for int8 (``full`` on medium): table bytes and |delta AUC| against fp32.
INT8_TARGET = {"bytes_ratio_max": 0.30, "abs_delta_auc_max": 0.001}


def bench_quant(*, data: str | Path, run: str | Path | None = None, export: str | Path | None = None,
                split: str = "test") -> dict[str, Any]:
    """Table bytes and test metrics of one model at every precision (see the module docstring).

    Args:
        data: the built dataset the model was trained on (``recsys data build``).
        run: a finished training run (its latest checkpoint); or
        export: an export (its weights, whatever precision its manifest names).
        split: train, valid or test.

    Returns:
        ``model``, ``source``, ``data``, ``split``, ``examples``, ``machine``, ``target``,
        ``int8_meets_target`` and ``rows``: one per precision, fp32 first, with ``precision``,
        ``tables`` ({table: bytes}), ``table_bytes``, ``bytes_ratio``, ``auc``, ``gauc``,
        ``logloss``, ``delta_auc``, ``abs_delta_auc``, ``max_abs_prob_diff``.

    Raises:
        RecsysError: not exactly one of ``run`` and ``export``, an unfinished run, an export that
            does not verify, or ``data`` whose features differ from the model's.
    """
    if (run is None) == (export is None):
        raise RecsysError("--run and --export: give exactly one of them")
    if run is not None:
        r = Run.open(run)
        r.require_finished(allow_partial=False, command="bench quant")
        model, spec, history_len, config = r.load_model(), r.spec, r.history_len, r.config
        source = {"run": str(run), "checkpoint": r.info["checkpoint"]}
    else:
        e = load_export(export, embeddings="fp32")
        model, spec, history_len, config = e.model, e.spec, e.history_len, e.config
        source = {"export": str(export), "weights_sha256": e.weights_sha256}
    _, data_spec = dataset_spec(Path(data), config)
    if dict(data_spec.sizes) != dict(spec.sizes):
        raise RecsysError(f"--data {data}: feature sizes {dict(data_spec.sizes)} differ from the model's "
                          f"{dict(spec.sizes)}: give the dataset the model was trained on")

    rows, base = [], None
    for precision in PRECISIONS:
        note(f"[bench quant] {config.name} at {precision}: scoring the {split} split")
        quantized: CTRModel = quantize_embeddings(copy.deepcopy(model).eval(), precision)
        metrics, scores = evaluate_model(quantized, spec, Path(data), split, history_len=history_len,
                                         search_k=quantized.search_k, with_scores=True)
        tables = table_bytes(quantized)
        if base is None:
            base = {"bytes": tables["total"], "auc": metrics["auc"], "prob": scores["prob"]}
        delta = None if metrics["auc"] is None or base["auc"] is None else metrics["auc"] - base["auc"]
        rows.append({
            "precision": precision, "tables": {k: v for k, v in tables.items() if k != "total"},
            "table_bytes": tables["total"], "bytes_ratio": tables["total"] / base["bytes"],
            "auc": metrics["auc"], "gauc": metrics["gauc"], "logloss": metrics["logloss"],
            "delta_auc": delta, "abs_delta_auc": None if delta is None else abs(delta),
            "max_abs_prob_diff": float(np.max(np.abs(scores["prob"] - base["prob"]))),
        })
        examples = int(metrics["examples"])
    int8 = next(row for row in rows if row["precision"] == "int8")
    meets = (None if int8["abs_delta_auc"] is None else
             bool(int8["bytes_ratio"] <= INT8_TARGET["bytes_ratio_max"]
                  and int8["abs_delta_auc"] <= INT8_TARGET["abs_delta_auc_max"]))
    return {"model": config.name, "source": source, "data": str(data), "split": split, "examples": examples,
            "machine": machine_info(), "target": dict(INT8_TARGET), "int8_meets_target": meets, "rows": rows}


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_bench_quant(r: dict[str, Any]) -> str:
    """The result as a table: one row per precision."""
    m = r["machine"]
    where = r["source"].get("run") or r["source"].get("export")
    lines = [f"recsys bench quant   {r['model']} ({where}) on {r['split']} of {r['data']}: {r['examples']:,} impressions",
             f"  ({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']})",
             "  precision   table bytes   vs fp32      AUC       dAUC   logloss   max |dprob|"]
    for row in r["rows"]:
        lines.append(f"  {row['precision']:<9} {row['table_bytes']:>13,} {row['bytes_ratio']:>8.1%}   "
                     f"{_num(row['auc'], '.4f'):>6} {_num(row['delta_auc'], '+.4f'):>10} "
                     f"{_num(row['logloss'], '.4f'):>9} {row['max_abs_prob_diff']:>13.2e}")
    t = r["target"]
    verdict = {True: "met", False: "missed", None: "undefined (no AUC)"}[r["int8_meets_target"]]
    lines.append(f"  target (int8 <= {t['bytes_ratio_max']:.0%} of fp32 bytes, |dAUC| <= {t['abs_delta_auc_max']:g}): "
                 f"{verdict}")
    return "\n".join(lines)
