"""Evaluation figures: ROC curve and reliability diagram of a CTR model in one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from recsys.metrics import auc, calibration_bins, roc_curve


def plot_eval(
    path: str | Path,
    labels: np.ndarray,
    probs: np.ndarray,
    true_prob: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Write a two-panel PNG: ROC curves (model, and oracle when given) and a reliability plot.

    The reliability panel is log-log: CTRs sit around a few percent, where linear axes squeeze
    every bin into one corner. Bins with no click cannot be drawn on a log axis and are left out.
    When the labels have one class the ROC curve is undefined: the ROC panel is drawn empty and
    says why, and the reliability panel is drawn as usual.

    Args:
        path: the PNG to write; parent folders are created.
        labels: [N] 0/1 clicks (one class is allowed).
        probs: [N] predicted click probabilities.
        true_prob: [N] true click probabilities, if known; drawn as the "oracle" ROC curve.
        title: the figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: when the lengths differ or there are no examples.

    Example:
        >>> import tempfile
        >>> rng = np.random.default_rng(0)
        >>> p = rng.uniform(0.01, 0.1, 2000)
        >>> out = plot_eval(Path(tempfile.mkdtemp()) / "eval.png", rng.random(2000) < p, p, true_prob=p)
        >>> out.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    path = Path(path)
    labels = np.asarray(labels).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()

    # A bare Figure with its own Agg canvas: no pyplot, so no global backend switch and no
    # figure registry to leak into; the figure is freed with its last reference.
    fig = Figure(figsize=(10, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    roc_ax, cal_ax = fig.subplots(1, 2)

    curves = [("model", probs)]
    if true_prob is not None:
        curves.append(("oracle", np.asarray(true_prob, dtype=np.float64).ravel()))
    positives = int(labels.astype(bool).sum())
    if 0 < positives < labels.size:
        for name, scores in curves:
            fpr, tpr = roc_curve(labels, scores)
            roc_ax.plot(fpr, tpr, label=f"{name} (AUC {auc(labels, scores):.4f})")
    else:
        roc_ax.text(0.5, 0.55, f"no ROC curve: one class\n({positives:,} clicks in {labels.size:,} impressions)",
                    ha="center", va="center", transform=roc_ax.transAxes)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="random")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
               xlim=(0, 1), ylim=(0, 1), aspect="equal")
    roc_ax.legend(loc="lower right", fontsize="small")

    mean_pred, observed, count = calibration_bins(labels, probs, bins=10)
    drawable = (mean_pred > 0) & (observed > 0)
    cal_ax.plot(mean_pred[drawable], observed[drawable], marker="o", label="quantile bins")
    points = np.r_[mean_pred[drawable], observed[drawable]]
    lo, hi = (points.min() / 1.5, min(points.max() * 1.5, 1.0)) if points.size else (1e-3, 1.0)
    cal_ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="y = x")
    cal_ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), aspect="equal",
               xlabel="mean predicted CTR", ylabel="observed CTR",
               title=f"calibration ({int(count.sum())} examples)")
    if not points.size:
        cal_ax.text(0.5, 0.5, f"no bin has a click: nothing to place on log axes\n(mean prediction {probs.mean():.4f})",
                    ha="center", va="center", transform=cal_ax.transAxes)
    cal_ax.legend(loc="upper left", fontsize="small")

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
