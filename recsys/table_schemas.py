"""The mapping of a team's own logs onto events (``recsys data build --source table:PATH --mapping FILE``).

:class:`TableMapping` says which column of the files is the user, the item, the category, the
behaviour and the time, how behaviour values map onto pv/cart/fav/buy, and, optionally, which
columns carry item attributes and user profiles, and where the impressions, items and users
tables are. It is loaded with :func:`recsys.config.load_config` like every other config;
features/table_source.py then checks the named columns against the files (a missing column is
refused with the nearest name).

Example:
    >>> m = TableMapping.model_validate({"events": {"user": "uid", "item": "sku",
    ...     "behavior": {"column": "action", "values": {"view": "pv", 3: "buy"}},
    ...     "timestamp": {"column": "ts", "unit": "milliseconds"}}})
    >>> m.events.behavior.values, m.events.category, m.events.timestamp.timezone
    ({'view': 'pv', '3': 'buy'}, None, 'UTC')
"""

from __future__ import annotations

import zoneinfo
from typing import Literal

from pydantic import Field, field_validator, model_validator

from recsys.config import Schema
from recsys.schemas import Behavior
from recsys.types import BEHAVIORS

TimeUnit = Literal["seconds", "milliseconds", "iso"]


class BehaviorMapping(Schema):
    """Either ``column`` with ``values`` (file value -> behaviour), or ``every_row``."""

    column: str | None = Field(None, description="the column holding the behaviour")
    values: dict[str | int, str] | None = Field(
        None, description="file value -> pv, cart, fav or buy; a value not listed is a rejected row")
    every_row: Behavior | None = Field(None, description="no behaviour column: every row is this behaviour")

    @field_validator("values")
    @classmethod
    def _text_keys(cls, values: dict[str | int, str] | None) -> dict[str, str] | None:
        # keys are compared with the column's values as text: `1: pv` in YAML matches 1 and "1"
        if values is None:
            return None
        if not values:
            raise ValueError("must map at least one value")
        for key, behavior in values.items():
            if behavior not in BEHAVIORS:
                raise ValueError(f"{str(key)[:100]!r} maps to {str(behavior)[:100]!r}, which is not one of "
                                 f"{', '.join(BEHAVIORS)}")
        return {str(k): v for k, v in values.items()}

    @model_validator(mode="after")
    def _one_way(self) -> BehaviorMapping:
        if self.every_row is not None and (self.column is not None or self.values is not None):
            raise ValueError("give either every_row or column with values, not both")
        if self.every_row is None and (self.column is None or self.values is None):
            raise ValueError("give column and values (file value -> pv/cart/fav/buy), or every_row: pv")
        return self


class TimestampMapping(Schema):
    column: str = Field(description="the column holding the time")
    unit: TimeUnit = Field("seconds", description="seconds or milliseconds since 1970 (integers), or iso: "
                           "ISO-8601 text (or a Parquet timestamp column)")
    timezone: str = Field("UTC", description="IANA zone of ISO times written without an offset "
                          "(and of naive Parquet timestamps)")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r} (an IANA name such as UTC or Europe/Berlin)") from None
        return name


class EventsMapping(Schema):
    """Columns of the behaviour log (the files ``--source table:PATH`` points at)."""

    user: str = Field(description="the user id column (integers or text)")
    item: str = Field(description="the item id column (integers or text)")
    category: str | None = Field(None, description="the item category column; none: one category for all")
    behavior: BehaviorMapping
    timestamp: TimestampMapping
    brand: str | None = Field(None, description="item attribute: an item's most frequent value "
                       "(an items table's value wins)")
    price_bucket: str | None = Field(None, description="item attribute: an item's most frequent value "
                              "(an items table's value wins)")
    segment: str | None = Field(None, description="user profile: a user's most frequent value (with age_bucket)")
    age_bucket: str | None = Field(None, description="user profile: a user's most frequent value (with segment)")

    @model_validator(mode="after")
    def _whole_profile(self) -> EventsMapping:
        if (self.segment is None) != (self.age_bucket is None):
            raise ValueError("a user profile needs both segment and age_bucket (or neither)")
        return self


class ImpressionsMapping(Schema):
    """An impressions table: what was shown to whom, when, and whether it was clicked."""

    path: str = Field(description="a Parquet or CSV file or a folder of them; relative paths start at the mapping file")
    user: str
    item: str
    timestamp: TimestampMapping
    clicked: str = Field(description="the click label column: 0/1 or true/false")
    request: str | None = Field(None, description="the request id column; none: one request per (user, timestamp)")
    position: str | None = Field(None, description="the display position column (non-negative integers); none: -1")


class ItemsMapping(Schema):
    """An items table: one row per item, its attributes. They win over the events' columns."""

    path: str = Field(description="a Parquet or CSV file or a folder of them; relative paths start at the mapping file")
    item: str = Field(description="the item id column (read like events.item)")
    category: str | None = Field(None, description="the item's category")
    brand: str | None = Field(None, description="the item's brand")
    price_bucket: str | None = Field(None, description="the item's price bucket")

    @model_validator(mode="after")
    def _some_attribute(self) -> ItemsMapping:
        if self.category is None and self.brand is None and self.price_bucket is None:
            raise ValueError("an items table needs at least one of category, brand, price_bucket")
        return self


class UsersMapping(Schema):
    """A users table: one row per user, its profile. It wins over the events' columns."""

    path: str = Field(description="a Parquet or CSV file or a folder of them; relative paths start at the mapping file")
    user: str = Field(description="the user id column (read like events.user)")
    segment: str = Field(description="the user's segment (a profile has both segment and age_bucket)")
    age_bucket: str = Field(description="the user's age bucket")


class TableMapping(Schema):
    """``--mapping``: how a team's own logs map onto events (and impressions, items and users)."""

    events: EventsMapping
    impressions: ImpressionsMapping | None = None
    items: ItemsMapping | None = None
    users: UsersMapping | None = None
    csv_separator: str = Field(",", min_length=1, max_length=1, description="the field separator of CSV files")
