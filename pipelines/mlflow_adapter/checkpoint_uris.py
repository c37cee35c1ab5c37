"""Any checkpoint address as a local directory, for the commands that read checkpoints (sample, evaluate, the
end of pretrain):

    with local_checkpoint_dir("models:/nanogpt/3", tracking_uri="http://127.0.0.1:5000") as ckpt_dir: ...

- a local path: itself;
- an MLflow `models:/<name>/<version>` (or `@alias`, `/latest`) or `runs:/<run id>/checkpoints/best` URI: downloaded
  from the tracking store (`tracking_uri`, else MLFLOW_TRACKING_URI, else pretrain's default local store);
- an object-store URI (s3://, gs://): the node's shared copy (nanogpt/checkpoint/node_copy.py: one download for the
  ranks of a node that read it at once).
Downloads live until the block ends.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.checkpoint.node_copy import node_copy
from nanogpt.data.storage import is_uri

MLFLOW_SCHEMES = ("models:/", "runs:/")


@contextlib.contextmanager
def local_checkpoint_dir(path: str, tracking_uri: str | None = None) -> Iterator[str]:
    if path.startswith(MLFLOW_SCHEMES):
        from pipelines.mlflow_adapter.tracker import resolve_checkpoint_uri, tracking_uri_for

        with tempfile.TemporaryDirectory(prefix="nanogpt-ckpt-") as tmp:
            try:
                local = resolve_checkpoint_uri(path, tmp, tracking_uri=tracking_uri_for(tracking_uri))
            except FileNotFoundError as e:
                raise CheckpointError(str(e)) from None
            yield local
        return
    if not is_uri(path):
        yield path
        return
    with node_copy(path) as d:
        yield d
