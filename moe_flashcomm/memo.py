"""One idiom in one place: things made once per key (a call's shape, a configuration) and kept
in a table their owner holds, emptied when it grows past a bound, so a program that keeps
making new keys does not grow memory without end."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")
_MISSING = object()


def remember(table: dict, key, make: Callable[[], T], limit: int) -> T:
    """``table[key]``, made by ``make()`` the first time (``table`` emptied first when it holds
    more than ``limit`` entries)."""
    hit = table.get(key, _MISSING)
    if hit is _MISSING:  # (not None: a thing made as None is kept too)
        hit = keep(table, key, make(), limit)
    return hit


def keep(table: dict, key, value: T, limit: int) -> T:
    """``table[key] = value``, ``table`` emptied first when it holds more than ``limit``
    entries (for owners that make the value themselves: ``remember``'s store)."""
    if len(table) > limit:
        table.clear()
    table[key] = value
    return value
