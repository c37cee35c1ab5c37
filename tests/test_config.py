"""Config as data: presets, precedence, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanogpt.config import Config, ConfigError, DataConfig, load_config, resolve_key

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
PRESETS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
DATA_PRESETS = sorted(p.stem for p in (CONFIGS / "data").glob("*.yaml"))


def load(name=None, *overrides):
    return load_config(name, list(overrides), search_dirs=[CONFIGS])


def test_every_shipped_preset_loads():
    expected = {"debug", "shakespeare_char_cpu", "train_shakespeare_char", "train_gpt2", "finetune_shakespeare",
                "eval_gpt2", "eval_gpt2_medium", "eval_gpt2_large", "eval_gpt2_xl"}
    assert expected <= set(PRESETS)
    for name in PRESETS:
        assert isinstance(load(name), Config)
    for name in DATA_PRESETS:
        assert isinstance(load_config(CONFIGS / "data" / f"{name}.yaml").data, DataConfig)


def test_presets_match_nanogpt_recipes():
    cpu = load("shakespeare_char_cpu")
    assert (cpu.model.n_layer, cpu.model.n_head, cpu.model.n_embd, cpu.model.block_size) == (4, 4, 128, 64)
    assert (cpu.train.batch_size, cpu.train.max_iters, cpu.optim.lr_decay_iters) == (12, 2000, 2000)
    assert (cpu.model.dropout, cpu.train.eval_iters, cpu.train.device, cpu.train.compile) == (0.0, 20, "cpu", False)
    assert (cpu.optim.learning_rate, cpu.optim.min_lr, cpu.optim.beta2, cpu.optim.warmup_iters) == (1e-3, 1e-4, 0.99, 100)

    gpt2 = load("train_gpt2")
    tokens_per_step = gpt2.train.batch_size * gpt2.model.block_size * gpt2.train.gradient_accumulation_steps
    assert tokens_per_step == 491_520  # ~0.5M, nanoGPT's 12 * 1024 * 5 * 8
    assert (gpt2.optim.learning_rate, gpt2.optim.min_lr, gpt2.train.max_iters) == (6e-4, 6e-5, 600_000)

    ft = load("finetune_shakespeare")
    assert (ft.model.init_from, ft.optim.learning_rate, ft.optim.decay_lr, ft.train.max_iters) == ("gpt2-xl", 3e-5, False, 20)
    assert [load(f"eval_gpt2{s}").model.init_from for s in ("", "_medium", "_large", "_xl")] == [
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert all(load(f"eval_gpt2{s}").train.eval_only for s in ("", "_medium", "_large", "_xl"))


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("train: {batch_size: 7, max_iters: 50}\noptim: {learning_rate: 3e-4}\n")
    cfg = load_config(path, ["--train.max_iters=9"])
    assert cfg.train.batch_size == 7  # file over default 12
    assert cfg.train.max_iters == 9  # CLI over file
    assert cfg.optim.learning_rate == 3e-4  # YAML 1.1 reads 3e-4 as a string: still a float here
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # default


def test_override_parsing_and_flat_nanogpt_keys():
    cfg = load("debug", "--batch_size=3", "--dropout=0.1", "--train.compile=true", "--run.name=abc",
               "--model.vocab_size=null", "--learning_rate=2e-3", "--data.separator=\n\n")
    assert cfg.train.batch_size == 3 and cfg.model.dropout == 0.1 and cfg.train.compile is True
    assert cfg.run.name == "abc" and cfg.model.vocab_size is None and cfg.optim.learning_rate == 2e-3
    assert resolve_key("gradient_accumulation_steps") == ("train", "gradient_accumulation_steps")
    assert resolve_key("optim.min_lr") == ("optim", "min_lr")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--batch_sise=3", "unknown config key 'batch_sise'; did you mean 'train.batch_size'?"),
        ("--train.batchsize=3", "unknown config key 'train.batchsize'; did you mean 'train.batch_size'?"),
        ("--trian.batch_size=3", "unknown config section 'trian' in 'trian.batch_size'; did you mean 'train'?"),
        ("--train.batch_size=abc", "train.batch_size must be int, got 'abc'"),
        ("--train.batch_size=1.5", "train.batch_size must be int, got 1.5"),
        ("--train.compile=yes please", "train.compile must be bool"),
        ("--seed=1", "config key 'seed' is ambiguous: use one of data.seed, train.seed"),
        ("--train.dtype=fp8", "train.dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"),
        ("--model.n_embd=33", "model.n_embd=33 must be divisible by model.n_head=2"),
        ("--train.batch_size=0", "train.batch_size must be positive, got 0"),
        ("--optim.warmup_iters=500", "optim.lr_decay_iters=40 must exceed optim.warmup_iters=500"),
        ("--data.tokenizer=bpe", "data.tokenizer must be one of gpt2, char; got 'bpe'"),
        ("train.batch_size=3", "must look like --section.key=value"),
        ("--optim.learning_rate=inf", "optim.learning_rate must be a finite number, got inf"),
        ("--optim.learning_rate=nan", "optim.learning_rate must be a finite number, got nan"),
        ("--optim.learning_rate=.nan", "optim.learning_rate must be a finite number, got nan"),
        ("--optim.min_lr=-.inf", "optim.min_lr must be a finite number, got -inf"),
        ("--model.dropout=NaN", "model.dropout must be a finite number, got nan"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load("debug", override)
    assert message in str(e.value)


def test_nan_is_rejected_whatever_else_is_set():
    """nan used to pass with decay_lr=false (nan <= 0 is False) and trained nothing."""
    with pytest.raises(ConfigError, match="optim.learning_rate must be a finite number"):
        load("debug", "--optim.decay_lr=false", "--optim.learning_rate=nan")


def test_bad_files_name_the_file(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"bad_key\.yaml: unknown config key 'model\.n_layers'; did you mean 'model\.n_layer'\?"):
        load_config(bad_key)
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("model: {n_layer: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml is not valid YAML"):
        load_config(not_yaml)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must be a mapping of sections"):
        load_config(not_mapping)
    with pytest.raises(ConfigError, match=r"no preset named 'shakespeare_char_cpx'.*did you mean 'shakespeare_char_cpu'\?"):
        load("shakespeare_char_cpx")
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_no_code_execution_from_config(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run: {name: !!python/object/apply:os.system ['touch pwned']}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    cfg = load("debug", "--run.name=__import__('os').system('touch pwned')")
    assert cfg.run.name == "__import__('os').system('touch pwned')"  # a string, never evaluated
    assert not Path("pwned").exists()


def test_flat_round_trip_and_frozen():
    cfg = load("shakespeare_char_cpu", "--run.name=x")
    flat = cfg.to_flat()
    assert flat["model.n_layer"] == 4 and flat["train.batch_size"] == 12
    assert Config.from_flat(flat) == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(train__max_iters=5).train.max_iters == 5
    assert cfg.replace(**{"optim.learning_rate": 1e-2}).optim.learning_rate == 1e-2
    with pytest.raises(AttributeError):
        cfg.train.max_iters = 3  # frozen
    with pytest.raises(ConfigError, match="unknown config key 'train.max_iter'"):
        Config.from_flat({"train.max_iter": 3})
