"""Errors every component raises for bad input or an unavailable dependency.

The CLI turns any `LightspanError` into a one-line message and exit code 2; everything else is a
bug and keeps its traceback. Subclasses tell callers what kind of failure it was (a collector
answers UNAVAILABLE for `StoreUnavailable`, INVALID_ARGUMENT for `InvalidInput`).
"""

from __future__ import annotations


class LightspanError(Exception):
    """A failure with a message meant for the user, not a traceback."""


class InvalidInput(LightspanError):
    """The caller sent something malformed: a bad URL, bad SQL, bad OTLP, a bad config."""


class NotFound(LightspanError):
    """A named thing (rollout, resource, run) does not exist."""


class StoreUnavailable(LightspanError):
    """The store cannot be reached right now; retrying later may succeed."""


class StoreLocked(StoreUnavailable):
    """Another process owns the embedded store's data directory."""
