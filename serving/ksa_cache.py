"""Per-user KSA states for serving: a request reads its user's cached state instead of encoding the
whole history again.

A KSA block encodes a user's whole history (models/ksa.py): O(n (W C + n/k)) per request. Because an
encoded event depends only on the events before it (never on when it is read), serving can keep,
per user, a :class:`models.ksa.KSAState` (the K/V of the raw window and of every summary) and, per
request, append only the events that arrived since, then read the candidates out: O(W C + n/k).

For a request of user ``key`` whose whole history before its cut-off has ``L`` events, with a
cached state of ``n`` events::

    n == L, same prefix      read                                             hits
    n <  L, same prefix      append events n .. L-1 one by one, then read     hits, appended
                             (more than 32 + L/16 missing: encode all L       catch_ups
                             events at once instead, which is then cheaper)
    n >  L                   a request before the user's newest events:       reencodes
                             encode its L events for it alone; the cached
                             state is kept as it is
    prefix changed           a late event landed before event n: encode       rebuilds
                             all L events into a new state
    no state                 encode all L events into a new state             misses

"Same prefix" is a cheap check: event n - 1 of the history still has the item, category, behaviour
and timestamp the state was built with. It catches a late event placed before the boundary (the
events after it shift) unless the shifted event is identical in all four; the live-state layer
therefore also calls :meth:`KSACache.invalidate` with the position of every late event
(``LiveHistory.on_change(cache.invalidate)``), and a state that covers that position is dropped.
Nothing is ever read from a state that does not match its request, so every read-out equals
``KSABlock.forward`` on the request's whole history (fp32, to 1e-5: tests/test_ksa_cache.py).

Event tokens come from the model's own tables: a history slice goes through
``models.batch.make_batch`` and ``model.embeddings`` (with one event of context before it, so that
the first appended event gets the interval bucket of its gap to the previous event, as in a full
encode), then ``KSABlock.tokens``. A whole-history encode runs the block's layers over the history
in one pass (the chunked kernel) and keeps what :meth:`KSAState.append` would have kept.

SIM mode 'ksa' (``sim_ksa.yaml``) ranks a history's chunks by their KSA summaries, so its search
reads the same states: :meth:`KSACache.outputs` gives the SIM block's output too, from the state's
top-layer summaries and the ESU keys of the chosen chunks' events only (looked up per request, the
gap to the request time is theirs): O(n/k + guide_chunks C) per candidate, never the whole history.

Memory. States are kept in LRU order under ``budget_bytes`` of :attr:`KSAState.nbytes` (the
payload; the append buffers may reserve up to about twice that). After each request the least
recently used states are evicted until the total fits. A state larger than the whole budget is
used for its request and not kept (``too_large``, logged once): such a user is encoded on every
request, as without a cache, and the budget holds at all times.

Restarts. :meth:`KSACache.to_blob` / :meth:`KSACache.load_blob` carry a state as bytes (for the
state store): a header (format version, a digest of the model's weights, the last event) and
:meth:`KSAState.to_bytes`, each with a sha256. Bytes of another format version or another model, or
corrupt bytes, are refused with a warning in the log and the user's state is encoded again on its
next request: never a wrong score.

Threads. One lock guards the cache: read-outs of concurrent batches run one after the other.

Notation: B requests, C candidates (jagged by ``cand_offsets [B+1]``), D the embedding dim,
d = ``ksa.d_model``, n events in a state, L events in a request's history.

Example:
    >>> from models.batch import FeatureSpec, make_batch
    >>> from models.ctr import build_model
    >>> from recsys.model_schemas import KSAConfig, ModelConfig
    >>> spec = FeatureSpec(sizes={"item": 20, "category": 4}, time_gap_buckets=8)
    >>> cfg = ModelConfig(ksa=KSAConfig(enabled=True, chunk=2, window=1, d_model=8, heads=2))
    >>> model = build_model(cfg, spec).eval()
    >>> hist = {"item": np.array([3, 4, 5]), "category": np.array([1, 2, 1]),
    ...         "behavior": np.array([0, 0, 3]), "timestamp": np.array([60, 120, 900])}
    >>> batch = make_batch(spec, history={f: Jagged(v, np.array([0, 3])) for f, v in hist.items()},
    ...                    request_time=np.array([1000]), candidates={"item": np.array([7, 8]),
    ...                    "category": np.array([1, 3])}, num_candidates=np.array([2]))
    >>> emb = model.embed(batch)
    >>> query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [C, 2D]
    >>> cache = KSACache(model, budget_bytes=1 << 20)
    >>> out = cache.readout([17], [hist], query, np.array([0, 2]), np.array([1000]))
    >>> out.shape, cache.stats()["misses"], cache.stats()["users"]
    (torch.Size([2, 8]), 1, 1)
    >>> with torch.no_grad():
    ...     full = model.blocks["ksa"](emb, torch.tensor([0, 0]))
    >>> bool(torch.allclose(out, full, atol=1e-5))
    True
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.batch import HISTORY_FIELDS, make_batch, time_gap_bucket
from models.ctr import CTRModel
from models.embedding import Embedded
from models.jagged import positions
from models.ksa import (
    Geometry,
    KSABlock,
    KSAState,
    ReadoutKeys,
    attend_chunked,
    attend_summaries,
    rotation,
    summary_positions,
)
from models.sim import SIMBlock, esu_keys
from recsys.errors import RecsysError
from recsys.types import Jagged

log = logging.getLogger("recsys.serving.ksa_cache")

BLOB_MAGIC = b"KSAC"
BLOB_VERSION = 1
# magic | format version u32 | model digest (32 bytes) | last event: item, category, behaviour, timestamp (i64)
_HEADER = struct.Struct("<4sI32s4q")
_DIGEST = 32  # sha256 of the header, after it

#: Counters of :meth:`KSACache.stats` (and ``bytes``, ``users``, ``budget_bytes``).
COUNTERS = ("hits", "misses", "appended", "catch_ups", "rebuilds", "reencodes", "empty", "evictions",
            "too_large", "invalidations", "blob_loads", "blob_rejects")


def weights_digest(model: nn.Module) -> bytes:
    """sha256 of a model's state dict (names, dtypes, shapes, values): states cached by one model
    must never be read by another."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.digest()


@dataclass
class _Entry:
    """A cached state and the last event it holds (the prefix check)."""

    state: KSAState
    last: tuple[int, ...]  # item, category, behaviour, timestamp of event n - 1
    nbytes: int


@dataclass(frozen=True)
class _Read:
    """What one request's candidates (rows ``lo:hi``) read, copied out of its user's state."""

    lo: int
    hi: int
    keys: ReadoutKeys  # the KSA read-out's keys
    n: int  # events in the state
    summaries: torch.Tensor | None  # SIM mode 'ksa': [M, d] top-layer summaries
    esu: Callable[[torch.Tensor], torch.Tensor] | None  # SIM mode 'ksa': ESU keys of history positions


def _event(history: Mapping[str, np.ndarray], i: int) -> tuple[int, ...]:
    return tuple(int(history[f][i]) for f in HISTORY_FIELDS)


class KSACache:
    """Per-user KSA states of one model, LRU-evicted under a byte budget (see the module docstring).

    Args:
        model: a :class:`~models.ctr.CTRModel` with a ``ksa`` block, in eval mode, on the CPU. Its
            weights must not change while the cache is in use.
        budget_bytes: the most bytes of states (:attr:`KSAState.nbytes`) kept; 0 keeps none.
        model_id: names the weights in blobs (e.g. the export's weights.pt sha256); default a sha256
            of the model's state dict.
        load, save: a store for states (``load(key) -> blob or None``, ``save(key, blob)``): a user
            with no state in memory is looked up there before being encoded, and a state is saved
            there after each whole-history encode and by :meth:`flush`. Failures are logged, never
            raised (the store holds a cache, not the truth).

    Raises:
        ValueError: a model without a KSA block, in training mode, off the CPU, or a negative budget.
        TypeError: a budget that is not an integer.
    """

    #: Append missing events one by one up to ``APPEND_BASE + L // APPEND_SHARE`` of them; beyond
    #: that one whole-history encode is cheaper (ksa.yaml on the 2-core machine: an append costs about
    #: 0.8 ms per event, a whole encode of 10,000 events 0.4-2 s, i.e. 0.04-0.2 ms per event).
    APPEND_BASE = 32
    APPEND_SHARE = 16

    def __init__(self, model: CTRModel, *, budget_bytes: int, model_id: str | None = None,
                 load: Callable[[int], bytes | None] | None = None, save: Callable[[int, bytes], None] | None = None) -> None:
        if "ksa" not in model.blocks:
            raise ValueError(f"model: KSACache needs a model with a 'ksa' block, got blocks {list(model.blocks)}")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int | np.integer):
            raise TypeError(f"budget_bytes: expected an integer, got {budget_bytes!r}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes ({budget_bytes}) must be >= 0")
        if model.training:
            raise ValueError("model: must be in eval mode (call model.eval() first)")
        devices = sorted({str(p.device) for p in model.parameters()} - {"cpu"})
        if devices:
            raise ValueError(f"model: KSA states live on the CPU; the model has parameters on {devices}")
        block: KSABlock = model.blocks["ksa"]
        sim = model.blocks["sim"] if "sim" in model.blocks else None
        # SIM's KSA-guided search ranks the chunks by their summaries: it reads them from the same states
        self.sim: SIMBlock | None = sim if sim is not None and sim.mode == "ksa" else None
        #: The blocks whose outputs :meth:`outputs` gives (``model.score(given=...)``).
        self.blocks: tuple[str, ...] = ("ksa", "sim") if self.sim is not None else ("ksa",)
        self.model, self.block = model, block
        self.spec = model.embeddings.spec
        self.budget_bytes = int(budget_bytes)
        self.model_digest = hashlib.sha256(model_id.encode()).digest() if model_id is not None else weights_digest(model)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._warned_too_large = False
        self._lock = threading.RLock()
        self._load, self._save = load, save
        self._no_candidates = {f: np.zeros(0, dtype=np.int64) for f in self.spec.candidate}
        self._profile = {f: np.zeros(1, dtype=np.int64) for f in self.spec.profile}

    # --- scoring

    @torch.no_grad()
    def readout(self, keys: Sequence[int], histories: Sequence[Mapping[str, np.ndarray]], query: torch.Tensor,
                cand_offsets: np.ndarray, request_times: np.ndarray) -> torch.Tensor:
        """The KSA block's output for a scoring batch, from the users' cached states.

        Args:
            keys: [B] user keys (the raw user ids); a user may appear several times.
            histories: [B] each request's user's whole history strictly before its cut-off, oldest
                first, as vocabulary indices: ``item``, ``category``, ``behavior``, ``timestamp``
                arrays of one length (what serving/scorer.py gathers).
            query: [C, 2D] the candidates' ``[item | category]`` embeddings (``model.embed``).
            cand_offsets: [B+1] candidates of request b are rows ``cand_offsets[b]:cand_offsets[b+1]``.
            request_times: [B] cut-offs (unix seconds).

        Returns:
            [C, d] equal to ``model.blocks["ksa"](emb, request)`` on a batch of the whole histories;
            pass it as ``model.score(emb, given={"ksa": out})``.

        Raises:
            ValueError: inputs that do not describe the same B requests, a query of the wrong shape,
                a history without a field or with fields of different lengths.
        """
        return self._run(keys, histories, query, cand_offsets, request_times, sim=False)["ksa"]

    @torch.no_grad()
    def outputs(self, keys: Sequence[int], histories: Sequence[Mapping[str, np.ndarray]], query: torch.Tensor,
                cand_offsets: np.ndarray, request_times: np.ndarray) -> dict[str, torch.Tensor]:
        """The outputs of every block in :attr:`blocks` for a scoring batch, from the users' states:
        :meth:`readout`'s, and with SIM mode 'ksa' the SIM block's too (its guided search ranks the
        chunks by the state's summaries and looks up only the chosen chunks' events,
        :meth:`models.sim.SIMBlock.guided_search_one`). Arguments as :meth:`readout`.

        Returns:
            block name -> [C, out_dim], equal to those blocks on a batch of the whole histories;
            pass it as ``model.score(emb, given=...)``.
        """
        return self._run(keys, histories, query, cand_offsets, request_times, sim=self.sim is not None)

    def given(self, keys: Sequence[int], histories: Sequence[Mapping[str, np.ndarray]], cand_offsets: np.ndarray,
              request_times: np.ndarray) -> dict[str, Callable[[Embedded], torch.Tensor]]:
        """:meth:`outputs` as functions of the embedded batch, for ``model.score(emb, given=...)`` on a
        batch whose candidate embeddings move (AGE's exploration, models/age.py).

        The states are brought up to each request's history now, as by :meth:`outputs` (the lock
        held); what each request's candidates read is copied out (:meth:`KSAState.keys_at`, SIM's
        summaries), so later requests that advance the states do not change it. Each call then
        reads the batch's ``[item | category]`` query out of those copies, differentiably: the
        outputs follow the query as the model's own blocks would. Arguments as :meth:`readout`.

        Returns:
            block name (:attr:`blocks`) -> ``fn(emb) -> [C, out_dim]``.

        Raises:
            ValueError: as :meth:`readout` (no query to check).
        """
        cand_offsets = np.asarray(cand_offsets, dtype=np.int64)
        self._check(keys, histories, None, cand_offsets, request_times)
        reads = self._reads(keys, histories, cand_offsets, request_times, sim=self.sim is not None)

        def block_output(name: str) -> Callable[[Embedded], torch.Tensor]:
            def output(emb: Embedded) -> torch.Tensor:
                query = torch.cat([emb.candidate["item"], emb.candidate["category"]], -1)  # [C, 2D]
                return self._read(reads, query, name, differentiable=True)
            return output

        return {name: block_output(name) for name in self.blocks}

    def _run(self, keys, histories, query, cand_offsets, request_times, *, sim: bool) -> dict[str, torch.Tensor]:
        cand_offsets = np.asarray(cand_offsets, dtype=np.int64)
        self._check(keys, histories, query, cand_offsets, request_times)
        reads = self._reads(keys, histories, cand_offsets, request_times, sim=sim)
        names = ("ksa", "sim") if sim else ("ksa",)
        return {name: self._read(reads, query, name, differentiable=False) for name in names}

    def _reads(self, keys, histories, cand_offsets: np.ndarray, request_times, *, sim: bool) -> list[_Read]:
        """Each request's state brought up to its history, and what its candidates read (lock held)."""
        reads = []
        with self._lock:
            # a user's requests by history length: the state advances through them, never back
            order = sorted(range(len(keys)), key=lambda b: (int(keys[b]), len(histories[b]["item"])))
            for b in order:
                if len(histories[b]["item"]) == 0:
                    self._counts["empty"] += 1
                    continue
                state = self._state_for(int(keys[b]), histories[b])
                lo, hi = int(cand_offsets[b]), int(cand_offsets[b + 1])
                if hi == lo:
                    continue
                t = int(request_times[b])
                # top_sum.view() stays valid: appends write after its rows (or into a new buffer)
                reads.append(_Read(lo=lo, hi=hi, keys=state.keys_at(t, self._gap_bucket), n=state.n,
                                   summaries=state.top_sum.view() if sim else None,
                                   esu=self._esu_keys(histories[b], t) if sim else None))
        return reads

    def _read(self, reads: Sequence[_Read], query: torch.Tensor, name: str, *, differentiable: bool) -> torch.Tensor:
        """[C, out_dim] block ``name``'s output for every candidate; zeros for a request without history."""
        block = self.block if name == "ksa" else self.sim
        out = query.new_zeros(len(query), block.out_dim)  # [C, d] or [C, heads * 4D], as the blocks' own
        for r in reads:
            q = query[r.lo:r.hi]  # [M, 2D]
            if name == "ksa":
                out[r.lo:r.hi] = r.keys.read(self.block, q)
            else:
                out[r.lo:r.hi] = self.sim.guided_search_one(q, r.summaries, r.n, r.esu, differentiable=differentiable)
        return out

    def _esu_keys(self, history: Mapping[str, np.ndarray], request_time: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``keys(positions [P]) -> [P, 4D]``: ESU keys of those events of ``history`` for a request
        at ``request_time``, through the model's own tables (gap = request time - event time)."""
        def keys(rows: torch.Tensor) -> torch.Tensor:
            p = rows.numpy()
            seg = {f: Jagged(np.asarray(history[f][p], dtype=np.int64), np.array([0, len(p)])) for f in HISTORY_FIELDS}
            batch = make_batch(self.spec, history=seg, request_time=np.array([request_time]),
                               candidates=self._no_candidates, num_candidates=np.zeros(1, dtype=np.int64),
                               profile=self._profile)
            with torch.no_grad():  # history embeddings: AGE moves only the candidates'
                return esu_keys(self.model.embeddings(batch).history)
        return keys

    def _check(self, keys, histories, query, cand_offsets, request_times) -> None:
        b = len(keys)
        if len(histories) != b or len(request_times) != b or len(cand_offsets) != b + 1:
            raise ValueError(f"keys ({b}), histories ({len(histories)}), request_times ({len(request_times)}) and "
                             f"cand_offsets ({len(cand_offsets)}, B+1) must describe the same B requests")
        width = self.block.readout.query.in_features
        if query is not None and (query.dim() != 2 or query.shape[1] != width
                                  or query.shape[0] != (cand_offsets[-1] if b else 0)):
            raise ValueError(f"query: expected shape [{int(cand_offsets[-1]) if b else 0}, {width}] "
                             f"([cand_offsets[-1], 2D]), got {list(query.shape)}")
        for i, h in enumerate(histories):
            missing = [f for f in HISTORY_FIELDS if f not in h]
            if missing:
                raise ValueError(f"histories[{i}]: missing {missing} (a history has {list(HISTORY_FIELDS)})")
            lengths = {f: len(h[f]) for f in HISTORY_FIELDS}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"histories[{i}]: fields of different lengths {lengths}")

    def _state_for(self, key: int, history: Mapping[str, np.ndarray]) -> KSAState:
        """The state to read for one request (lock held); cached, advanced, or encoded for it alone."""
        length = len(history["item"])
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            n = entry.state.n
            if n > length:  # an earlier cut-off than the state's: the state stays for later requests
                self._counts["reencodes"] += 1
                return self._encode(history)
            if _event(history, n - 1) != entry.last:
                self._counts["rebuilds"] += 1
                log.debug("KSA state of user %d no longer matches its history at event %d: rebuilt", key, n - 1)
            elif length - n > self.APPEND_BASE + length // self.APPEND_SHARE:
                self._counts["catch_ups"] += 1
            else:
                if length > n:
                    tokens = self._tokens(history, n, length)  # [L - n, d]
                    try:
                        entry.state.append(self.block, tokens, history["timestamp"][n:])
                    except BaseException:  # a half-appended state is never read again
                        self._drop(key)
                        raise
                    self._counts["appended"] += length - n
                    entry.last = _event(history, length - 1)
                    self._resize(key, entry)
                self._counts["hits"] += 1
                return entry.state
            self._drop(key)
        elif self._load is not None and self._loaded(key):
            return self._state_for(key, history)  # now cached: checked and advanced as any cached state
        else:
            self._counts["misses"] += 1
        state = self._encode(history)
        if self._keep(key, state, _event(history, length - 1)):
            self._store(key)
        return state

    def _loaded(self, key: int) -> bool:
        """Whether ``key``'s state came from the store (lock held)."""
        try:
            data = self._load(key)
        except Exception as exc:  # noqa: BLE001 - a cache store that fails costs an encode, not a request
            log.warning("KSA state of user %d: loading it from the store failed (%s); encoding it", key, exc)
            return False
        return data is not None and self.load_blob(key, data)

    def _store(self, key: int) -> None:
        if self._save is None:
            return
        try:
            self._save(key, self.to_blob(key))
        except Exception as exc:  # noqa: BLE001 - as in _loaded
            log.warning("KSA state of user %d: saving it to the store failed (%s)", key, exc)

    def flush(self) -> int:
        """Save every cached state to the store (e.g. before a graceful stop); returns how many."""
        with self._lock:
            for key in list(self._entries):
                self._store(key)
            return len(self._entries) if self._save is not None else 0

    def _gap_bucket(self, seconds: np.ndarray) -> np.ndarray:
        return time_gap_bucket(seconds, self.spec.time_gap_buckets)

    def _tokens(self, history: Mapping[str, np.ndarray], start: int, stop: int) -> torch.Tensor:
        """Tokens [stop - start, d] of events start .. stop-1, through the model's own embedding tables."""
        lo = max(start - 1, 0)  # one event of context: the interval bucket of event start is its gap to start - 1
        seg = {f: Jagged(np.asarray(history[f][lo:stop], dtype=np.int64), np.array([0, stop - lo])) for f in HISTORY_FIELDS}
        batch = make_batch(self.spec, history=seg, request_time=seg["timestamp"].values[-1:] + 1,
                           candidates=self._no_candidates, num_candidates=np.zeros(1, dtype=np.int64),
                           profile=self._profile)
        emb = self.model.embeddings(batch)
        h = emb.history  # [stop - lo, D] each
        return self.block.tokens(h["item"], h["category"], h["behavior"], emb.hist_interval)[start - lo:]

    def _encode(self, history: Mapping[str, np.ndarray]) -> KSAState:
        """A state of the whole history from one pass of the block's layers."""
        return encode_state(self.block, self._tokens(history, 0, len(history["item"])),
                            np.asarray(history["timestamp"], dtype=np.int64))

    # --- the LRU under the budget

    def _keep(self, key: int, state: KSAState, last: tuple[int, ...]) -> bool:
        """Cache ``state`` as ``key``'s most recent (lock held); False when it alone exceeds the budget."""
        entry = _Entry(state=state, last=last, nbytes=0)
        self._entries[key] = entry
        return self._resize(key, entry)

    def _resize(self, key: int, entry: _Entry) -> bool:
        """Account a new or grown state, then evict down to the budget (lock held)."""
        size = entry.state.nbytes
        self._bytes += size - entry.nbytes
        entry.nbytes = size
        if size > self.budget_bytes:
            self._drop(key)
            self._counts["too_large"] += 1
            if not self._warned_too_large:
                self._warned_too_large = True
                log.warning("KSA state of user %d (%d bytes) exceeds the whole cache budget (%d bytes): not kept; "
                            "such users are encoded on every request (raise the budget)", key, size, self.budget_bytes)
            return False
        while self._bytes > self.budget_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self._counts["evictions"] += 1
        return True

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def invalidate(self, key: int, position: int = 0) -> bool:
        """Forget ``key``'s state if it holds event ``position`` or later: the history changed from
        ``position`` on (a late event placed there). Matches ``LiveHistory.on_change``'s listener.

        Returns:
            True when a state was dropped.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.state.n <= position:
                return False
            self._drop(key)
            self._counts["invalidations"] += 1
            return True

    def keys(self) -> list[int]:
        """Users with a cached state, least recently used first."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict[str, int]:
        """Counters (:data:`COUNTERS`, see the module docstring), ``bytes`` and ``users`` cached, and
        ``budget_bytes``. ``bytes <= budget_bytes`` always."""
        with self._lock:
            return {**self._counts, "bytes": self._bytes, "users": len(self._entries), "budget_bytes": self.budget_bytes}

    # --- bytes for a store

    def to_blob(self, key: int) -> bytes | None:
        """``key``'s state as bytes for :meth:`load_blob` (None when none is cached)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            header = _HEADER.pack(BLOB_MAGIC, BLOB_VERSION, self.model_digest, *entry.last)
            return header + hashlib.sha256(header).digest() + entry.state.to_bytes()

    def load_blob(self, key: int, data: bytes) -> bool:
        """Cache ``key``'s state from :meth:`to_blob` bytes (of this or an earlier process).

        Bytes that are not a blob, of another format version, of another model, or corrupt are
        refused with a warning (``blob_rejects``): the user is encoded on its next request. A state
        is read only by requests whose history still starts with its events (the prefix check).

        Returns:
            True when the state is now cached.

        Raises:
            TypeError: ``data`` is not bytes.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        try:
            state, last = self._parse(data)
        except Exception as exc:  # bytes from a store are untrusted: whatever does not parse is refused
            if not isinstance(exc, RecsysError):
                exc = RecsysError(f"KSA cache blob is corrupt ({type(exc).__name__}: {exc})")
            with self._lock:
                self._counts["blob_rejects"] += 1
            log.warning("KSA state blob of user %d refused (%s): it will be encoded from the history on its next "
                        "request", key, exc)
            return False
        with self._lock:
            self._drop(key)
            self._counts["blob_loads"] += 1
            return self._keep(key, state, last)

    def _parse(self, data: bytes) -> tuple[KSAState, tuple[int, ...]]:
        head_end = _HEADER.size + _DIGEST
        if len(data) < head_end or data[:4] != BLOB_MAGIC:
            raise RecsysError("not a KSA cache blob (bad magic bytes or too short)")
        magic, version, digest, *last = _HEADER.unpack(data[:_HEADER.size])
        if version != BLOB_VERSION:
            raise RecsysError(f"KSA cache blob version {version} is not supported (this build reads version {BLOB_VERSION})")
        if hashlib.sha256(data[:_HEADER.size]).digest() != data[_HEADER.size:head_end]:
            raise RecsysError("KSA cache blob is corrupt (header checksum mismatch)")
        if digest != self.model_digest:
            raise RecsysError("KSA cache blob was built by another model (its weights digest differs)")
        state = KSAState.from_bytes(data[head_end:], self.block)
        if state.n == 0 or state.last_time != last[3]:
            raise RecsysError(f"KSA cache blob is corrupt (its header says the last event is at {last[3]}, "
                              f"its state holds {state.n} events up to {state.last_time})")
        return state, tuple(last)


@torch.no_grad()
def encode_state(block: KSABlock, tokens: torch.Tensor, timestamps: np.ndarray) -> KSAState:
    """The :class:`KSAState` of a whole history from one pass of the block's layers (the chunked
    kernel, as ``KSABlock.forward``), equal to appending the events one by one but O(n (W C + n/k))
    in a few large operations instead of n small ones.

    Args:
        block: the model's KSA block.
        tokens: [n, d] event tokens (:meth:`KSABlock.tokens`), oldest first.
        timestamps: [n] their unix seconds.
    """
    state = KSAState.empty(block)
    n = len(tokens)
    if n == 0:
        return state
    enc, cfg = block.encoder, block.cfg
    C, S = cfg.chunk, cfg.summaries
    dh = cfg.d_model // cfg.heads
    m = n // C  # full chunks: each has its S summaries
    geo = Geometry(lengths=np.array([n]), chunk=C, summaries=S)
    pos_s = summary_positions(torch.tensor([m]), chunk=C, summaries=S)  # [m S]
    rot_e, rot_s = rotation(positions(torch.tensor([n])), dh), rotation(pos_s, dh)
    x, s = tokens, enc.summary_embedding.repeat(m, 1)  # [n, d], [m S, d]
    last_chunk = (n - 1) // C
    for i, layer in enumerate(enc.layers):
        q_e, k_e, v_e = layer.project(x, rot_e, summary=False)  # [n, H, dh]
        q_s, k_s, v_s = layer.project(s, rot_s, summary=True)  # [m S, H, dh]
        # what KSAState.append keeps per layer: K/V of chunks last - W_l .. last, and of every summary
        first = max(last_chunk - layer.window, 0) * C
        state.win_k[i], state.win_v[i] = k_e[first:].clone(), v_e[first:].clone()
        state.sum_k[i].append(k_s.transpose(0, 1))  # [H, m S, dh]
        state.sum_v[i].append(v_s.transpose(0, 1))
        a_e = attend_chunked(q_e, k_e, v_e, k_s, v_s, geo, layer.window)
        a_s = attend_summaries(q_s, k_e, v_e, k_s, v_s, geo)
        x, s = layer.finish(x, a_e), layer.finish(s, a_s)
    top_e, top_s = enc.final_norm(x), enc.final_norm(s)  # [n, d], [m S, d]
    timestamps = np.asarray(timestamps, dtype=np.int64)
    first = max(last_chunk - cfg.window, 0) * C  # the read-out's raw window
    state.top, state.top_time = top_e[first:].clone(), timestamps[first:].copy()
    state.top_sum.append(top_s)
    state.sum_time = timestamps[pos_s.numpy()]
    state.n, state.last_time = n, int(timestamps[-1])
    return state
