"""What every app checks before any work starts, and how a bad config ends it: one line naming the key, no traceback.

convert, export and upcycle take a flat Hydra config (check_options); train and evaluate take typed ones. A config
that cannot run, or a file it names that does not exist, is the user's to fix, so it is reported as one line and exit
status 2 (ConfigError, FileNotFoundError), while any other exception keeps its traceback: that one is ours.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

CONFIG_ERROR_EXIT = 2  # like argparse's usage errors


class ConfigError(ValueError):
    """A config that cannot run: a missing or unknown key, a value out of range. Its message says what to change."""


def check_options(app: str, opts: dict[str, Any], known: Iterable[str], required: Sequence[str], usage: str) -> None:
    """Unknown keys (a typo) and missing required ones are named, with the app's usage line."""
    known = sorted(known)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigError(f"unknown {app} option(s) {unknown}; known: {known}")
    for key in required:
        if not opts.get(key):
            raise ConfigError(f"{key}=... is required: {usage}")


def resolved(cfg: DictConfig, usage: str) -> dict[str, Any]:
    """The composed config as plain values; a required key left as ??? is a ConfigError with the usage line."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key}=... is required: {usage}") from None


def exits_on_config_error(app: str) -> Callable:
    """Wraps an app's Hydra main: a ConfigError or a missing file prints `app: message` and exits with status 2."""
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except (ConfigError, FileNotFoundError) as e:
                print(f"{app}: {e}", file=sys.stderr)
                raise SystemExit(CONFIG_ERROR_EXIT) from None
        return run
    return wrap
