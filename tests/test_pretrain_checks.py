"""What pipelines/pretrain.py refuses before Ray starts: a config or data error the driver can see is one line and
exit status 2, and the driver never reaches Ray (`no_ray` fails the test if it calls init_ray). No Ray here: real
shards and a real checkpoint on disk, a real S3 API (moto) on 127.0.0.1. The size bounds: tests/test_batch_memory.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nanogpt.config import load_config
from nanogpt.train.local_reporter import LocalReporter
from nanogpt.train.loop import TrainContext, train
from pipelines.pretrain import PRESET_DIR, main
from pipelines.ray_adapter import session as ray_session
from tests.test_batches import make_char_shards, tiny_text

pytest_plugins = ("tests.s3_server",)

@pytest.fixture
def no_ray(monkeypatch):
    """The driver must not get as far as starting (or joining) Ray."""

    def tripwire(*args, **kwargs):
        raise AssertionError("the driver started Ray")

    monkeypatch.setattr(ray_session, "init_ray", tripwire)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_char_shards(tmp_path_factory.mktemp("data") / "chars")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shards) -> Path:
    """A checkpoint of the debug model on `shards`, written by the training loop (2 updates)."""
    out = tmp_path_factory.mktemp("run")
    config = load_config("debug", ["--train.max_iters=2", "--train.eval_interval=2", "--optim.lr_decay_iters=10"],
                         search_dirs=[PRESET_DIR])
    train(config, str(shards), TrainContext(), LocalReporter(out))
    return out / "checkpoint_000002"


def refused(argv: list[str], caplog) -> str:
    """Run the driver's command line; assert exit status 2 with one error line, and return that line."""
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("vocabulary below the dataset's", ["--model.vocab_size=10"],
         "the model's vocabulary has 10 tokens but the dataset's tokenizer (char) has 41"),
        ("non-ASCII run name", ["--run.name=résumé"], "run.name='résumé' may hold only ASCII letters"),
        ("batch of 10^9", ["--train.batch_size=1000000000"],
         "train.batch_size=1000000000: one micro-batch of 1,000,000,000 x 32 tokens needs at least"),
        ("eval of 10^9 batches", ["--train.eval_iters=1000000000"],
         "train.eval_iters=1000000000: an evaluation of eval_iters x batch_size = 8,000,000,000 windows"),
        ("data.dir a file", ["--data.dir=/etc/passwd"], "data.dir=/etc/passwd is a file"),
        ("resume on another vocabulary", ["--model.init_from=resume", "--run.resume_from={checkpoint}",
                                          "--data.dir={other_shards}"], "was trained on tokens of a different tokenizer"),
        ("resume into another shape", ["--model.init_from=resume", "--run.resume_from={checkpoint}",
                                       "--model.n_layer=3"], "was trained with model.n_layer=2 but this config has"),
        ("elastic range FSDP cannot split", ["--train.parallel=fsdp", "--train.dtype=bfloat16",
                                             "--train.gradient_accumulation_steps=8", "--run.min_workers=2",
                                             "--run.num_workers=8", "--run.max_failures=-1"],
         "run.min_workers=2 .. run.num_workers=8: at 3, 5, 6 and 7 workers the 8 micro-batches per optimizer step"),
        ("elastic range above the micro-batches", ["--run.min_workers=2", "--run.num_workers=4",
                                                   "--run.max_failures=-1"],
         "run.min_workers=2 .. run.num_workers=4: at 3 and 4 workers the 2 micro-batches"),
        ("elastic without restarts", ["--run.min_workers=1", "--run.num_workers=2"],
         "run.min_workers=1 makes the job elastic, but run.max_failures=0 ends it at the first lost node"),
        ("elastic on the lean wing", ["--run.min_workers=1", "--run.num_workers=2", "--run.max_failures=-1",
                                      "--run.lean=on"], "run.lean=on cannot apply to an elastic job"),
        ("minimum above the maximum", ["--run.min_workers=3", "--run.num_workers=2"],
         "run.min_workers=3 must be between 1 and run.num_workers=2"),
        ("negative resize interval", ["--run.resize_interval_s=-1"], "run.resize_interval_s must be a finite number"),
        ("zero group start timeout", ["--run.group_start_timeout_s=0"],
         "run.group_start_timeout_s must be a finite number > 0, got 0"),
    ],
)
def test_refused_in_one_line_before_ray(request, tmp_path, shards, no_ray, caplog, case, extra, expected):
    if any("{checkpoint}" in e for e in extra):
        checkpoint = request.getfixturevalue("checkpoint")
        other_shards = make_char_shards(tmp_path / "other", text=tiny_text().upper() + "0123456789")
        extra = [e.format(checkpoint=checkpoint, other_shards=other_shards) for e in extra]
    out = tmp_path / "runs"
    argv = ["--config", "debug", f"--data.dir={shards}", f"--run.out_dir={out}", "--run.name=bad",
            "--run.tracker=none", "--address=local", *extra]
    assert expected in refused(argv, caplog)
    assert not out.exists(), "the driver created the run's directory"


def test_run_in_a_bucket_that_does_not_exist(s3, shards, tmp_path, no_ray, caplog):
    argv = ["--config", "debug", f"--data.dir={shards}", "--run.out_dir=s3://no-such-bucket-26/runs",
            "--run.name=r1", "--run.tracker=none", "--address=local"]
    assert "run.out_dir=s3://no-such-bucket-26/runs: the bucket s3://no-such-bucket-26 does not exist" in \
        refused(argv, caplog)


def test_run_in_a_store_that_is_down(tmp_path, shards, no_ray, caplog, monkeypatch):
    from tests.s3_server import S3Server  # here, once pytest has loaded it as a plugin

    server = S3Server(tmp_path)
    server.start()
    runs = server.bucket_uri("runs")
    server.stop()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    argv = ["--config", "debug", f"--data.dir={shards}", f"--run.out_dir={runs}", "--run.name=r1",
            "--run.tracker=none", "--address=local"]
    assert f"run.out_dir={runs}: the store did not answer" in refused(argv, caplog)
