"""Which config or data error (nanogpt/user_errors.py) ended a failed fit(): the driver reports it in one line
with exit status 2, as it would have before Ray started.

    user_error_of(training_failed_error)     # the config or data error a failed fit() ended on, else None
"""

from __future__ import annotations

from nanogpt.user_errors import USER_ERRORS


def user_error_of(error: BaseException) -> BaseException | None:
    """The config or data error that ended a run: Ray Train's ControllerError carries it as `controller_failure`
    when EndRunOnUserError (pipelines/ray_adapter/end_on_user_error.py) stopped the run on it. None for any other failure."""
    failure = getattr(error, "controller_failure", None)
    return failure if isinstance(failure, USER_ERRORS) else None
