"""Live per-user state: the export's frozen histories plus the events appended through the API.

The source of truth is the state store's event log (:mod:`serving.store`): an event is in the log,
fsync'd, before ``POST /v1/events`` acknowledges it. Everything here is a cache of export + log,
rebuilt from them at will:

* **History overlay.** A user with logged events gets a :class:`UserLive`: the user's exported
  events (none for a user the export does not know) merged with the logged ones, as vocabulary
  indices, ordered by time. An event is placed after every event with the same or an earlier
  timestamp (so exported events come before logged ones at equal times, and logged ones keep
  their arrival order), which is how ``data build`` orders a user's events (a stable sort by
  time). A request at time t reads the events strictly before t, as training does.
* **Category index overlay** (SIM hard search): per category, the positions of the user's latest
  ``per_category`` events, newest first, advanced on each in-order append (as
  :meth:`features.category_index.CategoryIndex.append` does) and rebuilt when a late event lands
  before the end.
* **Late events.** An event older than the user's newest is inserted at its place; the positions
  after it move, so the user's category lists are rebuilt and the listeners (the KSA state cache)
  are told the history changed from that position on (:meth:`LiveHistory.on_change`).

Several processes may share one store (Redis, or one SQLite file): before a user is scored, the
store is asked how many events it holds for that user (one indexed read), and the overlay fetches
what it has not seen. Users are keyed by raw id, so new users (the export's out-of-vocabulary row)
keep their own histories.

Example:
    >>> lists = category_lists(np.array([3, 1, 3, 3]), per_category=2)
    >>> {c: list(d) for c, d in sorted(lists.items())}
    {1: [1], 3: [3, 2]}
    >>> search_lists(lists, category=3, cutoff=3, k=5)   # 0 fell off the cap of 2
    [2]
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from features.history import HistoryStore
from models.batch import HISTORY_FIELDS, Searched
from recsys.types import OOV_INDEX
from serving.store import Appended, EventBatch, StateStore

#: Memory for merged histories (``recsys serve --live-cache-mb``, 512): about 1,700 users of 10,000 events.
DEFAULT_LIVE_BYTES = 512 * 2**20

#: Encodes raw ids of one vocabulary: [N] int64 raw -> [N] int64 index (unknown -> OOV).
Encoder = Callable[[np.ndarray], np.ndarray]


def category_lists(category: np.ndarray, *, per_category: int | None) -> dict[int, deque]:
    """Per category, the positions of its events in ``category [N]`` (a history, oldest first),
    newest first, the latest ``per_category`` of each (all with None)."""
    category = np.asarray(category, dtype=np.int64)
    order = np.lexsort((-np.arange(len(category)), category))  # by category, newest first
    cats = category[order]
    starts = np.flatnonzero(np.r_[True, cats[1:] != cats[:-1]]) if len(cats) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(cats)]
    # a deque built from an iterable keeps its last maxlen items: cut to the newest first
    return {int(cats[s]): deque(order[s:e][:per_category].tolist(), maxlen=per_category)
            for s, e in zip(starts, ends, strict=True)}


def search_lists(lists: Mapping[int, deque], *, category: int, cutoff: int, k: int) -> list[int]:
    """The ``k`` newest positions of ``category`` before ``cutoff`` (newest first)."""
    out: list[int] = []
    for p in lists.get(category, ()):
        if p < cutoff:
            out.append(p)
            if len(out) == k:
                break
    return out


@dataclass
class UserLive:
    """One user's live view: exported + logged events, merged by time (vocabulary indices)."""

    events: dict[str, np.ndarray]  # field -> [n] int64, oldest first
    logged: int = 0  # how many of the store's events for this user are merged in
    last_seq: int = 0  # the highest log seq merged in
    lists: dict[int, deque] | None = None  # category -> positions newest first (built on first search)
    nbytes: int = 0  # the events' bytes as last counted (LiveHistory's budget)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.events["timestamp"])

    def before(self, cutoff: int) -> int:
        """How many events are strictly before ``cutoff``."""
        return int(np.searchsorted(self.events["timestamp"], cutoff, side="left"))


class LiveHistory:
    """The export's history store with every user's logged events merged in (see the module docstring).

    Args:
        store: the state store holding the event log.
        history: the export's history store (None: an export shipped with ``--no-history``).
        users: raw user id -> user index (the export's user vocabulary).
        items, categories: raw item / category id -> index.
        per_category: the SIM category index's cap (None: no cap, or no SIM).
        budget_bytes: memory for the users' merged histories; the least recently used are dropped
            beyond it (and rebuilt from export + log on their next request). The user being read
            is always kept.
    """

    def __init__(self, store: StateStore, *, history: HistoryStore | None, users: Encoder, items: Encoder,
                 categories: Encoder, per_category: int | None = None,
                 budget_bytes: int = DEFAULT_LIVE_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes ({budget_bytes}) must be >= 0")
        self.store = store
        self.history = history
        self.encode = {"user": users, "item": items, "category": categories}
        self.per_category = per_category
        self.budget_bytes = budget_bytes
        self._users: OrderedDict[int, UserLive] = OrderedDict()  # least recently used first
        self._bytes = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[int, int], None]] = []

    def on_change(self, listener: Callable[[int, int], None]) -> None:
        """Call ``listener(user_id, position)`` when a late event changes a user's history from
        ``position`` on (events before it are unchanged)."""
        self._listeners.append(listener)

    # --- writing

    def append(self, batch: EventBatch) -> Appended:
        """Log ``batch`` durably (the store acknowledges after fsync), then merge it into the
        overlays of its users that this process holds."""
        appended = self.store.append(batch)
        for user in np.unique(batch.user_id).tolist():
            if user in self._users:
                self.user(user)
        return appended

    # --- reading

    def user(self, user_id: int) -> UserLive | None:
        """``user_id``'s live view, up to date with the store; None when the log holds no event of
        the user (the export's history then answers alone)."""
        count = self.store.user_event_count(user_id)
        live = self._users.get(user_id)
        if count == 0 and live is None:
            return None
        if live is None:
            with self._lock:
                live = self._users.get(user_id)
                if live is None:
                    live = self._users[user_id] = UserLive(events=self._exported(user_id))
        if live.logged < count:
            with live.lock:
                if live.logged < count:
                    self._merge(user_id, live)
        self._account(user_id, live)
        return live

    def _account(self, user_id: int, live: UserLive) -> None:
        """Mark ``user_id`` most recently used, count its bytes, drop the least recently used
        users beyond the budget (never this one)."""
        size = sum(v.nbytes for v in live.events.values())
        with self._lock:
            if self._users.get(user_id) is not live:  # dropped meanwhile: it serves this request only
                return
            self._users.move_to_end(user_id)
            self._bytes += size - live.nbytes
            live.nbytes = size
            while self._bytes > self.budget_bytes and len(self._users) > 1:
                _, old = self._users.popitem(last=False)
                self._bytes -= old.nbytes
                self.evictions += 1

    @property
    def users(self) -> int:
        """Users whose merged histories are held."""
        return len(self._users)

    @property
    def nbytes(self) -> int:
        """Bytes of the merged histories held (at most ``budget_bytes``, or the one user being read)."""
        return self._bytes

    def _exported(self, user_id: int) -> dict[str, np.ndarray]:
        index = int(self.encode["user"](np.array([user_id], dtype=np.int64))[0])
        if self.history is None or index == OOV_INDEX or index >= self.history.num_users:
            return {f: np.zeros(0, dtype=np.int64) for f in HISTORY_FIELDS}
        lo, hi = self.history.offsets[index], self.history.offsets[index + 1]
        return {f: np.asarray(getattr(self.history, f)[lo:hi], dtype=np.int64) for f in HISTORY_FIELDS}

    def _merge(self, user_id: int, live: UserLive) -> None:
        new, seqs = self.store.user_events(user_id, after_seq=live.last_seq)
        if not len(new):
            return
        add = {"item": self.encode["item"](new.item_id), "category": self.encode["category"](new.category_id),
               "behavior": np.asarray(new.behavior, dtype=np.int64), "timestamp": np.asarray(new.timestamp, dtype=np.int64)}
        old = live.events
        n = len(old["timestamp"])
        # Each new event goes after every event at its time or earlier: stable by time, arrival order.
        both = {f: np.concatenate([old[f], add[f]]) for f in HISTORY_FIELDS}
        order = np.argsort(both["timestamp"], kind="stable")
        in_order = bool((order[:n] == np.arange(n)).all())
        live.events = {f: v[order] for f, v in both.items()} if not in_order else both
        live.logged += len(new)
        live.last_seq = int(seqs[-1])
        if in_order:
            if live.lists is not None:
                for p in range(n, n + len(new)):
                    c = int(live.events["category"][p])
                    live.lists.setdefault(c, deque(maxlen=self.per_category)).appendleft(p)
            return
        changed = int(np.flatnonzero(order[:n] != np.arange(n))[0])  # first position that moved
        live.lists = None  # rebuilt on the next search
        for listener in self._listeners:
            listener(user_id, changed)

    def search(self, live: UserLive, events: Mapping[str, np.ndarray], categories: np.ndarray, *, cutoff: int,
               k: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """SIM hard search in ``events`` (a snapshot of ``live.events``) for each of ``categories``:
        the ``k`` newest behaviours before ``cutoff``, newest first, as ``(fields, offsets)``.

        The user's category lists answer when the snapshot is still the user's history (built
        from it on first use); when an append replaced it meanwhile, lists of the snapshot are
        built for this search alone, so a request never mixes two versions of a history.
        """
        found = None
        with live.lock:
            if live.events is events:
                if live.lists is None:
                    live.lists = category_lists(events["category"], per_category=self.per_category)
                found = [search_lists(live.lists, category=c, cutoff=cutoff, k=k) for c in categories.tolist()]
        if found is None:
            lists = category_lists(events["category"], per_category=self.per_category)
            found = [search_lists(lists, category=c, cutoff=cutoff, k=k) for c in categories.tolist()]
        rows = np.array([p for f in found for p in f], dtype=np.int64)
        return ({f: events[f][rows] for f in HISTORY_FIELDS},
                np.r_[0, np.cumsum([len(f) for f in found])].astype(np.int64))


def search_batch(
    *, per_request: Sequence[Callable[[np.ndarray], tuple[Mapping[str, np.ndarray], np.ndarray]]],
    cand_category: np.ndarray, num_candidates: np.ndarray, num_categories: int,
) -> Searched:
    """SIM hard search of a batch whose requests each search their own history.

    ``per_request[b](categories [G_b])`` returns the request's found behaviours for each of its
    search groups, ``(fields -> [R_b], offsets [G_b+1])``, newest first per group, as
    :func:`models.batch.hard_search` lays them out for the whole batch.
    """
    num_candidates = np.asarray(num_candidates, dtype=np.int64)
    request = np.repeat(np.arange(len(num_candidates)), num_candidates)  # [C]
    keys, cand_group = np.unique(request * num_categories + np.asarray(cand_category, dtype=np.int64),
                                 return_inverse=True)
    group_request, group_category = keys // num_categories, keys % num_categories  # by request, then category
    bounds = np.searchsorted(group_request, np.arange(len(num_candidates) + 1))
    parts, lengths = [], []
    for b, search in enumerate(per_request):
        fields, offsets = search(group_category[bounds[b]:bounds[b + 1]])
        parts.append(fields)
        lengths.append(np.diff(offsets))
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return Searched(offsets=np.r_[0, np.cumsum(lengths_all)].astype(np.int64), group_request=group_request,
                    cand_group=cand_group.reshape(-1).astype(np.int64),
                    **{f: np.concatenate([np.asarray(p[f], dtype=np.int64) for p in parts]) if parts
                       else np.zeros(0, dtype=np.int64) for f in HISTORY_FIELDS})
