"""The lean wing: Ray's private internals that make a one-worker job on a small machine start and step sooner
(bench/NOTES.md has the figures). Every module here reaches into one Ray release, so the wing is used only under
that release: `usable()` is the guard, and nothing outside this package imports Ray's private modules.

    from pipelines.ray_adapter import lean
    if lean.usable():                            # False (and one log line) under another Ray version
        from pipelines.ray_adapter.lean.trainer import lean_trainer

Whether a job asks for it at all is run.lean (pipelines/ray_adapter/lean_switch.py); this module imports no private
Ray module itself, so the guard never fails at import.
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys

log = logging.getLogger(__name__)

WRITTEN_FOR = "2.60.0"  # the Ray release whose internals the wing's modules were written against
_said_no = False


def usable() -> bool:
    """True under the Ray release the wing was written for; otherwise False, said once in one log line."""
    global _said_no
    found = ray_version()
    if found == WRITTEN_FOR:
        return True
    if not _said_no:
        log.warning("lean path off: written for Ray %s, found %s; using Ray's public API", WRITTEN_FOR, found)
        _said_no = True
    return False


def ray_version() -> str:
    """The Ray release this process runs, without importing ray where it is not yet (its import reads settings
    that pipelines/ray_adapter/session.py sets first)."""
    if "ray" in sys.modules:
        return sys.modules["ray"].__version__
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return "an unknown version"
