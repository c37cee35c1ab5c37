"""pipelines/sample.py on inputs that used to end in a raw traceback: one line naming the file, exit 2, and no
side effect (no code run from a pickle, no MLflow store created by a read)."""

from __future__ import annotations

import json
import pickle

import torch

from pipelines import sample
from tests.test_checkpoint import save, trained_model


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, caplog):
    model, optimizer = trained_model(1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, :3] = float("nan")
    path = save(tmp_path / "checkpoint_000007", model, optimizer)
    assert sample.main(["--checkpoint", str(path), "--max_new_tokens", "5"]) == 2
    assert "3 of its weights are NaN or inf" in caplog.text and str(path) in caplog.text


class _RunsCode:
    """A pickle whose loading would create `marker` (as a hostile pytorch_model.bin would run anything)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_hf_checkpoint_is_refused_without_running_it(tmp_path, caplog):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                                                     "n_positions": 16, "vocab_size": 50257}))
    marker = tmp_path / "pwned"
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode(str(marker))}))
    assert sample.main(["--init_from", str(hf_dir), "--max_new_tokens", "5"]) == 2
    assert "pytorch_model.bin: refused to load" in caplog.text
    assert not marker.exists()


def test_a_mistyped_sqlite_store_is_an_error_and_is_not_created(tmp_path, caplog):
    db = tmp_path / "typo" / "mlflow.db"
    argv = ["--checkpoint", "models:/nanogpt/1", "--tracking-uri", f"sqlite:///{db}", "--max_new_tokens", "5"]
    assert sample.main(argv) == 2
    assert "there is no MLflow store at" in caplog.text
    assert not db.exists() and not db.parent.exists()
