"""pipelines/sample.py and pipelines/evaluate.py on the best checkpoint of a real Ray Train run (the debug preset on
2 workers, shared with tests/test_pretrain.py through tests/pretrain_runs.py)."""

from __future__ import annotations

import json
import math

import pytest

from pipelines import evaluate, sample
from tests.pretrain_runs import char_shards, debug_run, eval_records, shared_root

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory, shakespeare_path):
    root = shared_root(tmp_path_factory)
    return debug_run(root, char_shards(root, shakespeare_path))


def _samples(out: str) -> list[str]:
    return [s.strip("\n") for s in out.split(sample.SEPARATOR)[:-1]]


def test_sample_prints_seeded_decodable_text(run, capsys, tmp_path):
    argv = ["--checkpoint", run.best_checkpoint, "--start", "ROMEO:", "--num_samples", "2",
            "--max_new_tokens", "40", "--seed", "7", "--device", "cpu"]
    assert sample.main(argv) == 0
    first = _samples(capsys.readouterr().out)
    assert len(first) == 2
    assert all(s.startswith("ROMEO:") and len(s) == len("ROMEO:") + 40 for s in first)
    assert first[0] != first[1]  # two draws, not one repeated
    assert sample.main(argv) == 0
    assert _samples(capsys.readouterr().out) == first  # same seed, same text
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:")
    assert sample.main([*argv[:2], "--start", f"FILE:{prompt}", "--num_samples", "1", "--max_new_tokens", "5"]) == 0
    assert _samples(capsys.readouterr().out)[0].startswith("JULIET:")


def test_sample_errors_are_reported(run, tmp_path, caplog):
    assert sample.main(["--checkpoint", str(tmp_path), "--max_new_tokens", "5"]) == 2
    assert "state.json: missing" in caplog.text
    assert sample.main(["--checkpoint", run.best_checkpoint, "--start", "Ω", "--max_new_tokens", "5"]) == 2
    assert "not in the 65-character vocabulary" in caplog.text


def test_evaluate_matches_the_runs_val_loss(run, capsys):
    assert evaluate.main(["--checkpoint", run.best_checkpoint, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # the run's own eval settings (debug preset: 4 batches of 8 windows of 32 tokens) and the same fixed windows
    assert result["num_windows"] == 32 and result["num_tokens"] == 32 * 32 and result["block_size"] == 32
    reported = eval_records(run.plan.run_dir)[run.best_step]["val_loss"]
    assert result["loss"] == pytest.approx(reported, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    # Tiny Shakespeare is ASCII: one byte per character token, so bits per byte = loss / ln 2
    assert result["num_bytes"] == result["num_tokens"]
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(eval_records(run.plan.run_dir)[run.best_step]["val_bpb"], abs=1e-5)
    assert all(math.isfinite(result[k]) for k in ("loss", "perplexity", "bits_per_byte"))


def test_evaluate_train_split_and_options(run, capsys):
    argv = ["--checkpoint", run.best_checkpoint, "--split", "train", "--eval-iters", "2", "--batch-size", "4"]
    assert evaluate.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("train loss ") and "bits per byte" in line and "in 8 windows of 32" in line


def test_evaluate_bad_input_is_reported(run, tmp_path, caplog):
    assert evaluate.main(["--checkpoint", run.best_checkpoint, "--data-dir", str(tmp_path)]) == 2
    assert "manifest.json" in caplog.text
    assert evaluate.main(["--config", "debug"]) == 2
    assert "model.init_from=scratch" in caplog.text
