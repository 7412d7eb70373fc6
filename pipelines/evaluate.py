"""``recsys eval``: a run's latest checkpoint on a split, against the true-probability ceiling.

Writes ``RUN/eval/SPLIT.json`` (the metrics), ``RUN/eval/SPLIT.png`` (ROC and calibration),
``RUN/eval/SPLIT-scores.parquet`` (request_id, user, label, prob[, true_prob] per candidate: what
the scorer's answers are compared with) and ``RUN/eval/SPLIT-cold.json`` (:func:`cold_start_report`).

A split with one class (no clicks, say) is evaluated too: the metrics that need both classes are
null, ``notes`` says why, and the plot's ROC panel is empty with the reason written in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.scoring import score_requests
from pipelines.plots import plot_eval
from pipelines.runs import Run, split_path
from pipelines.train import evaluate_split
from recsys.errors import RecsysError
from recsys.io import atomic_update_dir, write_json
from recsys.metrics import auc, evaluate, rate_interval

METRIC_FIELDS = ("auc", "gauc", "logloss", "calibration", "oracle_auc")
#: A request is a new user's when the user has fewer events than this before its cut-off.
NEW_USER_EVENTS = 20
#: The cold-start contract: empty-history scores' mean within this factor of new users' CTR.
COLD_START_FACTOR = 1.5


def evaluate_run(run_dir: str | Path, split: str = "valid", *, allow_partial: bool = False) -> dict[str, Any]:
    """Evaluate and write the eval files; return the metrics (JSON-safe), with ``cold_start``.

    Raises:
        DataError: the run is not finished (pipelines/runs.py) and ``allow_partial`` is false.
    """
    run = Run.open(run_dir)
    run.require_finished(allow_partial=allow_partial, command="evaluate")
    metrics, scores = evaluate_split(run, split, with_scores=True)
    final = run.path / "eval"
    # RUN/eval is replaced as a whole (a copy plus this split's files): a kill leaves the
    # previous set, never one split's scores beside another evaluation's metrics.
    with atomic_update_dir(final) as out:
        pq.write_table(pa.table(scores), out / f"{split}-scores.parquet")
        plot_eval(out / f"{split}.png", scores["label"], scores["prob"], scores.get("true_prob"),
                  title=f"{run.config.name} on {split} ({metrics['examples']:,} impressions)")
        cold = cold_start_report(run.path, split, allow_partial=allow_partial, out_dir=out)
        result = {"model": run.config.name, "split": split, "checkpoint": run.info["checkpoint"], **metrics,
                  "cold_start": cold, "png": f"{split}.png", "scores": f"{split}-scores.parquet"}
        # the file names its neighbours relative to itself: the run may move (an ablation's runs
        # are written under a hidden name and renamed when done)
        write_json(out / f"{split}.json", result)
    return {**result, "png": str(final / result["png"]), "scores": str(final / result["scores"])}


def _with_empty_histories(table: pa.Table) -> pa.Table:
    i = table.column_names.index("hist_len")
    return table.set_column(i, table.field(i), pa.array(np.zeros(table.num_rows, dtype=np.int32), table.field(i).type))


def cold_start_report(
    run_dir: str | Path, split: str = "test", *, new_user_events: int = NEW_USER_EVENTS,
    factor: float = COLD_START_FACTOR, allow_partial: bool = False, out_dir: Path | None = None,
) -> dict[str, Any]:
    """How the run's model scores users it knows nothing about; writes ``RUN/eval/SPLIT-cold.json``.

    Every request of the split is scored as if its user had no history (``hist_len`` = 0: no
    recent window, no search, no whole history; the profile and the candidates stay). The mean of
    those scores is compared with the observed CTR of the split's **new users' requests**: those
    whose user has fewer than ``new_user_events`` events before the cut-off. A model that never
    saw an empty history in training extrapolates there (0.4 against a CTR of 0.03 was seen);
    one trained with ``train.history_dropout`` should predict about the CTR of users it cannot
    tell apart. The contract (docs/TRAINING.md): ``ratio`` within [1/factor, factor].

    Args:
        run_dir: a run written by ``recsys train``.
        split: train, valid or test.
        new_user_events: requests with fewer events of history than this are new users'.
        factor: the bound ``within_factor`` checks.
        allow_partial: score an unfinished run's latest checkpoint too.
        out_dir: where to write ``SPLIT-cold.json`` (``evaluate_run``'s staging copy of
            ``RUN/eval``); default ``RUN/eval``, updated atomically.

    Returns:
        ``split, new_user_events, factor``; ``empty_history``: the metrics of
        :func:`recsys.metrics.evaluate` on the empty-history scores (``mean_prob``, ``auc``, ...);
        ``new_users``: ``requests, examples, clicks, ctr, ctr_interval`` (95% Wilson),
        ``mean_true_prob`` (null without ground truth), ``mean_prob_empty`` and ``auc_empty``
        (the empty-history scores of these requests); ``ratio`` (empty_history.mean_prob /
        new_users.ctr), ``ratio_interval`` (from the CTR's interval), ``within_factor``;
        ``notes``. Undefined values are null and a note says why.

    Raises:
        ValueError: new_user_events < 1 or factor <= 1.
        DataError: the run is not finished and ``allow_partial`` is false.
        RecsysError: the split has no candidates.
    """
    if new_user_events < 1:
        raise ValueError(f"new_user_events must be >= 1, got {new_user_events}")
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    run = Run.open(run_dir)
    run.require_finished(allow_partial=allow_partial, command="evaluate")
    table = pq.read_table(split_path(run.data_dir, split))
    store = run.store()
    scores = score_requests(run.load_model(), run.spec, store, _with_empty_histories(table), history_len=run.history_len,
                            search_k=run.search_k, max_history_events=run.config.train.max_history_events,
                            index=run.category_index(store) if run.search_k is not None else None)
    if len(scores["prob"]) == 0:
        raise RecsysError(f"the {split} split has no candidates to evaluate")
    empty = evaluate(scores["label"], scores["prob"], scores["user"], true_prob=scores.get("true_prob"))

    # Candidates come back in the table's order: a request's flag repeats over its candidates.
    per_request = table.column("label").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    new_request = table.column("hist_len").to_numpy() < new_user_events  # [R]
    new = np.repeat(new_request, per_request)  # [C]
    labels, probs = scores["label"][new], scores["prob"][new]
    clicks, examples = int(labels.sum()), int(new.sum())
    notes = []
    ctr = clicks / examples if examples else None
    if not examples:
        notes.append(f"no request of the {split} split has fewer than {new_user_events} events of history: "
                     "new users' CTR and the ratio are undefined")
    elif not clicks:
        notes.append(f"new users' {examples:,} impressions have no click: the ratio is undefined")
    new_auc = auc(labels, probs) if examples else float("nan")
    if examples and np.isnan(new_auc):
        notes.append("auc_empty is undefined: new users' impressions have one class")
    interval = rate_interval(clicks, examples)
    ratio = empty["mean_prob"] / ctr if ctr else None
    ratio_interval = None
    if ratio is not None:
        lo, hi = interval
        ratio_interval = [empty["mean_prob"] / hi, empty["mean_prob"] / lo if lo > 0 else None]
    report = {
        "split": split,
        "checkpoint": run.info["checkpoint"],
        "new_user_events": new_user_events,
        "factor": factor,
        "empty_history": empty,
        "new_users": {
            "requests": int(new_request.sum()),
            "examples": examples,
            "clicks": clicks,
            "ctr": ctr,
            "ctr_interval": None if interval is None else list(interval),
            "mean_true_prob": float(scores["true_prob"][new].mean()) if examples and "true_prob" in scores else None,
            "mean_prob_empty": float(probs.mean()) if examples else None,
            "auc_empty": None if np.isnan(new_auc) else float(new_auc),
        },
        "ratio": ratio,
        "ratio_interval": ratio_interval,
        "within_factor": None if ratio is None else bool(1 / factor <= ratio <= factor),
        "notes": notes,
    }
    if out_dir is not None:
        write_json(Path(out_dir) / f"{split}-cold.json", report)
    else:
        with atomic_update_dir(run.path / "eval") as out:
            write_json(out / f"{split}-cold.json", report)
    return report


def _num(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_cold_start(c: dict[str, Any]) -> str:
    """One line: empty-history mean prediction, new users' CTR, their ratio, empty-history AUC."""
    new, empty = c["new_users"], c["empty_history"]
    interval = "" if new["ctr_interval"] is None else f" [{new['ctr_interval'][0]:.4f}, {new['ctr_interval'][1]:.4f}]"
    verdict = {True: "within", False: "outside", None: "undefined"}[c["within_factor"]]
    return (f"  cold start   empty-history mean prediction {_num(empty['mean_prob'])}, new-user CTR {_num(new['ctr'])}"
            f"{interval} ({new['requests']:,} requests with < {c['new_user_events']} events), ratio "
            f"{_num(c['ratio'], '.2f')} ({verdict} x{c['factor']:g}), empty-history AUC {_num(empty['auc'])}")


def format_eval(r: dict[str, Any]) -> str:
    lines = [f"eval {r['model']} on {r['split']} ({r['checkpoint']})",
             f"  impressions {r['examples']:,}   clicks {r['positives']:,}   CTR {r['ctr']:.4f}"
             f"   mean prediction {_num(r.get('mean_prob'))}"]
    lines += [f"  {k:<12} {_num(r[k])}" for k in METRIC_FIELDS]
    lines.append(f"  GAUC over {r['gauc_users']:,} users ({r['gauc_users_skipped']:,} with one class skipped)")
    if "cold_start" in r:
        lines.append(format_cold_start(r["cold_start"]))
    lines += [f"  note: {n}" for n in r.get("notes", []) + r.get("cold_start", {}).get("notes", [])]
    lines.append(f"  plot: {r['png']}")
    return "\n".join(lines)
