"""A synthetic lifelong-behaviour world whose true click probabilities are known.

The world is built to make each technique of the library measurable against a ceiling:

* **Items** have a category (Zipf-sized categories), a brand (Zipf), a price bucket (around a
  per-category level), a latent quality ``q ~ N(0, 1)`` and a Zipf popularity within their category,
  mildly correlated with quality. A share of the items arrives during the span (new items can only
  be sampled after they arrive).
* **Users** have a segment and an age bucket, 2–4 stable **long-term** categories (drawn from their
  segment's taste) with affinities in (0, 1] (the strongest is 1), and a **short-term** interest that
  drifts: a Markov chain over categories that moves at a new session with ``drift_change_prob``.
* **Events** (pv, cart, fav, buy) come in sessions. A session is about a long-term category with
  ``long_term_session_share``, else about the current short-term category; ``focus_share`` of its
  events are in that category, the rest anywhere. Sessions never overlap and spread over the
  whole span with uniform spacings, so a long-term interest of a heavy user is often visible only
  far back in the history (the manifest measures how often: ``visibility``).
* **New users** (``new_user_share``) join at a uniform time in the impression window; their
  sessions spread over the rest of the span only and their event count is scaled to it, so their
  requests see short histories (cold start). The manifest's ``new_users`` compares them with the
  others; ``users.true_new_user`` marks them (latent truth, never a feature).
* **Impressions**: an event in the last ``impression_days`` is followed, with ``request_rate``, by a
  request one second later with M candidates (from the current focus, the long-term categories,
  the segment's taste, popular items and new items), shown at a random permutation of positions
  0..M-1 (random so that the position effect is identifiable). A clicked impression is also logged
  as a pv event a few seconds after the request.

The click model, for user u at request time t, candidate item i at position p::

    logit = bias
          + w_long  · affinity(u, category(i))          long-term interest, in [0, 1]
          + w_short · [category(i) == focus(u, t)]      the current session's category
          + w_q     · quality(i)                        latent, ~ N(0, 1)
          + w_co    · coaction[segment(u), brand(i)]    double-centred, unit variance
          − w_pos   · log2(1 + p)
    P(click) = sigmoid(logit)

The co-action table has zero row and column means, so it has no additive part in segment or brand:
only a model that crosses the two (CAN, or a Cartesian product) can learn it. The manifest records
the parameters, the overall click rate, the oracle AUC (AUC of the true probabilities) and, per
term, the oracle AUC with that term removed: what the effect is worth.

Randomness: the world (items, segments, co-action) comes from ``default_rng([seed, 0])``; shard k
of ``shard_users`` users from ``default_rng([seed, 1, k])``. Same config and seed, same bytes.
Memory is bounded by one shard: the ``large`` preset streams shards into the Parquet writers.

Example:
    >>> from recsys.schemas import SynthConfig
    >>> import tempfile
    >>> cfg = SynthConfig(num_users=50, num_items=500, num_categories=10, num_brands=5)
    >>> manifest = generate(cfg, tempfile.mkdtemp() + "/world")
    >>> manifest["counts"]["users"]
    50
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys import __version__
from recsys.config import dump_config
from recsys.io import atomic_output_dir, sha256_file, write_json
from recsys.progress import bar, note
from recsys.schemas import SynthConfig
from recsys.types import BEHAVIOR_CODE, BEHAVIORS

DAY = 86_400
#: The effects of the click model, in the order of the formula.
TERMS = ("long_term", "short_term", "quality", "coaction", "position")
#: The window that a "recent-N" model sees (DIN's default): the manifest reports visibility in it.
RECENT = 100
_CLICK_DELAY = (2, 30)  # seconds after the request at which a click is logged as a pv event
_MERSENNE = 2**31 - 1


def raw_ids(index: np.ndarray, multiplier: int) -> np.ndarray:
    """Scramble 0-based indices into distinct positive int64 ids (a bijection mod 2^31 − 1)."""
    return ((index.astype(np.int64) + 1) * multiplier) % _MERSENNE


_ID_MULT = {"user": 48_271, "item": 69_621, "category": 16_807, "brand": 39_373}


# --------------------------------------------------------------------------------------------
# The world: everything shared by all users


@dataclass(frozen=True)
class World:
    """Global state of the synthetic world (small: O(items + segments × categories))."""

    cat_cdf: np.ndarray  # [C] global category popularity, cumulative
    item_category: np.ndarray  # [I]
    item_brand: np.ndarray  # [I]
    item_price: np.ndarray  # [I]
    item_quality: np.ndarray  # [I] float64
    item_arrival: np.ndarray  # [I] seconds from start; -1 for items there from the start
    # items ordered by (category, arrival): sampling an arrived item of a category is a searchsorted
    by_cat: np.ndarray  # [I] item indices in that order
    by_cat_key: np.ndarray  # [I] category << 32 | (arrival + 1), sorted
    by_cat_start: np.ndarray  # [C+1] offsets of each category in by_cat
    by_cat_cumw: np.ndarray  # [I] cumulative popularity weight in that order
    new_items: np.ndarray  # [I_new] items that arrive during the span, by arrival
    new_arrival: np.ndarray  # [I_new]
    seg_probs: np.ndarray  # [S]
    age_probs: np.ndarray  # [A]
    seg_pref: np.ndarray  # [S, C] each segment's category taste
    seg_cdf_flat: np.ndarray  # [S*C] row s holds s + cdf(seg_pref[s]) (one searchsorted for all rows)
    coaction: np.ndarray  # [S, Br]


def _zipf_probs(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights over n things in a random order, normalised."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return rng.permutation(w) / w.sum()


def build_world(cfg: SynthConfig) -> World:
    rng = np.random.default_rng([cfg.seed, 0])
    n_items, n_cat = cfg.num_items, cfg.num_categories
    cat_p = _zipf_probs(n_cat, cfg.items.category_exponent, rng)

    # Items: every category gets one item first (so each has an item from the start), the rest
    # follow the category sizes.
    cat = np.concatenate([np.arange(n_cat), rng.choice(n_cat, n_items - n_cat, p=cat_p)])
    cat = rng.permutation(cat)
    brand = rng.choice(cfg.num_brands, n_items, p=_zipf_probs(cfg.num_brands, cfg.items.brand_exponent, rng))
    price_level = rng.uniform(1.5, cfg.num_price_buckets - 2.5, n_cat)
    price = np.clip(np.rint(price_level[cat] + rng.normal(0, 1.5, n_items)), 0, cfg.num_price_buckets - 1)
    quality = rng.normal(0.0, 1.0, n_items)

    # Popularity within a category: Zipf over a rank that is mildly correlated with quality.
    rho = cfg.items.quality_popularity_corr
    score = rho * quality + math.sqrt(max(0.0, 1 - rho * rho)) * rng.normal(0.0, 1.0, n_items)
    order = np.lexsort((-score, cat))  # within each category, best score first
    within_rank = np.empty(n_items, dtype=np.int64)
    cat_sorted = cat[order]
    starts = np.searchsorted(cat_sorted, np.arange(n_cat))
    within_rank[order] = np.arange(n_items) - starts[cat_sorted]
    weight = (within_rank + 1.0) ** -cfg.items.popularity_exponent

    span = cfg.time.history_days * DAY
    is_new = rng.random(n_items) < cfg.items.new_item_share
    is_new[order[starts]] = False  # each category's most popular item exists from the start
    arrival = np.where(is_new, rng.integers(0, span, n_items), -1).astype(np.int64)

    key = (cat.astype(np.int64) << 32) | (arrival + 1)
    by_cat = np.argsort(key, kind="stable")
    by_cat_key = key[by_cat]
    by_cat_start = np.searchsorted(by_cat_key, np.arange(n_cat + 1, dtype=np.int64) << 32)
    by_cat_cumw = np.cumsum(weight[by_cat])

    new_items = np.flatnonzero(is_new)
    new_items = new_items[np.argsort(arrival[new_items], kind="stable")]

    seg_probs = _zipf_probs(cfg.num_segments, 0.5, rng)
    age_probs = rng.dirichlet(np.full(cfg.num_age_buckets, 4.0))
    # A segment's own taste (not mixed with global popularity): long-term interests come from it,
    # short-term drift follows global popularity, so the two overlap no more than chance.
    seg_pref = rng.dirichlet(np.full(n_cat, cfg.interests.segment_concentration), cfg.num_segments)
    seg_pref = np.maximum(seg_pref, 1e-12)
    seg_pref /= seg_pref.sum(axis=1, keepdims=True)
    seg_cdf = np.cumsum(seg_pref, axis=1)
    seg_cdf_flat = (seg_cdf + np.arange(cfg.num_segments)[:, None]).ravel()

    co = rng.normal(0.0, 1.0, (cfg.num_segments, cfg.num_brands))
    co = co - co.mean(axis=0, keepdims=True) - co.mean(axis=1, keepdims=True) + co.mean()
    co = co / co.std()

    return World(
        cat_cdf=np.cumsum(cat_p),
        item_category=cat,
        item_brand=brand,
        item_price=price.astype(np.int64),
        item_quality=quality,
        item_arrival=arrival,
        by_cat=by_cat,
        by_cat_key=by_cat_key,
        by_cat_start=by_cat_start,
        by_cat_cumw=by_cat_cumw,
        new_items=new_items,
        new_arrival=arrival[new_items],
        seg_probs=seg_probs,
        age_probs=age_probs,
        seg_pref=seg_pref,
        seg_cdf_flat=seg_cdf_flat,
        coaction=co,
    )


def _sample_cdf(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)


def _sample_segment_category(world: World, seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One category per row from that row's segment taste (a single searchsorted, no loop)."""
    n_cat = world.seg_pref.shape[1]
    u = rng.random(len(seg)) * (1 - 1e-12)
    flat = np.searchsorted(world.seg_cdf_flat, seg + u, side="right")
    return np.clip(flat - seg * n_cat, 0, n_cat - 1)


def _sample_items(world: World, cats: np.ndarray, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One item per row: popularity-weighted among the items of ``cats`` arrived by ``times``."""
    lo = world.by_cat_start[cats]
    hi = np.searchsorted(world.by_cat_key, (cats.astype(np.int64) << 32) | (times + 1), side="right")
    cum = world.by_cat_cumw
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    top = cum[hi - 1]
    u = base + rng.random(len(cats)) * (top - base)
    pos = np.clip(np.searchsorted(cum, u, side="right"), lo, hi - 1)
    return world.by_cat[pos]


# --------------------------------------------------------------------------------------------
# One shard of users


@dataclass
class Shard:
    users: pa.Table
    events: pa.Table
    impressions: pa.Table
    stats: dict[str, Any]


def _segment_cumsum(values: np.ndarray, first: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at each group; ``first[g]`` is group g's first index."""
    total = np.cumsum(values)
    before = total[first] - values[first]
    return total - before[group]


@dataclass
class Population:
    """One shard's users and their organic events, as world indices (before any request).

    Users are ``u0 + [0, n)``; events are user-major and time-ordered within a user; sessions too.
    """

    u0: int
    n: int
    seg: np.ndarray  # [n]
    age: np.ndarray  # [n]
    is_new: np.ndarray  # [n] bool: joined during the impression window (activity.new_user_share)
    k_u: np.ndarray  # [n] long-term interests of each user
    lt_cat: np.ndarray  # [n, K] long-term categories (the first k_u valid)
    lt_aff: np.ndarray  # [n, K] their affinities in [0, 1] (0 beyond k_u)
    has: np.ndarray  # [n, K] valid long-term slots
    user_first: np.ndarray  # [n] each user's first event
    ev_user: np.ndarray  # [N] shard-local user of each event
    ev_time: np.ndarray  # [N] seconds from the start
    ev_cat: np.ndarray  # [N]
    ev_item: np.ndarray  # [N]
    ev_beh: np.ndarray  # [N] behaviour codes
    sess_of: np.ndarray  # [N] session of each event
    sess_user: np.ndarray  # [Ns]
    sess_start: np.ndarray  # [Ns] seconds from the start (float)
    focus: np.ndarray  # [Ns] each session's category

    def focus_at(self, user: np.ndarray, time: np.ndarray) -> np.ndarray:
        """[R] the focus category of shard-local ``user`` at ``time``: its latest session started by then
        (its first session when none has)."""
        span = float(self.sess_start.max()) + 2.0 if len(self.sess_start) else 1.0
        key = self.sess_user * span + self.sess_start
        pos = np.searchsorted(key, np.asarray(user) * span + np.asarray(time, dtype=np.float64), side="right") - 1
        first = np.searchsorted(self.sess_user, user)
        return self.focus[np.maximum(pos, first)]


def simulate_population(cfg: SynthConfig, world: World, shard: int, rng: np.random.Generator) -> Population:
    """Users ``[shard·shard_users, …)``: profiles, interests, sessions and events (``rng`` advances)."""
    u0 = shard * cfg.shard_users
    n = min(cfg.shard_users, cfg.num_users - u0)
    act, inter = cfg.activity, cfg.interests
    span = cfg.time.history_days * DAY

    # ---- users [n]
    seg = rng.choice(cfg.num_segments, n, p=world.seg_probs)
    age = rng.choice(cfg.num_age_buckets, n, p=world.age_probs)
    n_ev = rng.lognormal(math.log(act.median_events), act.sigma, n)
    heavy = rng.random(n) < act.heavy_share  # power users: log-uniform up to max_events
    n_ev = np.where(heavy, act.max_events * 10 ** -rng.random(n), n_ev)
    n_ev = np.clip(np.rint(n_ev), act.min_events, act.max_events).astype(np.int64)
    # New users join at a uniform time in the impression window and act at their usual daily rate
    # from then on, so their requests see short histories (cold start). Without new users nothing
    # is drawn here, so such a config gives the same bytes as before new users existed.
    is_new = np.zeros(n, dtype=bool)
    join = np.zeros(n)  # [n] seconds from the start before which the user has no event
    if act.new_user_share > 0:
        is_new = rng.random(n) < act.new_user_share
        window = (cfg.time.history_days - cfg.time.impression_days) * DAY
        join = np.where(is_new, rng.uniform(window, span, n), 0.0)
        n_ev = np.where(is_new, np.maximum(1, np.rint(n_ev * (span - join) / span)), n_ev).astype(np.int64)

    # Long-term interests [n, K]: K categories without replacement from the segment taste
    # (Gumbel top-k), the first k_u of them kept, Dirichlet weights, affinity = weight / max.
    k_max, n_cat = inter.max_long_term, cfg.num_categories
    k_u = rng.integers(inter.min_long_term, k_max + 1, n)
    gumbel = np.log(world.seg_pref[seg]) + rng.gumbel(size=(n, n_cat))
    lt_cat = np.argpartition(-gumbel, k_max - 1, axis=1)[:, :k_max]
    lt_cat = np.take_along_axis(lt_cat, np.argsort(-np.take_along_axis(gumbel, lt_cat, 1), axis=1), 1)
    has = np.arange(k_max)[None, :] < k_u[:, None]
    lt_w = rng.gamma(1.0, size=(n, k_max)) * has
    lt_w /= lt_w.sum(axis=1, keepdims=True)
    lt_aff = lt_w / lt_w.max(axis=1, keepdims=True)

    # ---- sessions and events (user-major, time-ordered within a user)
    n_total = int(n_ev.sum())
    ev_user = np.repeat(np.arange(n), n_ev)  # [N]
    user_first = np.concatenate([[0], np.cumsum(n_ev)[:-1]])  # [n]
    new_sess = rng.random(n_total) < 1.0 / act.mean_session_events
    new_sess[user_first] = True
    sess_of = np.cumsum(new_sess) - 1  # [N] session index of each event
    sess_first = np.flatnonzero(new_sess)  # [Ns] first event of each session
    n_sess = len(sess_first)
    sess_user = ev_user[sess_first]  # [Ns]
    user_sess_first = np.searchsorted(sess_user, np.arange(n))  # [n] first session of each user

    gaps = rng.exponential(act.mean_event_gap_seconds, n_total)
    gaps[new_sess] = 0.0
    intra = _segment_cumsum(gaps, sess_first, sess_of)  # [N] seconds since the session started
    sess_last = np.concatenate([sess_first[1:], [n_total]]) - 1
    sess_dur = intra[sess_last]  # [Ns]

    # Non-overlapping sessions spread over the span: uniform spacings of the idle time.
    busy = np.bincount(sess_user, weights=sess_dur, minlength=n)  # [n]
    idle = span - 1.0 - join - busy  # join is 0 for established users: the same values as without it
    idle = np.where(is_new, np.maximum(idle, 0.0), idle)
    spacing = rng.exponential(1.0, n_sess)
    spacing_cum = _segment_cumsum(spacing, user_sess_first, sess_user)
    spacing_total = np.bincount(sess_user, weights=spacing, minlength=n) + rng.exponential(1.0, n)
    dur_before = _segment_cumsum(sess_dur, user_sess_first, sess_user) - sess_dur
    sess_start = join[sess_user] + idle[sess_user] * spacing_cum / spacing_total[sess_user] + dur_before
    ev_time = np.floor(sess_start[sess_of] + intra).astype(np.int64)  # [N] seconds from start

    # Session focus: a long-term category, or the drifting short-term one.
    is_lt = rng.random(n_sess) < inter.long_term_session_share
    pick = rng.random(n_sess)[:, None] > np.cumsum(lt_w[sess_user], axis=1)
    lt_pick = np.minimum(pick.sum(axis=1), k_u[sess_user] - 1)
    lt_choice = lt_cat[sess_user, lt_pick]
    change = rng.random(n_sess) < inter.drift_change_prob
    change[user_sess_first] = True
    drift_draw = _sample_cdf(world.cat_cdf, rng.random(n_sess))
    last_change = np.maximum.accumulate(np.where(change, np.arange(n_sess), 0))
    focus = np.where(is_lt, lt_choice, drift_draw[last_change])  # [Ns]

    in_focus = rng.random(n_total) < inter.focus_share
    ev_cat = np.where(in_focus, focus[sess_of], _sample_cdf(world.cat_cdf, rng.random(n_total)))
    ev_item = _sample_items(world, ev_cat, ev_time, rng)
    ev_beh = _sample_behaviors(cfg, world.item_quality[ev_item], rng)

    return Population(u0=u0, n=n, seg=seg, age=age, is_new=is_new, k_u=k_u, lt_cat=lt_cat, lt_aff=lt_aff, has=has,
                      user_first=user_first, ev_user=ev_user, ev_time=ev_time, ev_cat=ev_cat, ev_item=ev_item,
                      ev_beh=ev_beh, sess_of=sess_of, sess_user=sess_user, sess_start=sess_start, focus=focus)


def generate_shard(cfg: SynthConfig, world: World, shard: int, first_request_id: int) -> Shard:
    """Users ``[shard·shard_users, …)``: profiles, events, requests and impressions."""
    rng = np.random.default_rng([cfg.seed, 1, shard])
    pop = simulate_population(cfg, world, shard, rng)
    u0, n = pop.u0, pop.n
    seg, age, k_u, lt_cat, lt_aff, has = pop.seg, pop.age, pop.k_u, pop.lt_cat, pop.lt_aff, pop.has
    ev_user, ev_time, ev_item, ev_beh = pop.ev_user, pop.ev_time, pop.ev_item, pop.ev_beh
    user_first, focus, sess_of = pop.user_first, pop.focus, pop.sess_of
    n_total = len(ev_user)

    # ---- requests: an event in the impression window is followed by one with request_rate
    window = (cfg.time.history_days - cfg.time.impression_days) * DAY
    anchor = (ev_time >= window) & (rng.random(n_total) < cfg.impressions.request_rate)
    before = np.cumsum(anchor) - anchor  # [N] anchors earlier in the shard
    anchor &= (before - before[user_first][ev_user]) < cfg.impressions.max_requests_per_user
    anchors = np.flatnonzero(anchor)
    r_user = ev_user[anchors]  # [R]
    r_time = ev_time[anchors] + 1  # [R] one second after the anchor event
    r_focus = focus[sess_of[anchors]]
    cand_item = sample_candidates(cfg, world, r_user, r_time, r_focus, seg, lt_cat, k_u, rng)
    n_req, m = cand_item.shape
    position = np.argsort(rng.random((n_req, m)), axis=1)  # [R, M] a random permutation

    terms = click_terms(cfg, world, cand_item, position, r_user, r_focus, seg, lt_cat, lt_aff)
    weights = np.array([getattr(cfg.click_model, t) for t in TERMS])
    logit = cfg.click_model.bias + np.einsum("trm,t->rm", terms, weights)  # [R, M]
    prob = 1.0 / (1.0 + np.exp(-logit))
    clicked = rng.random((n_req, m)) < prob

    # ---- clicks are behaviour too: a pv event a few seconds after the request
    click_r, click_m = np.nonzero(clicked)
    c_item = cand_item[click_r, click_m]
    delay = rng.integers(_CLICK_DELAY[0], _CLICK_DELAY[1] + 1, len(click_r))
    all_user = np.concatenate([ev_user, r_user[click_r]])
    all_time = np.concatenate([ev_time, r_time[click_r] + delay])
    all_item = np.concatenate([ev_item, c_item])
    all_beh = np.concatenate([ev_beh, np.full(len(click_r), BEHAVIOR_CODE["pv"], np.int8)])
    order = np.lexsort((all_time, all_user))  # stable: ties keep generation order
    all_user, all_time, all_item, all_beh = all_user[order], all_time[order], all_item[order], all_beh[order]

    stats = _shard_stats(cfg, terms, logit, prob, clicked, all_user, all_time, world.item_category[all_item],
                         r_user, r_time, world.item_category[cand_item], pop.is_new[r_user])
    stats["new_users"] = int(pop.is_new.sum())

    # ---- tables (raw ids)
    start = int(cfg.time.start.timestamp())
    user_raw = raw_ids(np.arange(u0, u0 + n), _ID_MULT["user"])
    lt_list_offsets = np.concatenate([[0], np.cumsum(k_u)]).astype(np.int32)
    users = pa.table({
        "user_id": user_raw,
        "segment": seg.astype(np.int32),
        "age_bucket": age.astype(np.int32),
        "true_new_user": pop.is_new,
        "true_long_term_categories": pa.ListArray.from_arrays(
            lt_list_offsets, raw_ids(lt_cat[has], _ID_MULT["category"])),
        "true_long_term_affinity": pa.ListArray.from_arrays(
            lt_list_offsets, lt_aff[has].astype(np.float32)),
    })
    events = pa.table({
        "user_id": user_raw[all_user],
        "item_id": raw_ids(all_item, _ID_MULT["item"]),
        "category_id": raw_ids(world.item_category[all_item], _ID_MULT["category"]),
        "behavior": pa.DictionaryArray.from_arrays(pa.array(all_beh, pa.int8()), pa.array(BEHAVIORS)),
        "timestamp": all_time + start,
    })
    request_id = first_request_id + np.arange(n_req, dtype=np.int64)
    by_position = np.argsort(position, axis=1)  # rows in display order
    impressions = pa.table({
        "request_id": np.repeat(request_id, m),
        "user_id": np.repeat(user_raw[r_user], m),
        "timestamp": np.repeat(r_time + start, m),
        "item_id": raw_ids(np.take_along_axis(cand_item, by_position, 1).ravel(), _ID_MULT["item"]),
        "position": np.take_along_axis(position, by_position, 1).ravel().astype(np.int32),
        "clicked": np.take_along_axis(clicked, by_position, 1).ravel().astype(np.int8),
        "true_prob": np.take_along_axis(prob, by_position, 1).ravel().astype(np.float32),
    })
    return Shard(users=users, events=events, impressions=impressions, stats=stats)


def _sample_behaviors(cfg: SynthConfig, quality: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """pv unless a cart/fav/buy draw hits; better items get more of them."""
    b = cfg.behaviors
    lift = np.exp(b.quality_effect * quality)
    p = np.stack([b.cart * lift, b.fav * lift, b.buy * lift], axis=1)  # [N, 3]
    p *= np.minimum(1.0, 0.9 / p.sum(axis=1, keepdims=True))  # leave room for pv
    u = rng.random(len(quality))[:, None]
    hit = u < np.cumsum(p, axis=1)
    code = np.where(hit.any(axis=1), 1 + hit.argmax(axis=1), 0)
    return code.astype(np.int8)


def sample_candidates(
    cfg: SynthConfig,
    world: World,
    r_user: np.ndarray,
    r_time: np.ndarray,
    r_focus: np.ndarray,
    seg: np.ndarray,
    lt_cat: np.ndarray,
    k_u: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """[R, M] distinct candidate items per request, from the configured source mix."""
    n_req, m = len(r_user), cfg.impressions.candidates
    mix = cfg.impressions.mix
    shares = np.array([mix.focus, mix.long_term, mix.segment, mix.popular, mix.new])
    source = _sample_cdf(np.cumsum(shares), rng.random((n_req, m)).ravel()).reshape(n_req, m)
    rows = np.repeat(np.arange(n_req), m).reshape(n_req, m)
    user = r_user[rows]
    times = np.repeat(r_time, m).reshape(n_req, m)

    cats = _sample_cdf(world.cat_cdf, rng.random(n_req * m)).reshape(n_req, m)  # popular
    cats = np.where(source == 0, r_focus[rows], cats)
    # Any of the user's long-term categories, uniformly: retrieval covers each interest cluster.
    lt_pick = (rng.random((n_req, m)) * k_u[user]).astype(np.int64)
    cats = np.where(source == 1, lt_cat[user, lt_pick], cats)
    seg_cats = _sample_segment_category(world, seg[user].ravel(), rng).reshape(n_req, m)
    cats = np.where(source == 2, seg_cats, cats)
    items = _sample_items(world, cats.ravel(), times.ravel(), rng).reshape(n_req, m)

    # New items: uniform among those that arrived in the last new_item_days (else keep popular).
    fresh_lo = np.searchsorted(world.new_arrival, r_time - cfg.impressions.new_item_days * DAY)
    fresh_hi = np.searchsorted(world.new_arrival, r_time, side="right")
    n_fresh = (fresh_hi - fresh_lo)[rows]  # [R, M]
    offset = (rng.random((n_req, m)) * n_fresh).astype(np.int64)
    if len(world.new_items):
        fresh = world.new_items[np.minimum(fresh_lo[rows] + offset, len(world.new_items) - 1)]
        items = np.where((source == 4) & (n_fresh > 0), fresh, items)

    # Distinct candidates: redraw duplicates from all arrived items of a popular category.
    for _ in range(20):
        order = np.argsort(items, axis=1, kind="stable")
        s = np.take_along_axis(items, order, 1)
        dup_sorted = np.zeros_like(s, dtype=bool)
        dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
        if not dup_sorted.any():
            break
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, 1)
        r, c = np.nonzero(dup)
        redraw_cat = _sample_cdf(world.cat_cdf, rng.random(len(r)))
        items[r, c] = _sample_items(world, redraw_cat, r_time[r], rng)
    return items


def click_terms(
    cfg: SynthConfig,
    world: World,
    items: np.ndarray,
    position: np.ndarray,
    r_user: np.ndarray,
    r_focus: np.ndarray,
    seg: np.ndarray,
    lt_cat: np.ndarray,
    lt_aff: np.ndarray,
) -> np.ndarray:
    """[T, R, M] the unweighted terms of the click model, in TERMS order."""
    cat = world.item_category[items]  # [R, M]
    match = cat[:, :, None] == lt_cat[r_user][:, None, :]  # [R, M, K]
    long_term = (match * lt_aff[r_user][:, None, :]).sum(axis=2)
    short_term = (cat == r_focus[:, None]).astype(np.float64)
    quality = world.item_quality[items]
    coaction = world.coaction[seg[r_user][:, None], world.item_brand[items]]
    pos = -np.log2(1.0 + position)
    return np.stack([long_term, short_term, quality, coaction, pos])


# --------------------------------------------------------------------------------------------
# Statistics for the manifest (streamed per shard, merged at the end)

_AUC_BINS = 1 << 17
_AUC_LO, _AUC_HI = -25.0, 15.0


def _logit_hist(logit: np.ndarray, clicked: np.ndarray) -> np.ndarray:
    """[2, bins] counts of (not clicked, clicked) per logit bin: an AUC in bounded memory."""
    idx = ((logit.ravel() - _AUC_LO) * (_AUC_BINS / (_AUC_HI - _AUC_LO))).astype(np.int64)
    idx = np.clip(idx, 0, _AUC_BINS - 1) + _AUC_BINS * clicked.ravel().astype(np.int64)
    return np.bincount(idx, minlength=2 * _AUC_BINS).reshape(2, _AUC_BINS)


def hist_auc(hist: np.ndarray) -> float:
    """AUC from ``_logit_hist`` counts (ties within a bin count one half)."""
    neg, pos = hist[0].astype(np.float64), hist[1].astype(np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def _shard_stats(
    cfg: SynthConfig,
    terms: np.ndarray,
    logit: np.ndarray,
    prob: np.ndarray,
    clicked: np.ndarray,
    ev_user: np.ndarray,
    ev_time: np.ndarray,
    ev_cat: np.ndarray,
    r_user: np.ndarray,
    r_time: np.ndarray,
    cand_cat: np.ndarray,
    r_new: np.ndarray,
) -> dict[str, Any]:
    """Per-shard sums for the manifest: AUC histograms (full and per removed term), visibility
    counts, clicks, the sum of true probabilities, the longest history, and per request whether
    its user is new, its clicks and its history length (events before the request)."""
    weights = {t: getattr(cfg.click_model, t) for t in TERMS}
    hists = {"full": _logit_hist(logit, clicked)}
    for i, t in enumerate(TERMS):
        hists[t] = _logit_hist(logit - weights[t] * terms[i], clicked)

    # Where is the candidate's category in the user's history before the request?
    # 0: among the last RECENT events, 1: only older than that, 2: never before.
    key = (ev_user.astype(np.int64) << 40) | ev_time
    end = np.searchsorted(key, (r_user.astype(np.int64) << 40) | r_time, side="left")  # [R]
    user_lo = np.searchsorted(ev_user, r_user)  # [R] first event of the user
    first_seen = _first_seen(ev_user, ev_cat, ev_time)
    n_req, m = cand_cat.shape
    visibility = np.full((n_req, m), 2, dtype=np.int8)
    seen = first_seen(r_user[:, None], cand_cat) < r_time[:, None]
    visibility[seen] = 1
    for lo in range(0, n_req, 20_000):  # [chunk, RECENT] window gathers, bounded memory
        hi = min(lo + 20_000, n_req)
        idx = end[lo:hi, None] - 1 - np.arange(RECENT)[None, :]
        valid = idx >= user_lo[lo:hi, None]
        window = np.where(valid, ev_cat[np.maximum(idx, 0)], -1)  # [chunk, RECENT]
        recent = (window[:, None, :] == cand_cat[lo:hi, :, None]).any(axis=2)  # [chunk, M]
        visibility[lo:hi][recent] = 0
    is_lt = terms[TERMS.index("long_term")] > 0  # [R, M] a long-term category has affinity > 0
    vis_counts = np.zeros((2, 3, 2), dtype=np.int64)  # [is_lt, visibility, clicked]
    np.add.at(vis_counts, (is_lt.ravel().astype(np.int64), visibility.ravel(), clicked.ravel().astype(np.int64)), 1)
    return {
        "hists": hists,
        "visibility": vis_counts,
        "clicks": int(clicked.sum()),
        "impressions": int(clicked.size),
        "prob_sum": float(prob.sum()),
        "max_history": int(np.bincount(ev_user).max()) if len(ev_user) else 0,
        "request_new": r_new,
        "request_clicks": clicked.sum(axis=1).astype(np.int32),
        "request_history": (end - user_lo).astype(np.int32),
    }


def _first_seen(ev_user: np.ndarray, ev_cat: np.ndarray, ev_time: np.ndarray):
    """A lookup ``(user, category) -> first event time`` (int64 max when never)."""
    key = (ev_user.astype(np.int64) << 32) | ev_cat
    order = np.lexsort((ev_time, key))
    k_sorted, t_sorted = key[order], ev_time[order]
    first = np.concatenate([[True], k_sorted[1:] != k_sorted[:-1]])
    keys, times = k_sorted[first], t_sorted[first]
    never = np.iinfo(np.int64).max

    def lookup(user: np.ndarray, cat: np.ndarray) -> np.ndarray:
        q = (user.astype(np.int64) << 32) | cat
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[pos] == q, times[pos], never) if len(keys) else np.full(q.shape, never)

    return lookup


# --------------------------------------------------------------------------------------------
# Writing the world


def generate(cfg: SynthConfig, out: str | Path, *, preset: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Generate the world described by ``cfg`` into directory ``out``; return the manifest.

    Files: ``events.parquet``, ``impressions.parquet``, ``items.parquet``, ``users.parquet``,
    ``manifest.json`` and ``config.yaml``. They appear together (atomic rename) or not at all.

    Raises:
        OutputExistsError: ``out`` is not empty and ``overwrite`` is false.
    """
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        world = build_world(cfg)
        start = int(cfg.time.start.timestamp())
        _write_items(cfg, world, tmp / "items.parquet", start)
        n_shards = math.ceil(cfg.num_users / cfg.shard_users)
        writers: dict[str, pq.ParquetWriter] = {}
        totals = {"users": 0, "events": 0, "requests": 0, "impressions": 0, "clicks": 0}
        hists: dict[str, np.ndarray] = {}
        vis = np.zeros((2, 3, 2), dtype=np.int64)
        prob_sum = 0.0
        max_history = 0
        new_users = 0
        per_request: dict[str, list[np.ndarray]] = {"request_new": [], "request_clicks": [], "request_history": []}
        try:
            for shard in bar(range(n_shards), total=n_shards, desc="synth", unit="shard"):
                part = generate_shard(cfg, world, shard, first_request_id=totals["requests"])
                for name, table in (("users", part.users), ("events", part.events), ("impressions", part.impressions)):
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(tmp / f"{name}.parquet", table.schema, compression="zstd")
                    writers[name].write_table(table, row_group_size=1 << 20)
                totals["users"] += part.users.num_rows
                totals["events"] += part.events.num_rows
                totals["impressions"] += part.impressions.num_rows
                totals["requests"] += part.impressions.num_rows // cfg.impressions.candidates
                totals["clicks"] += part.stats["clicks"]
                prob_sum += part.stats["prob_sum"]
                for key, h in part.stats["hists"].items():
                    hists[key] = hists[key] + h if key in hists else h
                vis += part.stats["visibility"]
                max_history = max(max_history, part.stats["max_history"])
                new_users += part.stats["new_users"]
                for key, values in per_request.items():
                    values.append(part.stats[key])
        finally:
            for w in writers.values():
                w.close()
        manifest = _manifest(cfg, world, preset, totals, hists, vis, prob_sum, max_history)
        manifest["new_users"] = _new_user_summary(cfg, new_users, **{k: np.concatenate(v) for k, v in per_request.items()})
        manifest["files"] = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.glob("*.parquet"))
        }
        write_json(tmp / "manifest.json", manifest)
        (tmp / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    note(
        f"[synth] {totals['users']:,} users, {totals['events']:,} events, {totals['requests']:,} requests, "
        f"{totals['impressions']:,} impressions, CTR {manifest['ctr']:.4f}, oracle AUC {manifest['oracle_auc']:.4f} -> {out}"
    )
    return manifest


def _write_items(cfg: SynthConfig, world: World, path: Path, start: int) -> None:
    idx = np.arange(cfg.num_items)
    arrival = np.where(world.item_arrival < 0, 0, world.item_arrival) + start
    table = pa.table({
        "item_id": raw_ids(idx, _ID_MULT["item"]),
        "category_id": raw_ids(world.item_category, _ID_MULT["category"]),
        "brand_id": raw_ids(world.item_brand, _ID_MULT["brand"]),
        "price_bucket": world.item_price.astype(np.int32),
        "available_from": arrival,
        "true_quality": world.item_quality.astype(np.float32),
    })
    pq.write_table(table, path, compression="zstd")


def _new_user_summary(
    cfg: SynthConfig, users: int, *, request_new: np.ndarray, request_clicks: np.ndarray, request_history: np.ndarray,
) -> dict[str, Any]:
    """The manifest's ``new_users``: how many, their requests' CTR and history lengths, against the others'."""
    m = cfg.impressions.candidates

    def group(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        hist = request_history[mask]
        return {"requests": n, "impressions": n * m, "clicks": int(request_clicks[mask].sum()),
                "ctr": round(float(request_clicks[mask].sum()) / max(n * m, 1), 5),
                "history_at_request": {"median": float(np.median(hist)) if n else None,
                                       "p90": round(float(np.quantile(hist, 0.9)), 1) if n else None,
                                       "max": int(hist.max()) if n else None}}

    return {"share": cfg.activity.new_user_share, "users": users,
            "note": "new users join at a uniform time in the impression window (users.parquet: true_new_user)",
            "new": group(request_new), "established": group(~request_new)}


def _manifest(
    cfg: SynthConfig,
    world: World,
    preset: str | None,
    totals: dict[str, int],
    hists: dict[str, np.ndarray],
    vis: np.ndarray,
    prob_sum: float,
    max_history: int,
) -> dict[str, Any]:
    oracle = hist_auc(hists["full"])
    effects = {}
    for t in TERMS:
        without = hist_auc(hists[t])
        effects[t] = {"weight": getattr(cfg.click_model, t), "oracle_auc_without": round(without, 4),
                      "auc_drop": round(oracle - without, 4)}
    names = ["in_last_100", "only_older", "never_seen"]
    visibility = {}
    for lt, label in ((1, "long_term_candidates"), (0, "other_candidates")):
        n_by = vis[lt].sum(axis=1)
        visibility[label] = {
            names[v]: {"share": round(float(n_by[v] / max(n_by.sum(), 1)), 4),
                       "ctr": round(float(vis[lt, v, 1] / max(n_by[v], 1)), 4)}
            for v in range(3)
        }
    start = int(cfg.time.start.timestamp())
    span = cfg.time.history_days * DAY
    return {
        "kind": "recsys.synth",
        "recsys_version": __version__,
        "preset": preset,
        "seed": cfg.seed,
        "counts": totals,
        "max_history": max_history,
        "time": {"start": start, "end": start + span,
                 "impressions_from": start + span - cfg.time.impression_days * DAY},
        "ctr": round(totals["clicks"] / max(totals["impressions"], 1), 5),
        "mean_true_prob": round(prob_sum / max(totals["impressions"], 1), 5),
        "oracle_auc": round(oracle, 4),
        "click_model": {
            "formula": "P(click) = sigmoid(bias + long_term*affinity(u,cat) + short_term*[cat == focus(u,t)] "
                       "+ quality*q(i) + coaction*CO[segment(u), brand(i)] - position*log2(1 + pos))",
            "parameters": cfg.click_model.model_dump(),
            "terms": {
                "long_term": "affinity in [0, 1] of the user's stable long-term interest in the candidate's category (0 if none)",
                "short_term": "1 if the candidate's category is the focus of the user's current session",
                "quality": "latent item quality, N(0, 1) (items.parquet: true_quality)",
                "coaction": "segment x brand table, N(0,1) double-centred (zero row and column means), unit std",
                "position": "-log2(1 + position), position 0 is the top",
            },
            # A parameter of the function: rows are segments, columns brands by index;
            # brand_ids maps a column to the brand_id in items.parquet.
            "coaction_table": {
                "brand_ids": raw_ids(np.arange(cfg.num_brands), _ID_MULT["brand"]).tolist(),
                "values": np.round(world.coaction, 5).tolist(),
            },
        },
        "effects": effects,
        "visibility": visibility,
        "files_note": "true_* columns are the latent truth, for analysis only: never use them as features",
    }
