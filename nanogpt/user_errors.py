"""The errors that mean "fix the config or the data", wherever they are raised: on the driver before anything starts,
or in a training worker (a shard object damaged in the store, found as the node downloads it). A command reports
one in a single line naming the file, key or value, with exit status 2; never as a crash with a traceback.

    except USER_ERRORS as e:      # pipelines/pretrain.py, pipelines/tune.py
        log.error("%s", e)
        return 2

A worker's user error ends its run at once, never retried (pipelines/ray_adapter/end_on_user_error.py), and reaches the driver
inside Ray Train's error: pipelines/pretrain.py raises it again as itself (pipelines/ray_adapter/user_errors.py).
"""

from __future__ import annotations

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.config import ConfigError
from nanogpt.data.corpus import CorpusError
from nanogpt.data.shards import ShardError
from nanogpt.tokenizers import TokenizerError

USER_ERRORS = (ConfigError, ShardError, CheckpointError, CorpusError, TokenizerError)
