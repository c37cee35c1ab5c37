"""Errors that mean "fix the config or the data": the entry points report them in one line with exit status 2,
and a run whose worker raises one ends at once instead of being retried (pipelines/end_on_user_error.py).

    except USER_ERRORS as e: log.error("%s", e); return 2
    user_error_of(training_failed_error)     # the config or data error a failed fit() ended on, else None
"""

from __future__ import annotations

from nanogpt.checkpoint_files import CheckpointError
from nanogpt.config import ConfigError
from nanogpt.corpus import CorpusError
from nanogpt.shards import ShardError
from nanogpt.tokenizers import TokenizerError

USER_ERRORS = (ConfigError, ShardError, CheckpointError, CorpusError, TokenizerError)


def user_error_of(error: BaseException) -> BaseException | None:
    """The config or data error that ended a run: Ray Train's ControllerError carries it as `controller_failure`
    when EndRunOnUserError stopped the run on it. None for any other failure."""
    failure = getattr(error, "controller_failure", None)
    return failure if isinstance(failure, USER_ERRORS) else None
