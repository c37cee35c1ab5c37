"""A worker's config or data error ends the training run at once, never retried.

Ray Train 2.60's FailureConfig has no say in what is retried: its failure policy (DefaultFailurePolicy) restarts the
worker group after ANY worker error, up to run.max_failures times (forever with -1), and the policy a trainer uses
is not pluggable through the public API. A config error fails every try the same way: a 65-token dataset under
model.vocab_size=10 restarted the group 19 times in 150 s. What the public API offers is a UserCallback: the
controller calls `after_exception` with the workers' own exceptions when it polls them, before its failure policy
decides, and an error raised there ends that control-loop step. A `ControllerError` is what the policy never
retries (only a worker-group start that failed or timed out is); raised as it is, the controller logs no traceback
for it. fit() then raises it, and pipelines/ray_adapter/user_errors.py's `user_error_of` finds the worker's error inside.

    RunConfig(callbacks=[EndRunOnUserError(), ...])     # pipelines/ray_adapter/trainer.py, for every job and sweep trial
"""

from __future__ import annotations

from ray.train import ControllerError, UserCallback

from nanogpt.user_errors import USER_ERRORS


class EndRunOnUserError(UserCallback):
    """Ends the run on the first worker error that is a config or data error (USER_ERRORS), lowest rank first."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, USER_ERRORS):
                raise ControllerError(error)
