"""The state of a training run, as its ``run.json`` records it (written by pipelines/train.py).

``status``: ``running`` while a process trains the run (``owner`` names it); ``finished``;
``interrupted`` (stopped by a signal, or found ``running`` with its process gone: killed);
``failed`` (an error; ``error`` says which). Runs written before states existed have no
``status`` and count as finished. Evaluation and export use only finished runs unless told
otherwise (``--allow-partial``): a run stopped after one of three epochs is not the model its
config describes.

Example:
    >>> info = {"status": "interrupted", "epochs_done": 1, "stop": "stopped by SIGINT at epoch 2 step 40",
    ...         "checkpoint": "checkpoints/epoch-001.pt"}
    >>> describe(info, epochs=3)
    'interrupted after 1 of 3 epochs (stopped by SIGINT at epoch 2 step 40)'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from recsys.errors import DataError
from recsys.io import owner_alive


def status_of(info: Mapping[str, Any]) -> str:
    """finished, running, interrupted or failed."""
    status = str(info.get("status", "finished"))
    if status == "running" and not owner_alive(str(info.get("owner", "0"))):
        return "interrupted"
    return status


def describe(info: Mapping[str, Any], *, epochs: int) -> str:
    """One line: the state, how far the run got, and why it stopped."""
    status = status_of(info)
    text = f"{status} after {info.get('epochs_done', 0)} of {epochs} epochs"
    if status == "interrupted" and info.get("status") == "running":
        text += " (its process is gone: killed)"
    elif status == "interrupted" and info.get("stop"):
        text += f" ({info['stop']})"
    elif status == "failed" and info.get("error"):
        text += f": {info['error']}"
    elif status == "running":
        text += f" (process {str(info.get('owner', '?')).partition('.')[0]} is training it now)"
    return text


def require_finished(info: Mapping[str, Any], *, epochs: int, run: str, allow_partial: bool, command: str) -> None:
    """Refuse an unfinished run, saying what state it is in and what to do about it.

    Raises:
        DataError: the run is not finished and ``allow_partial`` is false, or it has no epoch
        checkpoint at all.
    """
    status = status_of(info)
    if status == "finished":
        return
    if not allow_partial:
        hint = {"interrupted": f"resume it with `recsys train --resume {run}`",
                "failed": f"fix what failed, then resume it with `recsys train --resume {run}`"}.get(
            status, "wait for it to finish")
        raise DataError(f"the run is {describe(info, epochs=epochs)}; {hint}, or pass --allow-partial to {command} "
                        f"its latest epoch checkpoint ({info.get('checkpoint') or 'none yet'})", file=run)
    if not info.get("checkpoint"):
        raise DataError(f"the run is {describe(info, epochs=epochs)} and has no epoch checkpoint yet", file=run)
