"""The options of the apps that take a flat Hydra config (convert, export, upcycle): what every one of them checks
before any work starts."""
from __future__ import annotations

from typing import Any, Iterable, Sequence


def check_options(app: str, opts: dict[str, Any], known: Iterable[str], required: Sequence[str], usage: str) -> None:
    """Unknown keys (a typo) and missing required ones are named, with the app's usage line."""
    known = sorted(known)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"unknown {app} option(s) {unknown}; known: {known}")
    for key in required:
        if not opts.get(key):
            raise ValueError(f"{key}=... is required: {usage}")
