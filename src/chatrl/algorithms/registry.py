"""Name -> function tables (veRL style): configs name an estimator/loss by string, code looks it up here.

Each algorithm module owns its table (KL_ESTIMATORS, ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, ...); `lookup`
gives one error message format for a wrong name. It raises ValueError (this package knows nothing of
config files); the config layer should validate names against `table.keys()` and raise a ChatrlError
that names the config field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

F = TypeVar("F")


def lookup(table: Mapping[str, F], name: str, what: str) -> F:
    """table[name], or ValueError("unknown <what> 'name'; choose one of: a, b, c")."""
    try:
        return table[name]
    except KeyError:
        choices = ", ".join(sorted(table))
        raise ValueError(f"unknown {what} {name!r}; choose one of: {choices}") from None
