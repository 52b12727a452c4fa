"""Menu and pricing: a checkout event's labels become receipt lines.

A menu file (YAML or JSON) maps detector labels to a display name and price,
optionally overridden per date (the event's date in the site's timezone):

    currency: EUR
    items:
      plate: {name: Main course, price: 6.50}
      bowl: {name: Soup, price: 2.80}
    dates:
      "2026-11-23": {items: {plate: {name: Fish of the day, price: 7.20}}}

A date's items replace or add to the base items for that day. A label missing
from the menu is never priced at 0: its line is ``unpriced``, excluded from the
total, and the event needs review. Money is computed in Decimal and rounded to
cents at the end.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .types import CheckoutEvent

_CENT = Decimal("0.01")


class MenuError(ValueError):
    """A menu file that cannot be used; the message names the file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MenuItem(_Strict):
    name: str = Field(min_length=1)
    price: Decimal = Field(ge=0, decimal_places=4)


class DayMenu(_Strict):
    items: dict[str, MenuItem] = {}


class MenuFile(_Strict):
    currency: str = Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR")
    items: dict[str, MenuItem] = {}
    dates: dict[dt.date, DayMenu] = {}


@dataclass(frozen=True, slots=True)
class ReceiptLine:
    label: str
    name: str | None  # None when unpriced
    count: int
    unit_price: Decimal | None
    line_total: Decimal | None


@dataclass(frozen=True, slots=True)
class PricedReceipt:
    currency: str
    lines: tuple[ReceiptLine, ...]
    total: Decimal  # priced lines only
    unpriced: tuple[str, ...]  # labels not on the menu (flagged, not in the total)


class Menu:
    """Prices checkout events. ``timezone`` (IANA name, None = local) decides
    which date's menu applies to an event."""

    def __init__(self, data: MenuFile, timezone: str | None = None, source: str = "<menu>") -> None:
        self.data = data
        self.source = source
        try:
            self.tz = ZoneInfo(timezone) if timezone else None
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise MenuError(f"{source}: unknown timezone {timezone!r}") from e

    @classmethod
    def load(cls, path: str | Path, timezone: str | None = None) -> "Menu":
        """Read a YAML/JSON menu; MenuError names the file and the bad field."""
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError as e:
            raise MenuError(f"{p}: no such menu file") from e
        except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, a binary file
            raise MenuError(f"{p}: cannot read the menu ({getattr(e, 'strerror', None) or e})") from e
        if not text.strip():
            raise MenuError(f"{p}: the menu file is empty")
        try:
            raw = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise MenuError(f"{p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}") from e
        if not isinstance(raw, dict):
            raise MenuError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
        try:
            data = MenuFile.model_validate(raw)
        except ValidationError as e:
            parts = [f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()]
            raise MenuError(f"{p}: invalid menu: " + "; ".join(parts)) from e
        return cls(data, timezone, str(p))

    def labels(self) -> set[str]:
        """Every label the menu prices on some day."""
        return set(self.data.items).union(*(d.items for d in self.data.dates.values()))

    def label_problems(self, detector_labels: Sequence[str]) -> tuple[list[str], list[str]]:
        """(warnings, notes) on what would leave dishes unpriced. Warnings: a menu label that differs
        from a detector label only by case or spaces (a typo: that dish is never priced) and, for a
        dish model's short list (<= 30 labels), its dishes no day of the menu prices. Notes: other
        menu labels the detector does not have (a dish on the menu before it is enrolled is normal)."""
        known, mine = set(detector_labels), self.labels()
        folded = {x.casefold().strip(): x for x in known}
        warnings, notes = [], []
        for lab in sorted(mine - known):
            near = folded.get(lab.casefold().strip())
            if near is not None:
                warnings.append(f"{self.source}: menu label {lab!r} is not a detector label, the detector says "
                                f"{near!r} (labels are case-sensitive): {near!r} items are never priced")
            else:
                notes.append(f"{self.source}: menu label {lab!r} is not (yet) a detector label")
        if len(known) <= 30 and (missing := sorted(known - mine)):
            warnings.append(f"{self.source}: no price for the detector's {', '.join(map(repr, missing))}: such "
                            "items are unpriced and their receipts need review")
        return warnings, notes

    def items_on(self, day: dt.date) -> dict[str, MenuItem]:
        items = dict(self.data.items)
        if day in self.data.dates:
            items.update(self.data.dates[day].items)
        return items

    def date_of(self, timestamp: float) -> dt.date:
        return dt.datetime.fromtimestamp(timestamp, self.tz).date()

    def price(self, event: CheckoutEvent) -> PricedReceipt:
        items = self.items_on(self.date_of(event.ended_at))
        lines, unpriced, total = [], [], Decimal(0)
        for it in event.items:
            m = items.get(it.label)
            if m is None:
                unpriced.append(it.label)
                lines.append(ReceiptLine(it.label, None, it.count, None, None))
                continue
            line_total = (m.price * it.count).quantize(_CENT, ROUND_HALF_UP)
            total += line_total
            lines.append(ReceiptLine(it.label, m.name, it.count, m.price, line_total))
        return PricedReceipt(self.data.currency, tuple(lines), total.quantize(_CENT, ROUND_HALF_UP), tuple(unpriced))

    def apply(self, event: CheckoutEvent) -> CheckoutEvent:
        """The event with names, prices and total filled in; unpriced items
        are flagged and make the event need review."""
        r = self.price(event)
        items = tuple(
            dataclasses.replace(it, name=ln.name, unpriced=ln.unit_price is None,
                                unit_price=None if ln.unit_price is None else float(ln.unit_price),
                                line_total=None if ln.line_total is None else float(ln.line_total))
            for it, ln in zip(event.items, r.lines)
        )
        return dataclasses.replace(event, items=items, currency=r.currency, total=float(r.total),
                                   needs_review=event.needs_review or bool(r.unpriced))
