"""Request batches and the one place that turns them into torchrec ``KeyedJaggedTensor``s.

A batch is B requests; request b is one user at one cut-off time with M_b candidates and the
user's history before the cut-off. Everything per request is stored once, not per candidate::

    sequence KJT, stride B (EmbeddingCollection input):
        hist_item, hist_category, hist_behavior, hist_gap   lengths [B] = history lengths L_b
        cand_item, cand_category[, cand_brand, cand_price_bucket]   lengths [B] = M_b
    profile KJT, stride B, one id per request (EmbeddingBagCollection input):
        [user,] [segment, age_bucket]                       as the data has them
    labels [C] float32, C = sum M_b, candidates of request 0 first

``hist_gap`` is the log2 bucket of the gap between the cut-off and the event in minutes
(:func:`time_gap_bucket`). The item and category tables serve both ``hist_*`` and ``cand_*``.

Two plain tensors ride along (ids, not embeddings): ``hist_gap`` again as ``gap [L_total]`` and
``interval [L_total]``, the bucket of the time since the previous event of the same history (a
history's first event gets ``time_gap_buckets``). ``history_source [B]`` says, for whole histories,
which request of the batch holds the longest history of the same user: the others are its prefixes.
Those others may carry only the tail of their history that the blocks other than KSA read
(:func:`batch_from_requests`' ``tail``): ``gap`` then holds every request's whole history's ids,
at ``gap_offsets [B+1]``, for KSA's read-out, which reads the source's encode.

Example:
    >>> spec = FeatureSpec(sizes={"item": 10, "category": 4}, time_gap_buckets=8)
    >>> hist = {f: Jagged(np.array(v), np.array([0, 0, 2])) for f, v in
    ...         {"item": [3, 4], "category": [1, 2], "behavior": [0, 3], "timestamp": [0, 3540]}.items()}
    >>> b = make_batch(spec, history=hist, request_time=np.array([60, 3600]),
    ...                candidates={"item": np.array([5, 6, 7]), "category": np.array([1, 1, 2])},
    ...                num_candidates=np.array([1, 2]))
    >>> b.sequence["hist_item"].lengths().tolist(), b.sequence["cand_item"].lengths().tolist()
    ([0, 2], [1, 2])
    >>> b.sequence["hist_gap"].values().tolist()   # 60 minutes before, 1 minute before
    [5, 1]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torchrec import KeyedJaggedTensor

from features.category_index import CategoryIndex
from features.history import HistoryStore, last_rows
from recsys.errors import DataError
from recsys.types import BEHAVIORS, Jagged

#: History fields read from the store for every request (timestamp becomes ``hist_gap``).
HISTORY_FIELDS = ("item", "category", "behavior", "timestamp")
#: Candidate features, in order; item and category are required, the others used when present.
CANDIDATE_FEATURES = ("item", "category", "brand", "price_bucket")
#: SIM hard-search results (empty unless a model asks for them); embedded by the item, category,
#: behavior and time_gap tables like the history.
SEARCH_KEYS = ("sim_item", "sim_category", "sim_behavior", "sim_gap")
#: Per-request profile features used when the data has them (``user`` only when configured).
PROFILE_FEATURES = ("user", "segment", "age_bucket")


def time_gap_bucket(gap_seconds: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket b holds gaps of [2^b - 1, 2^(b+1) - 1) minutes; the last bucket all older ones.

    Example:
        >>> time_gap_bucket(np.array([0, 59, 60, 179, 180, 10**9]), 8).tolist()
        [0, 0, 1, 1, 2, 7]
    """
    minutes = np.maximum(np.asarray(gap_seconds, dtype=np.int64), 0) // 60
    return np.minimum(np.floor(np.log2(minutes + 1.0)).astype(np.int64), num_buckets - 1)


@dataclass(frozen=True)
class FeatureSpec:
    """Which id features a dataset has and their vocabulary sizes (rows, OOV row 0 included)."""

    sizes: Mapping[str, int]
    time_gap_buckets: int = 20
    use_user_id: bool = False

    def __post_init__(self) -> None:
        missing = [f for f in ("item", "category") if f not in self.sizes]
        if missing:
            raise ValueError(f"feature sizes must include {missing}, got {sorted(self.sizes)}")

    @classmethod
    def from_dataset(cls, dataset: Mapping[str, Any], *, time_gap_buckets: int, use_user_id: bool) -> FeatureSpec:
        """From a built dataset's ``dataset.json``."""
        sizes = {name: int(f["size"]) for name, f in dataset["features"].items()}
        return cls(sizes=sizes, time_gap_buckets=time_gap_buckets, use_user_id=use_user_id)

    def size(self, feature: str) -> int:
        """Rows of a feature's table (``behavior``: the fixed behaviour codes)."""
        return len(BEHAVIORS) if feature == "behavior" else int(self.sizes[feature])

    @property
    def candidate(self) -> tuple[str, ...]:
        return tuple(f for f in CANDIDATE_FEATURES if f in self.sizes)

    @property
    def profile(self) -> tuple[str, ...]:
        return tuple(f for f in PROFILE_FEATURES if f in self.sizes and (f != "user" or self.use_user_id))

    @property
    def sequence_keys(self) -> tuple[str, ...]:
        return ("hist_item", "hist_category", "hist_behavior", "hist_gap", *(f"cand_{f}" for f in self.candidate),
                *SEARCH_KEYS)


@dataclass
class RequestBatch:
    """B requests as model input (see the module docstring for the layout)."""

    sequence: KeyedJaggedTensor
    profile: KeyedJaggedTensor | None
    num_candidates: torch.Tensor  # [B] int64
    labels: torch.Tensor | None = None  # [C] float32
    gap: torch.Tensor | None = None  # [L_total] int64, the hist_gap ids
    interval: torch.Tensor | None = None  # [L_total] int64
    history_source: torch.Tensor | None = None  # [B] int64, None: every request its own
    # [B+1] int64, set where a request that shares its source's encode carries only the tail of its
    # history in ``sequence`` (batch_from_requests' ``tail``): ``gap`` then holds each request's
    # whole history's ids at these offsets (and ``interval`` follows ``sequence``)
    gap_offsets: torch.Tensor | None = None
    search_offsets: torch.Tensor | None = None  # [G+1] int64: search group g's rows of the sim_* values
    cand_group: torch.Tensor | None = None  # [C] int64: each candidate's search group
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # per-candidate bookkeeping (not model input)

    @property
    def batch_size(self) -> int:
        return len(self.num_candidates)

    def to(self, device: torch.device, non_blocking: bool = False) -> RequestBatch:
        return RequestBatch(
            sequence=self.sequence.to(device, non_blocking=non_blocking),
            profile=None if self.profile is None else self.profile.to(device, non_blocking=non_blocking),
            num_candidates=self.num_candidates.to(device, non_blocking=non_blocking),
            labels=None if self.labels is None else self.labels.to(device, non_blocking=non_blocking),
            gap=None if self.gap is None else self.gap.to(device, non_blocking=non_blocking),
            interval=None if self.interval is None else self.interval.to(device, non_blocking=non_blocking),
            history_source=None if self.history_source is None else self.history_source.to(device, non_blocking=non_blocking),
            gap_offsets=None if self.gap_offsets is None else self.gap_offsets.to(device, non_blocking=non_blocking),
            search_offsets=None if self.search_offsets is None else self.search_offsets.to(device, non_blocking=non_blocking),
            cand_group=None if self.cand_group is None else self.cand_group.to(device, non_blocking=non_blocking),
            extra=self.extra,
        )


def make_batch(
    spec: FeatureSpec,
    *,
    history: Mapping[str, Jagged],
    request_time: np.ndarray,
    candidates: Mapping[str, np.ndarray],
    num_candidates: np.ndarray,
    profile: Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | None = None,
    search: Searched | None = None,
    whole_timestamp: Jagged | None = None,
) -> RequestBatch:
    """Build the KJTs of B requests from vocabulary indices (the only place that does).

    Args:
        history: ``item, category, behavior, timestamp`` as jagged [L_total] with offsets [B+1].
        request_time: [B] cut-off of each request (unix seconds).
        candidates: feature -> [C] indices, for every feature in ``spec.candidate``.
        num_candidates: [B] M_b. profile: feature -> [B] indices for ``spec.profile``.
        labels: [C] 0/1 or None (serving).
        search: SIM hard-search results (:func:`hard_search`); the ``sim_*`` features stay empty without.
        whole_timestamp: where ``history`` holds only the tail of some requests' histories, each
            request's whole history's timestamps: ``gap`` and ``gap_offsets`` are made from them.
    """
    offsets = history["item"].offsets
    hist_len = np.diff(offsets)  # [B]
    gap = np.repeat(np.asarray(request_time, dtype=np.int64), hist_len) - history["timestamp"].values
    num_candidates = np.array(num_candidates, dtype=np.int64)  # a writable copy: torch shares it
    gap_ids = time_gap_bucket(gap, spec.time_gap_buckets)
    seq_values = [history["item"].values, history["category"].values, history["behavior"].values, gap_ids]
    seq_lengths = [hist_len] * 4
    for f in spec.candidate:
        seq_values.append(candidates[f])
        seq_lengths.append(num_candidates)
    b = len(num_candidates)
    if search is None:
        seq_values += [np.zeros(0, dtype=np.int64)] * len(SEARCH_KEYS)
        seq_lengths += [np.zeros(b, dtype=np.int64)] * len(SEARCH_KEYS)
    else:  # groups are ordered by request, so request b's rows are its groups' rows, contiguous
        per_group = np.diff(search.offsets)
        per_request = np.bincount(search.group_request, weights=per_group, minlength=b).astype(np.int64)
        sim_gap = np.repeat(np.asarray(request_time, dtype=np.int64)[search.group_request], per_group) - search.timestamp
        seq_values += [search.item, search.category, search.behavior, time_gap_bucket(sim_gap, spec.time_gap_buckets)]
        seq_lengths += [per_request] * len(SEARCH_KEYS)
    sequence = KeyedJaggedTensor.from_lengths_sync(
        keys=list(spec.sequence_keys),
        values=torch.from_numpy(np.concatenate([np.asarray(v, dtype=np.int64) for v in seq_values])),
        lengths=torch.from_numpy(np.concatenate(seq_lengths).astype(np.int32)),
    )
    prof = None
    if spec.profile:
        prof = KeyedJaggedTensor.from_lengths_sync(
            keys=list(spec.profile),
            values=torch.from_numpy(np.concatenate([np.asarray(profile[f], dtype=np.int64) for f in spec.profile])),
            lengths=torch.ones(b * len(spec.profile), dtype=torch.int32),
        )
    gap_offsets = None
    if whole_timestamp is not None:
        whole_len = np.diff(whole_timestamp.offsets)
        whole_gap = np.repeat(np.asarray(request_time, dtype=np.int64), whole_len) - whole_timestamp.values
        gap_ids = time_gap_bucket(whole_gap, spec.time_gap_buckets)
        gap_offsets = torch.from_numpy(np.asarray(whole_timestamp.offsets, dtype=np.int64))
    return RequestBatch(
        sequence=sequence,
        profile=prof,
        num_candidates=torch.from_numpy(num_candidates),
        labels=None if labels is None else torch.from_numpy(np.array(labels, dtype=np.float32)),  # a writable copy
        gap=torch.from_numpy(gap_ids),
        gap_offsets=gap_offsets,
        interval=torch.from_numpy(interval_buckets(history["timestamp"].values, offsets, spec.time_gap_buckets)),
        search_offsets=None if search is None else torch.from_numpy(search.offsets),
        cand_group=None if search is None else torch.from_numpy(search.cand_group),
    )


@dataclass(frozen=True)
class Searched:
    """SIM hard-search results of a batch, per search group (one request x one candidate category).

    Groups are ordered by request; group g's behaviours are rows ``offsets[g]:offsets[g+1]`` of the
    event arrays, newest first, at most K.
    """

    offsets: np.ndarray  # [G+1] int64
    group_request: np.ndarray  # [G] int64
    cand_group: np.ndarray  # [C] int64
    item: np.ndarray  # [R] event fields
    category: np.ndarray
    behavior: np.ndarray
    timestamp: np.ndarray


def hard_search(
    index: CategoryIndex, events: Mapping[str, np.ndarray], user_offsets: np.ndarray, *,
    users: np.ndarray, hist_len: np.ndarray, cand_category: np.ndarray, num_candidates: np.ndarray, k: int,
) -> Searched:
    """GSU hard search (SIM Eq. 1, r_i = [C_i = C_a]): each candidate's K most recent behaviours of its
    category before its request's cut-off, one index lookup per (request, category), no Python loop.

    Args:
        index: the category index of the histories ``events`` (item, category, behavior, timestamp
            arrays) with ``user_offsets [U+1]``. users, hist_len: [B] per request.
        cand_category: [C] candidates' categories; num_candidates: [B].

    Example:
        >>> ev = {"item": np.array([10, 11, 12, 13]), "category": np.array([1, 2, 1, 1]),
        ...       "behavior": np.zeros(4, int), "timestamp": np.arange(4)}
        >>> idx = CategoryIndex.from_arrays(ev["category"], np.array([0, 4]), num_categories=3)
        >>> s = hard_search(idx, ev, np.array([0, 4]), users=np.array([0]), hist_len=np.array([3]),
        ...                 cand_category=np.array([1, 2, 1]), num_candidates=np.array([3]), k=5)
        >>> s.item.tolist(), s.offsets.tolist(), s.cand_group.tolist()   # newest first; before event 3
        ([12, 10, 11], [0, 2, 3], [0, 1, 0])
    """
    num_candidates = np.asarray(num_candidates, dtype=np.int64)
    request = np.repeat(np.arange(len(num_candidates)), num_candidates)  # [C]
    nc = index.num_categories
    keys, cand_group = np.unique(request * nc + np.asarray(cand_category, dtype=np.int64), return_inverse=True)
    group_request, group_category = keys // nc, keys % nc  # sorted by request, then category
    users = np.asarray(users, dtype=np.int64)
    pos, offsets = index.lookup(users[group_request], np.asarray(hist_len)[group_request], group_category, k=k)
    rows = np.repeat(np.asarray(user_offsets)[users[group_request]], np.diff(offsets)) + pos
    return Searched(offsets=offsets, group_request=group_request, cand_group=cand_group.reshape(-1).astype(np.int64),
                    **{f: np.asarray(events[f])[rows] for f in HISTORY_FIELDS})


def interval_buckets(timestamps: np.ndarray, offsets: np.ndarray, num_buckets: int) -> np.ndarray:
    """[L] bucket of the time since the previous event of the same history; ``num_buckets`` for
    a history's first event (there is no previous one).

    Example:
        >>> interval_buckets(np.array([0, 60, 60, 0, 7200]), np.array([0, 3, 5]), 8).tolist()
        [8, 1, 0, 8, 6]
    """
    ts = np.asarray(timestamps, dtype=np.int64)
    gap = np.zeros_like(ts)
    gap[1:] = ts[1:] - ts[:-1]
    out = time_gap_bucket(gap, num_buckets)
    offsets = np.asarray(offsets)
    out[offsets[:-1][np.diff(offsets) > 0]] = num_buckets
    return out


def history_sources(users: np.ndarray, hist_len: np.ndarray) -> np.ndarray:
    """[B] for each request, the request of the same user with the longest history (itself if none).

    Example:
        >>> history_sources(np.array([7, 3, 7, 7]), np.array([5, 2, 9, 1])).tolist()
        [2, 1, 2, 2]
    """
    order = np.lexsort((np.asarray(hist_len), np.asarray(users)))  # by user, then length
    sorted_users = np.asarray(users)[order]
    last = np.r_[sorted_users[1:] != sorted_users[:-1], True]  # last of each user = its longest
    group = np.cumsum(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) - 1
    out = np.empty(len(order), dtype=np.int64)
    out[order] = order[last][group]
    return out


def _flat_list(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> (flat values [C], lengths [B])."""
    col = table.column(name).combine_chunks()
    if col.null_count:
        raise DataError(f"{col.null_count} null candidate lists", field=name)
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    return col.flatten().to_numpy(zero_copy_only=False), lengths


def batch_from_requests(
    spec: FeatureSpec, table: pa.Table, store: HistoryStore, *, max_history: int | None,
    search_k: int | None = None, index: CategoryIndex | None = None, tail: int | None = None,
) -> RequestBatch:
    """A batch from rows of ``requests/*.parquet`` (features/requests.py) and the history store.

    Args:
        table: request rows (Arrow; Ray Data hands these over with ``batch_format="pyarrow"``).
        max_history: the most recent events each request needs (None: the whole history).
        search_k, index: SIM hard search: K behaviours per candidate, through the store's category index.
        tail: with ``max_history`` None, a request whose user has a longer request in the batch (whose
            encode it shares, ``history_source``) carries only its last ``tail`` events
            (:attr:`models.ctr.CTRModel.copy_tail`: what the blocks other than KSA read); None: every
            request its whole history.

    The batch's ``extra`` keeps per-candidate ``request_id``, ``user``, ``true_prob`` (when the
    data has it) for evaluation.
    """
    users = table.column("user").to_numpy().astype(np.int64)
    hist_len = table.column("hist_len").to_numpy().astype(np.int64)
    whole_timestamp = None
    sources = history_sources(users, hist_len) if max_history is None else None  # whole histories: prefixes
    if max_history is None and tail is not None:  # the sharing requests' own copies cut to their tails
        ends = store.offsets[users] + hist_len
        whole_rows, whole_offsets = last_rows(ends, hist_len, None)
        whole_timestamp = Jagged(store.timestamp[whole_rows], whole_offsets)
        shares = sources != np.arange(len(users))
        rows, offsets = last_rows(ends, np.where(shares, np.minimum(hist_len, tail), hist_len), None)
    else:
        rows, offsets = store.recent_index(users, hist_len, max_history)
    history = {f: Jagged(getattr(store, f)[rows], offsets) for f in HISTORY_FIELDS}
    cands, num = {}, None
    for f in spec.candidate:
        cands[f], num = _flat_list(table, f)
    labels, _ = _flat_list(table, "label")
    profile = {f: table.column(f).to_numpy() for f in spec.profile}
    search = None
    if search_k is not None:
        if index is None:
            raise ValueError("search_k needs the history store's category index")
        search = hard_search(index, {f: getattr(store, f) for f in HISTORY_FIELDS}, store.offsets, users=users,
                             hist_len=table.column("hist_len").to_numpy(), cand_category=cands["category"],
                             num_candidates=num, k=search_k)
    batch = make_batch(spec, history=history, request_time=table.column("timestamp").to_numpy(),
                       candidates=cands, num_candidates=num, profile=profile, labels=labels, search=search,
                       whole_timestamp=whole_timestamp)
    extra = {"request_id": np.repeat(table.column("request_id").to_numpy(), num),
             "user": np.repeat(users, num)}
    if "true_prob" in table.column_names and table.column("true_prob").null_count == 0:
        extra["true_prob"], _ = _flat_list(table, "true_prob")
    batch.extra = extra
    if sources is not None:  # whole histories of one user are prefixes of each other
        batch.history_source = torch.from_numpy(sources)
    return batch


def history_budget_steps(hist_len: np.ndarray, budget: int, cap: int | None,
                         users: np.ndarray | None = None) -> list[tuple[int, int]]:
    """A batch's requests cut into consecutive ``[start, end)`` steps whose history events (each
    request's ``hist_len``, up to ``cap`` where the model reads only the last ``cap``) sum to at
    most ``budget``; a request over the budget alone is a step of its own.

    ``users`` (with ``cap`` None): a model that reads whole histories encodes each user's once per
    step, for all their requests (``RequestBatch.history_source``). A step then counts each user's
    longest history once, and a user whose history alone is over the budget is a step of their own
    with all their requests: cutting those apart would encode the same history again in each step.

    Example:
        >>> history_budget_steps(np.array([5, 5, 20, 1, 1, 8]), 10, None)
        [(0, 2), (2, 3), (3, 6)]
        >>> history_budget_steps(np.array([3, 5, 9, 4, 6, 20, 30]), 10, None, users=np.array([1, 1, 1, 2, 2, 3, 3]))
        [(0, 3), (3, 5), (5, 7)]
    """
    events = np.asarray(hist_len, dtype=np.int64) if cap is None else np.minimum(hist_len, cap)
    shared = users is not None and cap is None
    who = np.asarray(users).tolist() if shared else list(range(len(events)))  # unshared: each request its own
    steps, start, total, longest = [], 0, 0, {}
    for i, (n, u) in enumerate(zip(events.tolist(), who, strict=True)):
        more = max(n - longest.get(u, 0), 0)
        alone = len(longest) == 1 and u in longest  # the step so far is this user's requests only
        if total + more > budget and i > start and not alone:
            steps.append((start, i))
            start, total, longest = i, 0, {}
            more = n
        total += more
        longest[u] = max(n, longest.get(u, 0))
    if len(events):
        steps.append((start, len(events)))
    return steps


def budget_steps(batch_size: int, hist_len: np.ndarray, users: np.ndarray, budget: int | None,
                 cap: int | None) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` steps over requests in order: batches of ``batch_size``, each cut
    by :func:`history_budget_steps` when ``budget`` is set (``hist_len`` and ``users`` in that order).

    Example:
        >>> budget_steps(3, np.array([5, 5, 20, 1, 1]), np.arange(5), 10, None)
        [(0, 2), (2, 3), (3, 5)]
    """
    n = len(hist_len)
    steps = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if budget is None:
        return steps
    return [(start + a, start + b) for start, end in steps
            for a, b in history_budget_steps(hist_len[start:end], budget, cap, users[start:end])]
