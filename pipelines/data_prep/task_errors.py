"""The config or data error (nanogpt/user_errors.py) that a Ray task of pipelines/prepare.py raised, as itself: Ray
wraps it in a RayTaskError whose message repeats the task's traceback, while the error's own message already names
the file and line, which is all the user should see.

    try:
        ray.get(refs)
    except Exception as e:
        reraise_user_error(e)     # raises the CorpusError (ShardError, ...) inside e, if there is one
        raise
"""

from __future__ import annotations

from nanogpt.user_errors import USER_ERRORS


def reraise_user_error(e: BaseException) -> None:
    """Raise the user error that `e` carries, without Ray's wrapping; return when there is none, for the caller to
    raise `e` again."""
    user = user_error_in(e)
    if user is not e:
        raise user from None


def user_error_in(e: BaseException) -> BaseException:
    """The user error in `e`, its causes or its context (searched in that order); `e` itself when there is none."""
    seen = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, USER_ERRORS):
            # A RayTaskError subclasses its cause's type; its .cause is the original exception with a clean message.
            cause = getattr(err, "cause", None)
            return cause if isinstance(cause, USER_ERRORS) else err
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
    return e
