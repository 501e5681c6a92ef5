import pytest

from rlhf.checks import check_config
from rlhf.cli import train_help
from rlhf.config import Config, ConfigError, describe, load_config


def test_defaults_and_overrides_are_typed(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  steps: 7\n  lr: 1e-5\nalgo:\n  kl:\n    coef: 0.1\n")
    cfg = load_config(p, ["train.prompts_per_step=4", "generation.temperature=0.7",
                          "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.algo.kl.coef == 0.1 and cfg.train.prompts_per_step == 4
    assert cfg.generation.temperature == 0.7
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    cfg.validate()


def test_unknown_key_names_key_and_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'"):
        load_config(None, ["train.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'; did you mean 'train.steps'\?"):
        load_config(None, ["train.step=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'algo.kl.coeff'; did you mean 'algo.kl.coef'\?"):
        load_config(None, ["algo.kl.coeff=0.1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train.steps: expected an integer, got 'ten'"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"model.lora.enabled: expected true/false"):
        load_config(None, ["model.lora.enabled=maybe"])
    with pytest.raises(ConfigError, match=r"model.compute_dtype: invalid value 'fp8'; choose one of 'bf16', 'fp32'"):
        load_config(None, ["model.compute_dtype=fp8"])


def test_bad_values_fail_validation_naming_key():
    for override, key in [("train.lr=-1", "train.lr"), ("generation.temperature=0", "generation.temperature"),
                          ("train.micro_batch_size=5", "train.micro_batch_size"),
                          ("algo.kl.coef=-0.1", "algo.kl.coef")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            check_config(load_config(None, [override]))


def test_unknown_algorithm_name_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"algo.advantage: unknown advantage estimator 'grpoo'.*valid names: .*grpo"):
        check_config(load_config(None, ["algo.advantage=grpoo"]))


def test_prompts_must_split_over_processes():
    with pytest.raises(ConfigError, match="prompts_per_step=3 must be divisible by the number of processes"):
        load_config(None, ["train.prompts_per_step=3", "train.micro_batch_size=1"]).validate(world_size=2)


def test_help_lists_every_key_with_meaning():
    text = train_help()
    for key, _, _, help_text in describe():
        assert key in text
        assert help_text, f"{key} has no help text"
    assert "algo.kl.coef" in text and "KL-to-reference" in text


def test_derived_batch_summary():
    cfg = Config()
    assert "16 samples/step" in cfg.derived_summary() and "2 micro-batches per optimizer step" in cfg.derived_summary()
