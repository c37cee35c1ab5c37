"""pipelines/sample.py on inputs that used to end in a raw traceback or worse: one line naming the file, exit 2, and
no side effect (no code run from a pickle, no MLflow store created by a read)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import warnings

import pytest
import torch

from nanogpt.checkpoint import export_nanogpt_ckpt
from nanogpt.checkpoint_files import CheckpointError
from pipelines import sample
from tests.test_checkpoint import RunsCode, restamp, save, save_sharded, trained_model


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, caplog):
    model, optimizer = trained_model(1)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, :3] = float("nan")
    path = save(tmp_path / "checkpoint_000007", model, optimizer)
    assert sample.main(["--checkpoint", str(path), "--max_new_tokens", "5"]) == 2
    assert "3 of its weights are NaN or inf" in caplog.text and str(path) in caplog.text


def test_a_pickled_hf_checkpoint_is_refused_without_running_it(tmp_path, caplog):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8,
                                                     "n_positions": 16, "vocab_size": 50257}))
    marker = tmp_path / "pwned"
    (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": RunsCode(str(marker))}))
    assert sample.main(["--init_from", str(hf_dir), "--max_new_tokens", "5"]) == 2
    assert "pytorch_model.bin: refused to load" in caplog.text
    assert not marker.exists()


def test_a_mistyped_sqlite_store_is_an_error_and_is_not_created(tmp_path, caplog):
    db = tmp_path / "typo" / "mlflow.db"
    argv = ["--checkpoint", "models:/nanogpt/1", "--tracking-uri", f"sqlite:///{db}", "--max_new_tokens", "5"]
    assert sample.main(argv) == 2
    assert "there is no MLflow store at" in caplog.text
    assert not db.exists() and not db.parent.exists()


def _error_line(caplog) -> str:
    """The one error the command logged, which must be one line."""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_a_genuine_sharded_checkpoint_samples(tmp_path, capsys):
    model, optimizer = trained_model(1)
    path = save_sharded(tmp_path / "checkpoint_000007", model, optimizer)
    assert sample.main(["--checkpoint", str(path), "--start", "ab", "--max_new_tokens", "5", "--num_samples", "1"]) == 0
    text = capsys.readouterr().out.split(sample.SEPARATOR)[0].strip()
    assert text.startswith("ab") and len(text) == 7


def test_a_crafted_dcp_metadata_is_refused_without_running_it(tmp_path, caplog):
    """FSDP's model/.metadata is a pickle: one that would create `marker` when unpickled (or run anything else) is
    refused, and says which file."""
    model, optimizer = trained_model(1)
    path = save_sharded(tmp_path / "checkpoint_000007", model, optimizer)
    marker = tmp_path / "pwned"
    (path / "model" / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    restamp(path)
    assert sample.main(["--checkpoint", str(path), "--max_new_tokens", "5"]) == 2
    assert not marker.exists()
    assert re.fullmatch(rf"{path}/model/\.metadata: refused, not plain DCP metadata \(UnpicklingError: it names "
                        r"[\w.]*open, which is not allowed\)", _error_line(caplog))


def test_a_crafted_dcp_metadata_from_an_mlflow_store_is_refused(tmp_path, caplog):
    """The same file planted in a run's artifacts, read through runs:/ from the MLflow store."""
    from mlflow.tracking import MlflowClient

    model, optimizer = trained_model(1)
    path = save_sharded(tmp_path / "checkpoint_000007", model, optimizer)
    marker = tmp_path / "pwned"
    (path / "model" / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    restamp(path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("planted", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(path), "checkpoints/best")
    argv = ["--checkpoint", f"runs:/{run_id}/checkpoints/best", "--tracking-uri", uri, "--max_new_tokens", "5"]
    assert sample.main(argv) == 2
    assert not marker.exists()
    assert "model/.metadata: refused, not plain DCP metadata" in _error_line(caplog)


def test_a_crafted_dcp_item_is_refused_without_running_it(tmp_path):
    """A non-tensor item of optimizer/ (where param_groups live) that would run code: the exports read it whole."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = trained_model(1)
    path = save_sharded(tmp_path / "checkpoint_000007", model, optimizer)
    marker = tmp_path / "pwned"
    shutil.rmtree(path / "optimizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"param_groups": [{"lr": RunsCode(str(marker))}]}, checkpoint_id=path / "optimizer", no_dist=True)
    restamp(path)
    with pytest.raises(CheckpointError, match=r"optimizer: item param_groups.0.lr: refused \(UnpicklingError: it "
                                              r"names [\w.]*open, which is not allowed\)$"):
        export_nanogpt_ckpt(path, tmp_path / "ckpt.pt")
    assert not marker.exists() and not (tmp_path / "ckpt.pt").exists()
