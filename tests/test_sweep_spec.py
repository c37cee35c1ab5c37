"""Sweep files, trial configs and the sweep report: no Ray (pipelines/sweep/spec.py, plan.py, report.py).
Bad sweep files fail through `pipelines/tune.py`'s main with exit status 2 before Ray starts."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
import yaml

from nanogpt.config import ConfigError, load_config
from pipelines import tune
from pipelines.sweep.plan import plan_sweep
from pipelines.sweep.report import (
    FINISHED,
    STOPPED,
    TrialRow,
    best_row,
    plot_loss_vs_lr,
    pretrain_command,
    results_csv,
    results_table,
    retrain_config,
    trial_status,
)
from pipelines.sweep.spec import (
    PRESET_DIR,
    SWEEP_DIR,
    base_config,
    base_tokens_per_step,
    check_trials,
    parse_sweep,
    read_sweep_file,
    trial_config,
)

REPO = Path(__file__).resolve().parents[1]

SHIPPED = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
TINY = {
    "base": "debug",
    "overrides": {"train": {"max_iters": 40}, "run": {"tracker": "none"}},
    "search": {"optim.learning_rate": {"loguniform": [1.0e-4, 1.0e-2]}},
    "scheduler": {"name": "asha", "time_attr": "tokens", "grace_period": 5120},
    "min_lr_ratio": 0.1,
}


def write(tmp_path: Path, data: dict, name: str = "sweep.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def with_(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def test_every_shipped_sweep_checks_out():
    assert {"lr_shakespeare_char", "lr_batch_constant_tokens", "lr_batch_constant_budget",
            "finetune_gpt2_lr"} <= set(SHIPPED)
    for name in SHIPPED:
        spec = parse_sweep(read_sweep_file(name), name)
        configs = check_trials(spec, base_config(spec), name)
        assert configs, name


def test_constant_tokens_sweep_keeps_tokens_per_step():
    spec = parse_sweep(read_sweep_file("lr_batch_constant_tokens"))
    base = base_config(spec)
    for workers in (1, 2):
        base_w = base.replace(run__num_workers=workers)
        got = {b: trial_config(spec, base_w, {"optim.learning_rate": 1e-3, "train.batch_size": b})
               for b in (6, 12, 24)}
        assert {b: c.train.gradient_accumulation_steps for b, c in got.items()} == {6: 8, 12: 4, 24: 2}
        assert {base_tokens_per_step(c) for c in got.values()} == {3072}
        assert {c.train.max_iters for c in got.values()} == {500}


def test_constant_tokens_split_over_the_workers_as_a_run_splits_them():
    """4 micro-batches on 3 workers: 2 + 1 + 1 under DDP, as pretrain takes them; FSDP needs an even split."""
    spec = parse_sweep(read_sweep_file("lr_batch_constant_tokens"))
    base = base_config(spec).replace(run__num_workers=3)
    trial = {"optim.learning_rate": 1e-3, "train.batch_size": 12}
    assert trial_config(spec, base, trial).train.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match=r"train.batch_size=12 cannot keep 3,072 tokens per step on 3 workers: its 4 "
                                          r"micro-batches per step cannot be split over them \(under train.parallel=fsdp every "
                                          r"size must divide it\)"):
        trial_config(spec, base.replace(train__parallel="fsdp", train__dtype="float32"), trial)


def test_constant_budget_sweep_shrinks_max_iters_as_the_batch_grows():
    spec = parse_sweep(read_sweep_file("lr_batch_constant_budget"))
    base = base_config(spec)
    rows = []
    for b in (6, 12, 24):
        c = trial_config(spec, base, {"optim.learning_rate": 3e-3, "train.batch_size": b})
        rows.append((base_tokens_per_step(c), c.train.max_iters, c.optim.lr_decay_iters, c.optim.warmup_iters,
                     c.train.eval_interval, c.optim.min_lr))
    assert rows == [(384, 4000, 4000, 200, 500, pytest.approx(3e-4)),
                    (768, 2000, 2000, 100, 250, pytest.approx(3e-4)),
                    (1536, 1000, 1000, 50, 125, pytest.approx(3e-4))]
    assert {tps * steps for tps, steps, *_ in rows} == {1_536_000}


def test_finetune_sweep_keeps_a_constant_lr():
    spec = parse_sweep(read_sweep_file("finetune_gpt2_lr"))
    configs = check_trials(spec, base_config(spec, ["--model.init_from=gpt2"]))
    assert sorted(c.optim.learning_rate for c in configs) == [3e-6, 1e-5, 3e-5, 1e-4, 3e-4]
    assert all(not c.optim.decay_lr and c.model.init_from == "gpt2" for c in configs)


def test_cli_changes_the_sweep_file(tmp_path):
    data = read_sweep_file(write(tmp_path, TINY), ["--sweep.num_samples=3", "--sweep.scheduler.grace_period=1024",
                                                   "--sweep.search.optim.learning_rate={values: [0.001, 0.003]}"])
    spec = parse_sweep(data)
    assert spec.num_samples == 3 and spec.scheduler.grace_period == 1024
    assert spec.search[0].kind == "values" and spec.search[0].args == (0.001, 0.003)


@pytest.mark.parametrize("changes, args, expected", [
    (dict(search=None), [], "search=None: the search space is empty"),
    (dict(search={}), [], "search={}: the search space is empty"),
    (dict(serach={}), [], "unknown key 'serach'; did you mean 'search'?"),
    (dict(search={"optim.learning_rat": {"values": [1e-3]}}), [],
     "search.optim.learning_rat: unknown config key 'optim.learning_rat'; did you mean 'optim.learning_rate'?"),
    (dict(search={"optim.learning_rate": {"logunifrom": [1e-4, 1e-2]}}), [], "search.optim.learning_rate="),
    (dict(search={"optim.learning_rate": {"loguniform": [1e-2, 1e-4]}}), [], "finite numbers with low < high"),
    (dict(search={"optim.learning_rate": {"uniform": [1e-4, float("inf")]}}), [], "finite numbers with low < high"),
    (dict(time_budget_s=float("nan")), [], "time_budget_s=nan must be a positive finite number"),
    (dict(overrides={"train": {"max_iters": 0}, "run": {"tracker": "none"}}, scheduler={"name": "asha"}), [],
     "the trials end at 0 tokens (train.max_iters=0): ASHA needs trials that train"),
    (dict(search={"run.num_workers": {"values": [1, 2]}}), [], "search.run.num_workers: run.* cannot be swept"),
    (dict(), ["--run.num_workers=2", "--run.min_workers=1", "--run.max_failures=-1"],
     "run.min_workers=1 makes a job elastic, which a sweep's trials are not"),
    (dict(algorithm="grid"), [], "search.optim.learning_rate: algorithm grid needs a list of values"),
    (dict(algorithm="bayes"), [], "algorithm='bayes' must be one of grid, random, optuna"),
    (dict(scheduler={"name": "asha", "grace_perod": 5}), [], "unknown key 'grace_perod'; did you mean 'grace_period'?"),
    (dict(search={"train.batch_size": {"values": [8, 2.5]}}), [],
     "the trial with train.batch_size=2.5: replace(): train.batch_size must be int, got 2.5"),
    (dict(search={"optim.learning_rate": {"values": [1e-3]}, "train.batch_size": {"values": [4, 32]}},
          batch={"keep": "tokens_per_step", "tokens_per_step": 1024}), ["--run.num_workers=2"],
     "the trial with optim.learning_rate=0.001, train.batch_size=32: train.batch_size=32 cannot keep 1,024 tokens "
     "per step on 2 workers"),
    (dict(search={"optim.learning_rate": {"values": [1e-3]}, "train.batch_size": {"values": [8, 24]}},
          batch={"keep": "token_budget", "token_budget": 20480}), [],
     "the trial with optim.learning_rate=0.001, train.batch_size=24: batch.token_budget=20,480 with "
     "train.batch_size=24: 20,480 tokens is not a whole number of steps of 1,536 tokens"),
    (dict(batch={"keep": "tokens_per_step"}), [], "batch.keep=tokens_per_step needs train.batch_size in the search"),
    (dict(min_lr_ratio=None, search={"optim.learning_rate": {"loguniform": [5e-5, 1e-2]}}), [],
     "the trial with optim.learning_rate=5e-05: replace(): optim.min_lr=0.0001 must be in [0, learning_rate=5e-05]"),
    (dict(scheduler={"name": "asha", "grace_period": 20480}), [],
     "scheduler.grace_period=20480 must be below the longest trial's 20,480 tokens"),
])
def test_bad_sweep_fails_before_ray_naming_key_and_value(tmp_path, caplog, monkeypatch, changes, args, expected):
    def no_ray(**kwargs):
        raise AssertionError("the sweep passed every check: Ray would start")

    monkeypatch.setattr("pipelines.ray_adapter.session.init_ray", no_ray)  # fails the test if the sweep got that far
    sweep = write(tmp_path, with_(**changes))
    with caplog.at_level(logging.ERROR, logger="nanogpt.tune"):
        status = tune.main(["--sweep", sweep, f"--run.out_dir={tmp_path / 'out'}", *args])
    assert status == 2
    assert expected in caplog.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("state, expected", [
    ("", "is damaged or empty"),
    ("name: s1\nsweep: {base: debug\n", "is unreadable (while parsing a flow mapping"),
    ("- 1\n- 2\n", "is damaged or empty"),
    ("name: s1\nsweep: {base: debug}\n", "is damaged or empty (it must hold sweep: <the sweep file> and config_args"),
    (None, "Tune saved no experiment state there yet"),
])
def test_resume_of_a_damaged_sweep_fails_before_ray_naming_the_file(tmp_path, caplog, monkeypatch, state, expected):
    def no_ray(**kwargs):
        raise AssertionError("the resume passed every check: Ray would start")

    monkeypatch.setattr("pipelines.ray_adapter.session.init_ray", no_ray)
    sweep = plan_sweep(write(tmp_path, TINY), [], [f"--run.out_dir={tmp_path}/out"], "s1")
    if state is not None:
        Path(sweep.sweep_dir, "sweep.yaml").write_text(state)
    with caplog.at_level(logging.ERROR, logger="nanogpt.tune"):
        assert tune.main(["--resume", sweep.sweep_dir]) == 2
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert expected in message and "\n" not in message
    assert (sweep.sweep_dir if state is None else f"{sweep.sweep_dir}/sweep.yaml") in message


def test_plan_writes_what_resume_reads(tmp_path):
    sweep = plan_sweep(write(tmp_path, TINY), ["--sweep.num_samples=2"], [f"--run.out_dir={tmp_path}/out"], "s1")
    assert sweep.sweep_dir == str(tmp_path / "out" / "s1") and sweep.max_t == 40 * 512
    state = yaml.safe_load((tmp_path / "out" / "s1" / "sweep.yaml").read_text())
    assert state["sweep"]["num_samples"] == 2 and state["name"] == "s1"
    with pytest.raises(ConfigError, match="already exists: pass a new --name, or continue that sweep with --resume"):
        plan_sweep(write(tmp_path, TINY), [], [f"--run.out_dir={tmp_path}/out"], "s1")


def test_best_command_trains_the_trial_config_as_a_job_of_its_own():
    """The command trains the trial's settings with the preset's resources per worker (not the trial's 0.95 CPU,
    cut for the trials' drivers) and registers its model under a name of its own, not the sweep's."""
    spec = parse_sweep(read_sweep_file("lr_batch_constant_tokens"))
    config = trial_config(spec, base_config(spec), {"optim.learning_rate": 3e-3, "train.batch_size": 24})
    assert config.run.cpus_per_worker == 0.95
    command = pretrain_command(spec.base, retrain_config(config, spec.base, [PRESET_DIR]), [PRESET_DIR])
    argv = shlex.split(command)
    assert argv[:4] == ["python", "pipelines/pretrain.py", "--config", "shakespeare_char_cpu"]
    assert "--train.gradient_accumulation_steps=2" in argv and "--optim.learning_rate=0.003" in argv
    assert "--run.registered_model=sweep-lr_batch_constant_tokens-retrain" in argv
    job = load_config(argv[3], argv[4:], search_dirs=[PRESET_DIR])
    assert job.run.cpus_per_worker == 2 and job.run.experiment == config.run.experiment
    assert job.replace(run__cpus_per_worker=0.95, run__registered_model=None) == config


def documented_commands() -> list[list[str]]:
    """The arguments of every `python pipelines/tune.py --sweep ...` line of tune.py's docstring, the README's
    sweep section and the sweep files' comments (continued lines joined, comments dropped)."""
    texts = [tune.__doc__, REPO.joinpath("README.md").read_text().split("## Sweep")[1].split("\n## ")[0]]
    texts += [p.read_text() for p in SWEEP_DIR.glob("*.yaml")]
    commands = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            line = line.lstrip("# ")
            if "python pipelines/tune.py --sweep" in line:
                commands.append(shlex.split(line.split("pipelines/tune.py", 1)[1], comments=True))
    return commands


def test_every_documented_sweep_command_checks_out(tmp_path, monkeypatch):
    """Each documented sweep command passes every check that runs before Ray (its data and output in tmp_path)."""
    commands = documented_commands()
    assert len(commands) >= 10 and ["--sweep", "lr_shakespeare_char"] in commands
    for i, argv in enumerate(commands):
        args, sweep_args, config_args = tune.parse_args(argv)
        here = [f"--run.out_dir={tmp_path / 'out'}", f"--data.dir={tmp_path / 'data'}"]
        sweep = plan_sweep(args.sweep, sweep_args, [*config_args, *here], f"s{i}")
        assert sweep.num_corner_trials >= 1, argv


def rows() -> list[TrialRow]:
    def row(i, lr, batch, best, final, step, status, ckpt=True):
        return TrialRow(f"t{i}", {"optim.learning_rate": lr, "train.batch_size": batch}, 3072, best, final,
                        step * 3072, step, 500, status, best_checkpoint=f"/c/{i}" if ckpt else None)
    return [row(0, 1e-3, 6, 1.80, 1.81, 500, FINISHED), row(1, 3e-3, 6, 1.75, 1.75, 500, FINISHED),
            row(2, 1e-4, 12, 2.60, 2.60, 100, STOPPED), row(3, 3e-3, 12, 1.70, 1.72, 500, FINISHED, ckpt=False),
            row(4, 3e-2, 12, None, None, 20, "failed")]


def test_report_table_csv_and_best():
    assert trial_status(False, 500, 500) == FINISHED and trial_status(False, 100, 500) == STOPPED
    assert trial_status(True, 500, 500) == "failed"
    assert best_row(rows()).trial_id == "t1"  # t3 is lower but has no checkpoint
    table = results_table(rows()).splitlines()
    assert table[0].split() == ["trial", "optim.learning_rate", "train.batch_size", "tokens_per_step", "best_val_loss",
                                "final_val_loss", "tokens", "step", "status"]
    assert [line.split()[0] for line in table[1:]] == ["t3", "t1", "t0", "t2", "t4"]  # best first, failed last
    csv_lines = results_csv(rows()).splitlines()
    assert csv_lines[1] == "t0,0.001,6,3072,1.8,1.81,1536000,500,finished"
    assert csv_lines[5] == "t4,0.03,12,3072,,,61440,20,failed"


def test_plot_is_a_png(tmp_path):
    plot_loss_vs_lr(rows(), tmp_path / "p.png", title="t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
