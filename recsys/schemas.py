"""Config schemas: the synthetic world (:class:`SynthConfig`) and data building (:class:`BuildConfig`).

Values live in YAML under ``configs/``; the defaults here are the ``small`` world and the default
build. Each field's description is the documentation of the knob.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from recsys.config import Schema
from recsys.types import BEHAVIORS

Behavior = Literal["pv", "cart", "fav", "buy"]
if Behavior.__args__ != BEHAVIORS:  # the Literal and the stored codes must agree
    raise RuntimeError(f"Behavior literal {Behavior.__args__} != BEHAVIORS {BEHAVIORS}")


def _as_utc(value: dt.datetime) -> dt.datetime:
    """Naive date-times are UTC; aware ones keep their offset (the instant is what matters)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


Instant = Annotated[dt.datetime, AfterValidator(_as_utc)]


def _utc(year: int, month: int, day: int, hours_east: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, tzinfo=dt.timezone(dt.timedelta(hours=hours_east)))


# --------------------------------------------------------------------------------------------
# The synthetic world


class TimeConfig(Schema):
    start: Instant = Field(_utc(2026, 1, 1), description="first instant of the event log (naive = UTC)")
    history_days: int = Field(196, ge=1, description="days the event log spans")
    impression_days: int = Field(14, ge=1, description="the last days of the span, which also carry impressions")

    @model_validator(mode="after")
    def _window_inside_span(self) -> TimeConfig:
        if self.impression_days >= self.history_days:
            raise ValueError(
                f"impression_days ({self.impression_days}) must be < history_days ({self.history_days})"
            )
        return self


class ActivityConfig(Schema):
    median_events: float = Field(300.0, gt=0, description="median lifelong events per user (log-normal)")
    sigma: float = Field(1.1, ge=0, description="log-normal sigma of events per user")
    min_events: int = Field(20, ge=1)
    max_events: int = Field(8000, ge=1, description="histories are clipped to this length")
    mean_session_events: float = Field(25.0, ge=1, description="mean events per session (geometric)")
    mean_event_gap_seconds: float = Field(45.0, gt=0, description="mean gap between events in a session")
    heavy_share: float = Field(0.0, ge=0, le=1, description="share of power users with log-uniform counts in [max_events/10, max_events]")
    new_user_share: float = Field(
        0.05, ge=0, lt=1, description="share of new users: each joins at a uniform time in the impression window, "
        "and its event count is scaled to the part of the span it is active (at least 1, min_events does not "
        "apply), so its requests have short histories; 0 draws nothing (the world of a config without new users)",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ActivityConfig:
        if self.min_events > self.max_events:
            raise ValueError(f"min_events ({self.min_events}) must be <= max_events ({self.max_events})")
        return self


class InterestConfig(Schema):
    min_long_term: int = Field(2, ge=1, description="fewest stable long-term categories per user")
    max_long_term: int = Field(4, ge=1, description="most stable long-term categories per user")
    long_term_session_share: float = Field(0.15, ge=0, le=1, description="share of sessions about a long-term category")
    drift_change_prob: float = Field(0.35, gt=0, le=1, description="chance the short-term interest moves at a new session")
    focus_share: float = Field(0.85, ge=0, le=1, description="share of a session's events in its focus category")
    segment_concentration: float = Field(0.3, gt=0, description="Dirichlet concentration of segment category tastes (lower = more distinct)")

    @model_validator(mode="after")
    def _bounds(self) -> InterestConfig:
        if self.min_long_term > self.max_long_term:
            raise ValueError(
                f"min_long_term ({self.min_long_term}) must be <= max_long_term ({self.max_long_term})"
            )
        return self


class ItemConfig(Schema):
    popularity_exponent: float = Field(1.0, ge=0, description="Zipf exponent of item popularity within a category")
    category_exponent: float = Field(0.8, ge=0, description="Zipf exponent of category popularity")
    brand_exponent: float = Field(0.8, ge=0, description="Zipf exponent of brand frequency")
    new_item_share: float = Field(0.2, ge=0, lt=1, description="share of items that arrive during the span")
    quality_popularity_corr: float = Field(0.3, ge=-1, le=1, description="correlation of latent quality with popularity rank")


class BehaviorConfig(Schema):
    cart: float = Field(0.055, ge=0, le=1, description="base share of cart events (rest: pv)")
    fav: float = Field(0.03, ge=0, le=1)
    buy: float = Field(0.02, ge=0, le=1)
    quality_effect: float = Field(0.4, description="log-odds multiplier of quality on cart/fav/buy")

    @model_validator(mode="after")
    def _room_for_pv(self) -> BehaviorConfig:
        total = self.cart + self.fav + self.buy
        if total >= 0.5:
            raise ValueError(f"cart + fav + buy ({total:.3f}) must be < 0.5; pv is the common behaviour")
        return self


class CandidateMix(Schema):
    """Where a request's candidates come from (shares sum to 1)."""

    focus: float = Field(0.25, ge=0, le=1, description="the user's current short-term category")
    long_term: float = Field(0.25, ge=0, le=1, description="one of the user's long-term categories")
    segment: float = Field(0.15, ge=0, le=1, description="a category popular with the user's segment")
    popular: float = Field(0.25, ge=0, le=1, description="any popular item")
    new: float = Field(0.10, ge=0, le=1, description="an item that arrived in the last new_item_days")

    @model_validator(mode="after")
    def _sums_to_one(self) -> CandidateMix:
        total = self.focus + self.long_term + self.segment + self.popular + self.new
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"the shares must sum to 1, they sum to {total:.4f}")
        return self


class ImpressionConfig(Schema):
    candidates: int = Field(20, ge=1, description="M, candidates shown per request")
    request_rate: float = Field(0.15, gt=0, le=1, description="chance an event in the impression window is followed by a request")
    max_requests_per_user: int = Field(40, ge=1)
    new_item_days: int = Field(14, ge=1, description="an item is 'new' this many days after it arrives")
    mix: CandidateMix = Field(default_factory=CandidateMix)


class ClickModelConfig(Schema):
    """logit = bias + Σ weight·term; see features/synth.py and docs/DATA.md for each term."""

    bias: float = -4.1
    long_term: float = Field(2.0, description="× long-term affinity of the user for the candidate's category, in [0, 1]")
    short_term: float = Field(1.0, description="× [candidate's category is the current session's focus]")
    quality: float = Field(0.5, description="× latent item quality ~ N(0, 1)")
    coaction: float = Field(0.6, description="× segment × brand table, double-centred, unit variance")
    position: float = Field(0.3, ge=0, description="− this × log2(1 + position)")


class SynthConfig(Schema):
    """A synthetic lifelong-behaviour world with known click probabilities (features/synth.py)."""

    seed: int = Field(0, ge=0)
    num_users: int = Field(2000, ge=1)
    num_items: int = Field(20000, ge=1)
    num_categories: int = Field(200, ge=2)
    num_brands: int = Field(60, ge=2)
    num_segments: int = Field(8, ge=2)
    num_age_buckets: int = Field(7, ge=1)
    num_price_buckets: int = Field(10, ge=1)
    shard_users: int = Field(4096, ge=1, description="users generated per shard; bounds memory, part of the output's identity")
    time: TimeConfig = Field(default_factory=TimeConfig)
    activity: ActivityConfig = Field(default_factory=ActivityConfig)
    interests: InterestConfig = Field(default_factory=InterestConfig)
    items: ItemConfig = Field(default_factory=ItemConfig)
    behaviors: BehaviorConfig = Field(default_factory=BehaviorConfig)
    impressions: ImpressionConfig = Field(default_factory=ImpressionConfig)
    click_model: ClickModelConfig = Field(default_factory=ClickModelConfig)

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.interests.max_long_term > self.num_categories:
            raise ValueError(
                f"interests.max_long_term ({self.interests.max_long_term}) must be <= num_categories ({self.num_categories})"
            )
        if self.num_items < self.num_categories:
            raise ValueError(f"num_items ({self.num_items}) must be >= num_categories ({self.num_categories})")
        busy = self.activity.max_events * self.activity.mean_event_gap_seconds
        if 2 * busy > self.time.history_days * 86400:
            raise ValueError(
                f"activity.max_events × mean_event_gap_seconds ({busy:.0f} s) must fit twice into "
                f"time.history_days ({self.time.history_days} days): the heaviest user would have no idle time"
            )
        if self.impressions.candidates > self.num_items:
            raise ValueError(
                f"impressions.candidates ({self.impressions.candidates}) must be <= num_items ({self.num_items})"
            )
        return self


# --------------------------------------------------------------------------------------------
# Building training data


class MinCountConfig(Schema):
    """Ids seen fewer times than this in the events map to the out-of-vocabulary row 0."""

    item_id: int = Field(1, ge=1)
    category_id: int = Field(1, ge=1)
    brand_id: int = Field(1, ge=1)


class VocabConfig(Schema):
    min_count: MinCountConfig = Field(default_factory=MinCountConfig)
    fit_on: Literal["train", "all"] = Field(
        "train", description="train: the item, category and brand vocabularies and their min_count are fit on the "
        "training span only (before the valid split), so an id first seen later maps to the out-of-vocabulary "
        "row, as it would for a model trained on the past; all: on the whole source, valid and test included "
        "(the behaviour before issue 19, a leak of future frequency when a min_count is above 1)",
    )


class SplitConfig(Schema):
    """Requests are split by time: the latest ``test_fraction`` is test, the slice before it valid."""

    valid_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _room_for_train(self) -> SplitConfig:
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"valid_fraction + test_fraction ({self.valid_fraction + self.test_fraction:.3f}) must be < 1"
            )
        return self


class SamplingConfig(Schema):
    """Requests for sources without impressions (Taobao): a positive behaviour and sampled negatives."""

    positive_behaviors: list[Behavior] = Field(default_factory=lambda: list(BEHAVIORS), min_length=1)
    negatives: int = Field(4, ge=1, description="sampled negatives per positive")
    strategy: Literal["uniform", "same_category"] = Field("uniform", description="uniform over items, or within the positive's category")
    min_history: int = Field(1, ge=0, description="skip positives with fewer earlier events")
    max_per_user: int | None = Field(None, ge=1, description="keep at most this many (latest) positives per user")
    seed: int = Field(0, ge=0)


class TaobaoConfig(Schema):
    """Taobao UserBehavior CSV: rows outside [min_timestamp, max_timestamp) are rejected."""

    min_timestamp: Instant = Field(_utc(2017, 11, 25, hours_east=8))
    max_timestamp: Instant = Field(_utc(2017, 12, 4, hours_east=8))

    @model_validator(mode="after")
    def _ordered(self) -> TaobaoConfig:
        if self.min_timestamp >= self.max_timestamp:
            raise ValueError(
                f"min_timestamp ({self.min_timestamp.isoformat()}) must be before max_timestamp ({self.max_timestamp.isoformat()})"
            )
        return self


class RecBoleConfig(Schema):
    """RecBole atomic files (``--source recbole:DIR``, features/recbole.py): which columns mean what.
    The defaults fit RecBole's MovieLens files."""

    user_field: str = Field("user_id", min_length=1, description="the user id column of NAME.inter (and NAME.user)")
    item_field: str = Field("item_id", min_length=1, description="the item id column of NAME.inter (and NAME.item)")
    time_field: str = Field("timestamp", min_length=1, description="the time of an interaction in seconds (NAME.inter)")
    rating_field: str | None = Field("rating", description="a rating column of NAME.inter; without it (or null) every interaction is a pv")
    rating_threshold: float = Field(4.0, description="a rating at or above this is at_or_above, one below it below")
    at_or_above: Behavior = Field("buy", description="the behaviour of a rating at or above rating_threshold")
    below: Behavior | Literal["drop"] = Field("pv", description="the behaviour of a rating below it, or drop to leave those out")
    category_field: str | None = Field(None, description="a token or token_seq column of NAME.inter or NAME.item; "
                                       "null: the first of category, categories, category_id, cate_id, genre, genres, class")
    category_rule: Literal["first", "last", "whole"] = Field("first", description="of a token_seq: the first token, the last, or the whole sequence as one category")
    brand_field: str | None = Field(None, description="a token column of NAME.item: the item's brand")
    price_field: str | None = Field(None, description="a float column of NAME.item: its decile among the items is price_bucket")
    segment_field: str | None = Field(None, description="a token column of NAME.user: the segment profile feature")
    age_field: str | None = Field(None, description="a token column of NAME.user: the age_bucket profile feature")


class BuildConfig(Schema):
    """``recsys data build``: vocabularies, history store, requests and splits (features/build.py)."""

    vocab: VocabConfig = Field(default_factory=VocabConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    taobao: TaobaoConfig = Field(default_factory=TaobaoConfig)
    recbole: RecBoleConfig = Field(default_factory=RecBoleConfig)
