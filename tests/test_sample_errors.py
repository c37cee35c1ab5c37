"""pipelines/sample.py on inputs that used to end in a raw traceback or worse: one line naming the file, exit 2, and
no side effect (no code run from a pickle, no MLflow store created by a read, nothing large allocated)."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.checkpoint.nanogpt_ckpt import export_nanogpt_ckpt
from pipelines import sample
from tests.test_checkpoint import RunsCode, restamp, save, save_sharded, trained_model

REPO = Path(__file__).resolve().parents[1]


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


def test_a_symlink_out_of_a_checkpoint_is_refused_and_no_file_is_quoted(tmp_path, caplog):
    model, optimizer = trained_model(1)
    path = save(tmp_path / "checkpoint_000007", model, optimizer)
    secret = tmp_path / "secret.yaml"  # any file of the machine the reader may open, ~/.ssh/id_rsa say
    secret.write_text("model: {n_layer: SECRET-VALUE}\n")
    (path / "config.yaml").unlink()
    (path / "config.yaml").symlink_to(secret)
    restamp(path)
    assert sample.main(["--checkpoint", str(path), "--max_new_tokens", "5"]) == 2
    assert _error_line(caplog) == f"{path / 'config.yaml'}: a symlink out of the checkpoint directory: refused"
    caplog.clear()
    (path / "config.yaml").unlink()
    (path / "config.yaml").write_text("model: [SECRET-VALUE\n")  # the checkpoint's own file, damaged
    restamp(path)
    assert sample.main(["--checkpoint", str(path), "--max_new_tokens", "5"]) == 2
    assert _error_line(caplog) == f"{path / 'config.yaml'}: unreadable (ParserError at line 2, column 1)"
    assert "SECRET" not in caplog.text


GIGANTIC = [1_085_937_500, 32]  # float32: 139 GB
HOSTILE_RUNS = """
import json, logging, resource, sys
from pipelines import sample

errors = []
handler = logging.Handler(logging.ERROR)
handler.emit = lambda record: errors.append(record.getMessage())
logging.getLogger().addHandler(handler)
vm_size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
limit = vm_size + (1 << 30)  # any tensor of more than a GiB fails to allocate instead of taking the machine
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    errors.clear()
    try:
        rc = sample.main(argv)
    except BaseException as e:
        rc = f"raised {type(e).__name__}"
    results[name] = {"rc": rc, "errors": list(errors)}
results["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(results))
"""


def _model_args_of_a_giant(tmp_path, model, optimizer) -> list[str]:
    path = save(tmp_path / "args" / "checkpoint_000007", model, optimizer)
    args = json.loads((path / "state.json").read_text())["model_args"]
    restamp(path, model_args={**args, "n_embd": 16384, "n_head": 16})  # as many blocks, each 25 GB
    return ["--checkpoint", str(path)]


def _safetensors_header_of_a_giant(tmp_path, model, optimizer) -> list[str]:
    path = save(tmp_path / "header" / "checkpoint_000007", model, optimizer)
    data = (path / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    start = header["transformer.wte.weight"]["data_offsets"][0]
    header["transformer.wte.weight"] = {"dtype": "F32", "shape": GIGANTIC, "data_offsets": [start, start + 139 * 10**9]}
    text = json.dumps(header).encode()
    (path / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
    restamp(path)
    return ["--checkpoint", str(path)]


def _dcp_metadata_of_a_giant(tmp_path, model, optimizer) -> list[str]:
    path = save_sharded(tmp_path / "dcp" / "checkpoint_000007", model, optimizer)
    metadata = pickle.loads((path / "model" / ".metadata").read_bytes())  # written by this test: trusted
    wte = metadata.state_dict_metadata["transformer.wte.weight"]
    wte.size = wte.chunks[0].sizes = torch.Size(GIGANTIC)
    (path / "model" / ".metadata").write_bytes(pickle.dumps(metadata))
    restamp(path)
    return ["--checkpoint", str(path)]


def _hf_config_of_a_giant(tmp_path, model, optimizer) -> list[str]:
    from nanogpt.hf import export_hf

    hf_dir = export_hf(model, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "n_layer": 64, "n_embd": 16384, "n_head": 16}))
    return ["--init_from", str(hf_dir)]


def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path):
    """Files that declare a giant model beside a tiny one's weights: each is refused in one line naming the file,
    and nothing big is allocated (the child may not map a GiB more than it has after its imports)."""
    model, optimizer = trained_model(1)
    cases = {make.__name__.strip("_"): [*make(tmp_path, model, optimizer), "--max_new_tokens", "5"]
             for make in (_model_args_of_a_giant, _safetensors_header_of_a_giant, _dcp_metadata_of_a_giant,
                          _hf_config_of_a_giant)}
    child = subprocess.run([sys.executable, "-c", HOSTILE_RUNS, json.dumps(cases)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    results = json.loads(child.stdout.splitlines()[-1])
    expected = {
        "model_args_of_a_giant": r"args/checkpoint_000007/state\.json: its model_args do not fit model\.safetensors "
                                 r"\(lm_head\.weight: \(64, 32\) in the weights, \(64, 16384\) for this model\)",
        "safetensors_header_of_a_giant": r"header/checkpoint_000007/model\.safetensors: unreadable \(SafetensorError",
        "dcp_metadata_of_a_giant": r"dcp/checkpoint_000007/model/\.metadata: declares transformer\.wte\.weight as "
                                   r"\(1085937500, 32\) torch\.float32 \(139\.0 GB\), but stores \d+ bytes",
        "hf_config_of_a_giant": r"hf/config\.json: does not fit the weights beside it \(n_layer=64, but the weights "
                                r"hold 2 transformer blocks\)",
    }
    for name, pattern in expected.items():
        assert results[name]["rc"] == 2, (name, results[name])
        [error] = results[name]["errors"]
        assert "\n" not in error and re.search(pattern, error), (name, error)
    assert results["maxrss_mb"] < 1024
