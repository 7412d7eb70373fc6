"""Scoring raw-id requests with a loaded export: ids -> indices -> one batch -> probabilities.

A request is one user at one time with candidates (raw ids, as the outside world knows them)::

    {"user_id": 17, "timestamp": 1700000000,            # timestamp optional: now
     "candidates": [{"item_id": 5, "category_id": 3}, {"item_id": 9}],
     "history": [{"item_id": 5, "category_id": 3, "behavior": "pv", "timestamp": 1699990000}]}

* Raw ids go through the export's vocabularies; an unknown id is the out-of-vocabulary row 0,
  never an error (a new item or user is scored from what the model knows of row 0).
* A candidate's missing attributes (``category_id``, ``brand_id``, ``price_bucket``) come from
  ``items.parquet`` by item index; the user's profile from ``users.parquet`` by user index.
  An attribute the model has no feature for (``brand_id`` on Taobao data) is ignored.
* History: the request's own events when it brings them (``history``, even ``[]``: event dicts,
  or :class:`serving.decode.Events` columns), else the user's events in the shipped history
  store; either way only events strictly before ``timestamp``, oldest first, the last
  ``history_len`` of them. A model with SIM hard search
  also gets each candidate's K most recent same-category behaviours from the whole history
  before ``timestamp``, through the shipped category index.

Every request of a :meth:`Scorer.score_batch` call goes through ``models.batch.make_batch`` and
the model once; the id mapping is vectorised (sorted raw ids + ``np.searchsorted``, built once).
:meth:`Scorer.score_many` also says which requests are cold (:class:`Scored`): an unknown user, no
history event before the cut-off, candidates whose item id no vocabulary knows.

An export shipped without its history store (``recsys export --no-history``) cannot score a
request that brings no ``history``: that is a :class:`~recsys.errors.DataError`, not an empty
history. A model whose output is not finite (diverged weights) raises :class:`NonFiniteScoreError`
instead of answering NaN.

Exploration. A request may carry ``"explore": {"policy": "ts"|"ucb", "seed"?, "gate"?,
"gate_threshold"?, "lam"?, "impression_threshold"?, "samples"?}`` (:class:`serving.decode.Explore`);
the fields it leaves out come from :attr:`Scorer.explore_defaults` (``ExploreConfig``'s defaults,
with the gate ``learned`` when the export has one, else ``none``). It is then scored by
:class:`models.age.AGEExplorer`: ``scores`` stay the exploit scores, and :class:`Scored` adds the
explore scores, which candidates were explored (σ: gate open and fewer impressions than the
threshold) and the ``ranking`` by explore score. Impression counts are read from the state store
for the candidates' raw item ids; a scorer without a state store has none, so every item counts 0
impressions (always below the threshold) and ``explore["impressions_counted"]`` says so.
``gate: learned`` on an export trained without the gate (``model.age.gate``) is refused, naming
``explore.gate``. Without ``seed`` a random one is drawn and returned in ``explore["seed"]``: the
same request with that seed gets the same scores. With a KSA model read from cached states, the
read-outs follow the perturbed query (models/age.py, "Serving").

Example:
    >>> import polars as pl
    >>> ids = IdMap.from_vocab(Vocab.fit("item_id", pl.Series([70, 70, 90, 50])))
    >>> ids.encode(np.array([70, 50, 90, 12345])).tolist()   # unknown -> 0 (OOV)
    [1, 2, 3, 0]
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from features.category_index import CategoryIndex
from features.history import last_rows
from features.vocab import Vocab
from models.age import AGEExplorer
from models.batch import HISTORY_FIELDS, RequestBatch, Searched, hard_search, make_batch
from models.export import CANDIDATE_ATTRIBUTES, FEATURE_VOCAB, Export, load_export
from recsys.errors import DataError
from recsys.model_schemas import ExploreConfig
from recsys.types import BEHAVIOR_CODE, BEHAVIORS, OOV_INDEX, Jagged
from serving.decode import EXPLORE, Events, describe_errors
from serving.ksa_cache import BLOB_VERSION as KSA_BLOB_VERSION
from serving.ksa_cache import KSACache
from serving.live import DEFAULT_LIVE_BYTES, LiveHistory, UserLive, search_batch
from serving.store import StateStore

_INT64 = (-(2**63), 2**63 - 1)
#: Memory for per-user KSA states (``recsys serve --ksa-cache-mb``, 256).
DEFAULT_KSA_CACHE_BYTES = 256 * 2**20


class NonFiniteScoreError(RuntimeError):
    """The model gave a NaN or infinite logit: the export is broken, not the request."""


@dataclass(frozen=True)
class Scored:
    """One request's click probabilities and how much of it the model has seen before.

    ``cold`` is true when any part of the request is new to the model: the user id is in no
    vocabulary (``unknown_user``), no history event precedes the cut-off (``no_history``: the
    user has none, or the timestamp is before the first), or some candidate item ids are unknown
    (``unknown_items``: how many; they score as the out-of-vocabulary row).
    """

    scores: list[float]
    unknown_user: bool
    no_history: bool
    unknown_items: int
    # a request with ``explore`` (AGE; None otherwise), per candidate:
    explore_scores: list[float] | None = None  # the explore score ŷ_e (= scores where not explored)
    explored: list[bool] | None = None  # σ: the gate open and fewer impressions than the threshold
    impressions: list[int] | None = None  # as read from the state store (0s without one)
    explore: dict[str, Any] | None = None  # the policy applied: policy, seed, gate, lam, thresholds, ...

    @property
    def cold(self) -> bool:
        return self.unknown_user or self.no_history or self.unknown_items > 0

    @property
    def ranking(self) -> list[int]:
        """Candidate indices, best first: by explore score when exploring, else by score (ties keep
        the request's order)."""
        key = np.asarray(self.explore_scores if self.explore_scores is not None else self.scores)
        return np.argsort(-key, kind="stable").tolist()


@dataclass(frozen=True)
class ExplorePolicy:
    """One request's exploration: the explorer's config and the seed of its random draws."""

    config: ExploreConfig
    seed: int


@dataclass(frozen=True)
class _Prepared:
    """A batch of requests, ready for the model."""

    batch: RequestBatch
    user_raw: np.ndarray  # [B] raw user ids
    users: np.ndarray  # [B] user indices
    ts: np.ndarray  # [B] cut-offs
    hist_len: np.ndarray  # [B] events before each cut-off
    items: np.ndarray  # [C] candidate item indices
    num: np.ndarray  # [B] candidates per request
    whole: dict[str, Jagged] | None  # whole histories, when the KSA block is read from cached states


@dataclass(frozen=True)
class IdMap:
    """Raw id -> vocabulary index for many ids at once (unknown -> ``OOV_INDEX``)."""

    raw: np.ndarray  # [n] int64, sorted
    index: np.ndarray  # [n] int64, index of raw[k]

    @classmethod
    def from_vocab(cls, vocab: Vocab) -> IdMap:
        known = vocab.table.slice(1)  # row 0 is the OOV row (raw = null)
        raw = known["raw"].to_numpy().astype(np.int64)
        order = np.argsort(raw, kind="stable")
        return cls(raw=raw[order], index=known["index"].to_numpy().astype(np.int64)[order])

    def encode(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64)
        if len(self.raw) == 0:
            return np.full(raw.shape, OOV_INDEX, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.raw, raw), len(self.raw) - 1)
        return np.where(self.raw[pos] == raw, self.index[pos], OOV_INDEX)


class Scorer:
    """Click probabilities for raw-id requests, from a loaded :class:`~models.export.Export`, whose
    tables run at ``export.embeddings`` (fp32, or quantized at load: :meth:`load`'s ``embeddings``)."""

    def __init__(self, export: Export, *, live: LiveHistory | None = None,
                 ksa_cache_bytes: int | None = DEFAULT_KSA_CACHE_BYTES) -> None:
        if live is not None and export.history is None:
            raise DataError(f"export {export.path}: exported with --no-history, so it has no histories for the events "
                            "appended through the API to extend; serve it without a state store")
        self.export = export
        self.live = live
        # A KSA block (and SIM's KSA-guided search) reads per-user states (serving/ksa_cache.py)
        # instead of encoding whole histories.
        self.ksa = None
        if "ksa" in export.model.blocks and ksa_cache_bytes:
            # with a state store, states survive a restart and are shared by processes (as blobs)
            blobs = {} if live is None else {
                "load": lambda user: live.store.get_blob(f"ksa:{user}", KSA_BLOB_VERSION),
                "save": lambda user, data: live.store.put_blob(f"ksa:{user}", KSA_BLOB_VERSION, data)}
            # states of an int8 model differ from fp32's: the id names the precision too
            self.ksa = KSACache(export.model, budget_bytes=ksa_cache_bytes, model_id=export.model_id, **blobs)
        if self.ksa is not None and live is not None:
            live.on_change(self.ksa.invalidate)  # a late event moved the events after it
        # the batch then carries only what the other blocks read
        self.batch_history_len = (export.model.history_len_without(self.ksa.blocks) if self.ksa is not None
                                  else export.history_len)
        self.spec = export.spec
        self.history_len = export.history_len
        self.search_k = export.model.search_k  # SIM hard search: K behaviours per candidate
        self.ids = {name: IdMap.from_vocab(v) for name, v in export.vocabularies.items()}
        # Features a request may set by raw id, with the vocabulary that encodes them.
        self.attributes = {attr: feature for attr, feature in CANDIDATE_ATTRIBUTES.items()
                           if feature in self.spec.candidate}
        #: What a request's ``explore`` object does not say (module docstring, "Exploration"); the gate
        #: is the export's learned gate when it has one, else none.
        self.explore_defaults = ExploreConfig(gate="learned" if export.model.gate is not None else "none")
        # AGE's dropout forwards swap the model's dense parameters in place (torch.func.functional_call):
        # every model call (KSA states included) runs under this lock, one at a time
        self._model_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, state: StateStore | None = None,
             ksa_cache_bytes: int | None = DEFAULT_KSA_CACHE_BYTES, live_bytes: int = DEFAULT_LIVE_BYTES,
             embeddings: str | None = None) -> Scorer:
        """Verify and load the export at ``path`` (:func:`models.export.load_export`, its tables at
        ``embeddings``: fp32, fp16, int8, int4; None: the export's own precision); with a ``state``
        store, score from the live histories (the export's plus the store's events)."""
        export = load_export(path, embeddings=embeddings)
        if state is None:
            return cls(export, ksa_cache_bytes=ksa_cache_bytes)
        return cls.live_from(export, state, ksa_cache_bytes=ksa_cache_bytes, live_bytes=live_bytes)

    @classmethod
    def live_from(cls, export: Export, store: StateStore, *, ksa_cache_bytes: int | None = DEFAULT_KSA_CACHE_BYTES,
                  live_bytes: int = DEFAULT_LIVE_BYTES) -> Scorer:
        """A scorer of ``export`` whose users' histories include the events logged in ``store``
        (merged histories held under ``live_bytes``, KSA states under ``ksa_cache_bytes``)."""
        ids = {name: IdMap.from_vocab(v) for name, v in export.vocabularies.items()}
        index = export.category_index
        live = LiveHistory(store, history=export.history, users=ids["user_id"].encode, items=ids["item_id"].encode,
                           categories=ids["category_id"].encode,
                           per_category=index.per_category if index is not None else None, budget_bytes=live_bytes)
        return cls(export, live=live, ksa_cache_bytes=ksa_cache_bytes)

    @property
    def name(self) -> str:
        return self.export.name

    def score(
        self,
        user_id: int,
        candidates: Sequence[Mapping[str, Any]],
        *,
        timestamp: int | None = None,
        history: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[float]:
        """Click probabilities of ``candidates`` for ``user_id`` at ``timestamp``, in order.

        Args:
            user_id: the raw user id (unknown: the OOV user, empty history, OOV profile).
            candidates: ``{"item_id", ["category_id", "brand_id", "price_bucket"]}`` raw ids.
            timestamp: the cut-off (unix seconds); default now.
            history: ``{"item_id", "category_id", "behavior", "timestamp"}`` events to use instead
                of the stored history (``behavior`` one of pv, cart, fav, buy).

        Raises:
            DataError: a field that is missing or not an integer, an unknown behaviour name, or no
                ``history`` for an export without a history store.
            NonFiniteScoreError: the model's output is NaN or infinite (broken weights).
        """
        request = {"user_id": user_id, "candidates": candidates, "timestamp": timestamp, "history": history}
        return self.score_batch([request])[0]

    def score_batch(self, requests: Sequence[Mapping[str, Any]]) -> list[list[float]]:
        """:meth:`score` for several requests (mappings with the same keys) in one model call."""
        return [s.scores for s in self.score_many(requests)]

    @torch.no_grad()
    def score_many(self, requests: Sequence[Mapping[str, Any]]) -> list[Scored]:
        """:meth:`score_batch`, with each request's coldness (:class:`Scored`), and AGE's exploration
        for the requests that carry an ``explore`` object (module docstring, "Exploration").

        The requests without ``explore`` go through the model in one call (two with a KSA cache when
        some bring their own ``history``: those run the KSA block on it, the others read their states). Each exploring request is
        then scored alone: its random draws come from its own seed, so its scores never depend on
        the other requests of the call (as no request's scores do).

        Raises:
            DataError: as :meth:`score`, or a bad ``explore`` object (the message names the field,
                e.g. ``requests[0].explore.gate``).
            StoreError: the state store cannot be read (impression counts).
        """
        if not requests:
            return []
        policies = [self._explore_policy(r.get("explore"), i) for i, r in enumerate(requests)]
        out: list[Scored | None] = [None] * len(requests)
        plain = [i for i, p in enumerate(policies) if p is None]
        groups = [plain]
        if self.ksa is not None:  # a call reads cached KSA states only if none of its requests brings a history
            groups = [[i for i in plain if requests[i].get("history") is None],
                      [i for i in plain if requests[i].get("history") is not None]]
        for group in groups:
            if group:
                for i, scored in zip(group, self._score_plain([requests[i] for i in group], group), strict=True):
                    out[i] = scored
        for i, policy in enumerate(policies):
            if policy is not None:
                out[i] = self._score_explore(requests[i], i, policy)
        return out

    def _prepare(self, requests: Sequence[Mapping[str, Any]], rows: Sequence[int]) -> _Prepared:
        """One batch of ``requests``, every field checked; ``rows[i]`` is request i's index in the
        caller's list (what an error names)."""
        if self.export.history is None:
            for i, r in enumerate(requests):
                if r.get("history") is None:
                    raise DataError(f"requests[{rows[i]}].history: required: this export ships no history store "
                                    "(exported with --no-history)")
        now = int(time.time())
        user_raw = np.array([_int(r.get("user_id"), f"requests[{rows[i]}].user_id") for i, r in enumerate(requests)],
                            dtype=np.int64)
        ts = np.array([now if r.get("timestamp") is None else _int(r["timestamp"], f"requests[{rows[i]}].timestamp")
                       for i, r in enumerate(requests)], dtype=np.int64)
        users = self.ids["user_id"].encode(user_raw)  # [B]
        candidates, num = self._candidates(requests, rows)
        # Users with events appended through the API read their live view (export + log)
        lives = [self.live.user(int(user_raw[i])) if self.live is not None and r.get("history") is None else None
                 for i, r in enumerate(requests)]
        # SIM hard search reads the shipped index, or (requests that bring their own history) an index
        # of the whole histories, which are then gathered too
        local = self.search_k is not None and (self.export.category_index is None
                                               or any(r.get("history") is not None for r in requests))
        snapshots: dict[int, Mapping[str, np.ndarray]] = {}  # request -> its live user's events, as read
        cached = self.ksa is not None and all(r.get("history") is None for r in requests)
        full = local or cached  # the cache reads each request's whole history
        history, hist_len = self._history(requests, users, ts, None if full else self.history_len, lives, snapshots,
                                          rows)
        search = None
        if self.search_k is not None and not local and any(x is not None for x in lives):
            search = self._search_live(users, lives, snapshots, hist_len, candidates["category"], num)
        elif self.search_k is not None:
            search = self._search(users, history if local else None, hist_len, candidates["category"], num)
        whole = history
        if full:
            history = _recent(history, self.batch_history_len if cached else self.history_len)
        profile = {f: users if f == "user" else self.export.users[f][users] for f in self.spec.profile}
        batch = make_batch(self.spec, history=history, request_time=ts, candidates=candidates,
                           num_candidates=num, profile=profile, search=search)
        return _Prepared(batch=batch, user_raw=user_raw, users=users, ts=ts, hist_len=hist_len, items=candidates["item"],
                         num=num, whole=whole if cached else None)

    def _ksa_args(self, p: _Prepared) -> tuple[list[int], list[dict[str, np.ndarray]], np.ndarray, np.ndarray]:
        """What :class:`KSACache` reads for a batch: user keys, whole histories, candidate offsets, cut-offs."""
        offsets = p.whole["item"].offsets
        histories = [{f: j.values[offsets[r]:offsets[r + 1]] for f, j in p.whole.items()} for r in range(len(p.num))]
        return p.user_raw.tolist(), histories, np.r_[0, np.cumsum(p.num)], p.ts

    def _score_plain(self, requests: Sequence[Mapping[str, Any]], rows: Sequence[int]) -> list[Scored]:
        """Exploit scores of ``requests`` in one model call."""
        p = self._prepare(requests, rows)
        model = self.export.model
        with self._model_lock:
            if p.whole is not None:  # the KSA block (and SIM mode 'ksa') read from the users' cached states
                emb = model.embed(p.batch)
                query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [C, 2D]
                keys, histories, cand_offsets, ts = self._ksa_args(p)
                given = self.ksa.outputs(keys, histories, query, cand_offsets, ts)  # name -> [C, out]
                logits = model.score(emb, given=given)  # [C]
            else:
                logits = model(p.batch)  # [C]
        if not bool(torch.isfinite(logits).all()):
            self._non_finite(logits)
        probs = torch.sigmoid(logits).double().numpy()  # [C]
        offsets = np.concatenate([[0], np.cumsum(p.num)])
        unknown = np.add.reduceat(p.items == OOV_INDEX, offsets[:-1])  # [B] (every request has candidates)
        return [Scored(scores=probs[offsets[i]:offsets[i + 1]].tolist(), unknown_user=bool(p.users[i] == OOV_INDEX),
                       no_history=bool(p.hist_len[i] == 0), unknown_items=int(unknown[i])) for i in range(len(requests))]

    def _explore_policy(self, spec: Any, row: int) -> ExplorePolicy | None:
        """A request's ``explore`` object over :attr:`explore_defaults`, checked (None: no exploration)."""
        if spec is None:
            return None
        try:
            fields = EXPLORE.validate_python(spec)
        except ValidationError as exc:
            errors = [{**e, "loc": ("requests", row, "explore", *e["loc"])} for e in exc.errors(include_url=False)]
            raise DataError(describe_errors(errors)) from None
        overrides = {k: v for k, v in fields.items() if v is not None and k not in ("policy", "seed")}
        cfg = ExploreConfig.model_validate({**self.explore_defaults.model_dump(), **overrides, "form": fields["policy"]})
        if cfg.gate == "learned" and self.export.model.gate is None:
            said = "" if "gate" in overrides else " (the scorer's default)"
            raise DataError(f"requests[{row}].explore.gate: 'learned'{said} needs a model trained with "
                            f"model.age.gate=true; this {self.name} export has no gate: ask for 'none' or 'fixed'")
        seed = fields.get("seed")
        return ExplorePolicy(config=cfg, seed=secrets.randbits(63) if seed is None else seed)

    def _score_explore(self, request: Mapping[str, Any], row: int, policy: ExplorePolicy) -> Scored:
        """Exploit and explore scores of one request (AGE, models/age.py) under ``policy``."""
        p = self._prepare([request], [row])
        model = self.export.model
        explorer = AGEExplorer(model, policy.config)
        raw_items = np.array([c["item_id"] for c in request["candidates"]], dtype=np.int64)  # [C], checked by _prepare
        counted = self.live is not None  # no state store: no counts, every item is below the threshold
        impressions = self.live.store.impressions(raw_items) if counted else np.zeros(len(raw_items), dtype=np.int64)
        generator = torch.Generator().manual_seed(policy.seed)
        with self._model_lock:
            emb = model.embed(p.batch)
            # cached KSA: read-outs as functions of the moved query (models/age.py, "Serving")
            given = self.ksa.given(*self._ksa_args(p)) if p.whole is not None else None
            out = explorer.score_embedded(emb, torch.from_numpy(impressions), generator, given=given)
        for scores in (out.exploit, out.explore):
            if not bool(torch.isfinite(scores).all()):
                self._non_finite(torch.logit(scores.double()))
        cfg = policy.config
        applied = {"policy": cfg.form, "seed": policy.seed, "gate": cfg.gate, "lam": cfg.lam,
                   "impression_threshold": cfg.impression_threshold, "impressions_counted": counted}
        if cfg.gate == "fixed":
            applied["gate_threshold"] = cfg.gate_threshold
        if cfg.form == "ucb":
            applied["samples"] = cfg.samples
        return Scored(scores=out.exploit.double().tolist(), unknown_user=bool(p.users[0] == OOV_INDEX),
                      no_history=bool(p.hist_len[0] == 0), unknown_items=int((p.items == OOV_INDEX).sum()),
                      explore_scores=out.explore.double().tolist(), explored=out.gate.tolist(),
                      impressions=impressions.tolist(), explore=applied)

    def _non_finite(self, logits: torch.Tensor) -> None:
        bad = ~torch.isfinite(logits)
        first = logits[bad][0].item()
        raise NonFiniteScoreError(
            f"export {self.export.path}: the model gave {int(bad.sum())} non-finite scores of {logits.numel()} "
            f"(first: {first}); its weights are broken (weights.pt sha256 {self.export.weights_sha256[:12]}...): "
            "re-export a healthy run")

    def _candidates(self, requests: Sequence[Mapping[str, Any]],
                    rows: Sequence[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Feature -> [C] indices of every candidate, and [B] candidates per request (``rows``: as
        :meth:`_prepare`)."""
        item_raw: list[int] = []
        given = {attr: ([], []) for attr in self.attributes}  # attr -> (positions in [C], raw ids)
        num = np.zeros(len(requests), dtype=np.int64)
        for i, r in enumerate(requests):
            cands = r.get("candidates")
            if not isinstance(cands, Sequence) or isinstance(cands, str | bytes) or not cands:
                raise DataError(f"requests[{rows[i]}].candidates: expected a non-empty list, got {cands!r}")
            num[i] = len(cands)
            for j, c in enumerate(cands):
                where = f"requests[{rows[i]}].candidates[{j}]"
                if not isinstance(c, Mapping):
                    raise DataError(f"{where}: expected an object with item_id, got {c!r}")
                item_raw.append(_int(c.get("item_id"), f"{where}.item_id"))
                for attr, (pos, raw) in given.items():
                    if c.get(attr) is not None:
                        pos.append(len(item_raw) - 1)
                        raw.append(_int(c[attr], f"{where}.{attr}"))
        raw_items = np.array(item_raw, dtype=np.int64)
        items = self.ids["item_id"].encode(raw_items)  # [C]
        out = {"item": items}
        unknown = np.nonzero(items == OOV_INDEX)[0]
        listed = self.export.catalog_rows(raw_items[unknown]) if len(unknown) else unknown
        unknown, listed = unknown[listed >= 0], listed[listed >= 0]  # items outside the vocabulary, in the catalog
        for attr, feature in self.attributes.items():
            values = self.export.items[feature][items]  # [C] from items.parquet (OOV item -> row 0)
            if len(unknown):
                values[unknown] = self.export.catalog[feature][listed]
            pos, raw = given[attr]
            if pos:
                values[np.array(pos)] = self.ids[FEATURE_VOCAB[feature]].encode(np.array(raw, dtype=np.int64))
            out[feature] = values
        return out, num

    def _search(self, users: np.ndarray, full: dict[str, Jagged] | None, hist_len: np.ndarray,
                cand_category: np.ndarray, num: np.ndarray) -> Searched:
        """SIM hard search through the export's category index, or (``full``: whole histories of the
        batch) through an index of those."""
        if full is None:
            store = self.export.history
            return hard_search(self.export.category_index, {f: getattr(store, f) for f in HISTORY_FIELDS}, store.offsets,
                               users=users, hist_len=hist_len, cand_category=cand_category, num_candidates=num,
                               k=self.search_k)
        local = CategoryIndex.from_arrays(full["category"].values, full["item"].offsets,
                                          num_categories=self.spec.sizes["category"])
        return hard_search(local, {f: full[f].values for f in HISTORY_FIELDS}, full["item"].offsets,
                           users=np.arange(len(users)), hist_len=hist_len, cand_category=cand_category,
                           num_candidates=num, k=self.search_k)

    def _search_live(self, users: np.ndarray, lives: Sequence[UserLive | None],
                     snapshots: Mapping[int, Mapping[str, np.ndarray]], hist_len: np.ndarray,
                     cand_category: np.ndarray, num: np.ndarray) -> Searched:
        """SIM hard search of a batch with live users: theirs through their category lists over the
        merged history, the others' through the export's index."""
        k, store, index = self.search_k, self.export.history, self.export.category_index

        def of_live(b: int) -> Callable[[np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]:
            return lambda categories: self.live.search(lives[b], snapshots[b], categories, cutoff=int(hist_len[b]), k=k)

        def of_export(user: int, cutoff: int) -> Callable[[np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]:
            def search(categories: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
                g = len(categories)
                pos, offsets = index.lookup(np.full(g, user), np.full(g, cutoff), categories, k=k)
                rows = store.offsets[user] + pos
                return {f: np.asarray(getattr(store, f)[rows], dtype=np.int64) for f in HISTORY_FIELDS}, offsets
            return search

        per_request = [of_live(b) if live is not None else of_export(int(users[b]), int(hist_len[b]))
                       for b, live in enumerate(lives)]
        return search_batch(per_request=per_request, cand_category=cand_category, num_candidates=num,
                            num_categories=index.num_categories)

    def _history(self, requests: Sequence[Mapping[str, Any]], users: np.ndarray, ts: np.ndarray,
                 limit: int | None, lives: Sequence[UserLive | None],
                 snapshots: dict[int, Mapping[str, np.ndarray]],
                 request_rows: Sequence[int]) -> tuple[dict[str, Jagged], np.ndarray]:
        """The last ``limit`` (None: all) events before each cut-off, jagged over the batch, and [B]
        how many events each request has before its cut-off. A live user's events as read are put
        in ``snapshots`` (its search must read the same version). ``request_rows``: as
        :meth:`_prepare`'s ``rows``."""
        store = self.export.history
        parts: dict[int, dict[str, np.ndarray]] = {}
        total = np.zeros(len(requests), dtype=np.int64)
        for i, live in enumerate(lives):
            if live is not None:
                with live.lock:
                    events, n = live.events, live.before(int(ts[i]))
                snapshots[i] = events
                total[i] = n
                parts[i] = {f: v[max(n - limit, 0) if limit is not None else 0:n] for f, v in events.items()}
        stored = [i for i, r in enumerate(requests) if r.get("history") is None and store is not None and i not in parts]
        if stored:
            lengths = store.cutoff_lengths(users[stored], ts[stored])
            total[stored] = lengths
            index, offsets = store.recent_index(users[stored], lengths, limit)
            for k, i in enumerate(stored):
                rows = index[offsets[k]:offsets[k + 1]]
                parts[i] = {f: getattr(store, f)[rows] for f in HISTORY_FIELDS}
        for i, r in enumerate(requests):
            if i not in parts:
                own = self._given_history(r.get("history") or [], ts[i], f"requests[{request_rows[i]}].history")
                total[i] = len(own["item"])
                parts[i] = {f: v[max(len(v) - limit, 0):] if limit is not None else v for f, v in own.items()}
        lengths = np.array([len(parts[i]["item"]) for i in range(len(requests))], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return {f: Jagged(np.concatenate([np.asarray(parts[i][f], dtype=np.int64) for i in range(len(requests))]),
                          offsets) for f in HISTORY_FIELDS}, total

    def _given_history(self, events: Sequence[Mapping[str, Any]] | Events, cutoff: int,
                       where: str) -> dict[str, np.ndarray]:
        """A request's own events (dicts, or columns from ``serving.decode``): encoded, strictly
        before ``cutoff``, by time."""
        if isinstance(events, Events):
            a = {"item": events.item_id, "category": events.category_id, "behavior": events.behavior,
                 "timestamp": events.timestamp}
        else:
            a = _event_columns(events, where)
        keep = np.flatnonzero(a["timestamp"] < cutoff)
        keep = keep[np.argsort(a["timestamp"][keep], kind="stable")]  # by time; ties keep request order
        return {"item": self.ids["item_id"].encode(a["item"][keep]),
                "category": self.ids["category_id"].encode(a["category"][keep]),
                "behavior": a["behavior"][keep], "timestamp": a["timestamp"][keep]}


def _event_columns(events: Sequence[Mapping[str, Any]], where: str) -> dict[str, np.ndarray]:
    """Event dicts as [H] int64 columns, each value checked (a DataError names the field)."""
    if not isinstance(events, Sequence) or isinstance(events, str | bytes):
        raise DataError(f"{where}: expected a list of events, got {events!r}")
    cols: dict[str, list[int]] = {"item": [], "category": [], "behavior": [], "timestamp": []}
    for k, e in enumerate(events):
        w = f"{where}[{k}]"
        if not isinstance(e, Mapping):
            raise DataError(f"{w}: expected an event object, got {e!r}")
        behavior = e.get("behavior")
        if behavior not in BEHAVIOR_CODE:
            raise DataError(f"{w}.behavior: expected one of {', '.join(BEHAVIORS)}, got {behavior!r}")
        cols["item"].append(_int(e.get("item_id"), f"{w}.item_id"))
        cols["category"].append(_int(e.get("category_id"), f"{w}.category_id"))
        cols["behavior"].append(BEHAVIOR_CODE[behavior])
        cols["timestamp"].append(_int(e.get("timestamp"), f"{w}.timestamp"))
    return {f: np.array(v, dtype=np.int64) for f, v in cols.items()}


def _recent(history: dict[str, Jagged], n: int | None) -> dict[str, Jagged]:
    """The last ``n`` events of each jagged history (all with None)."""
    if n is None:
        return history
    offsets = history["item"].offsets
    rows, new = last_rows(offsets[1:], np.diff(offsets), n)
    return {f: Jagged(j.values[rows], new) for f, j in history.items()}


def _int(value: Any, where: str) -> int:
    """``value`` as an int64 raw id, or a DataError naming ``where``."""
    if value is None:
        raise DataError(f"{where}: required, missing")
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DataError(f"{where}: expected an integer, got {value!r}")
    if not _INT64[0] <= int(value) <= _INT64[1]:
        raise DataError(f"{where}: {value} is outside the 64-bit integer range")
    return int(value)
