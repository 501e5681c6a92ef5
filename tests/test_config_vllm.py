"""Config keys of the vLLM engine and the importance-sampling correction: bad values fail naming the key."""
import pytest

from rlhf.checks import check_config
from rlhf.config import ConfigError, load_config


@pytest.mark.parametrize("override, key", [
    ("algo.is_cap=1.0", "algo.is_cap"),
    ("algo.is_correction=token_trunc", "algo.is_correction"),
    ("generation.vllm.kv_cache_gb=0", "generation.vllm.kv_cache_gb"),
    ("generation.vllm.gpu_memory_utilization=1.5", "generation.vllm.gpu_memory_utilization"),
    ("generation.vllm.dtype=fp16", "generation.vllm.dtype"),
    ("generation.top_k=-1", "generation.top_k"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(load_config(None, [override]))


def test_unknown_correction_suggests_the_close_name():
    with pytest.raises(ConfigError, match="did you mean 'token_truncate'"):
        check_config(load_config(None, ["algo.is_correction=token_truncat"]))


def test_vllm_engine_needs_vllm_and_runs_with_any_number_of_processes():
    from tests.conftest import vllm_available

    cfg = load_config(None, ["generation.engine=vllm", "train.prompts_per_step=4"])
    if not vllm_available():
        with pytest.raises(ConfigError, match="needs the 'vllm' package"):
            check_config(cfg)
        return
    for world_size in (1, 2, 4):  # one engine per process (tests/trainers/test_distributed.py runs 2)
        check_config(cfg, world_size=world_size)
