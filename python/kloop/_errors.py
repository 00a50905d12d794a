"""Turning libkloop's negative errno results into Python exceptions."""

import os

__all__ = ("make_error", "check")


def make_error(rc):
    """Return the OSError for a negative errno ``rc``.

    ``OSError(errno, strerror)`` already picks the subclass the errno maps
    to (ConnectionResetError for ECONNRESET, BrokenPipeError for EPIPE, ...),
    so the exception is the one a failing socket call in CPython raises.
    """
    return OSError(-rc, os.strerror(-rc))


def check(rc):
    """Return ``rc`` when it is >= 0, else raise the matching OSError."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc
