"""The shims over private third-party APIs (rlhf.compat) still do what rlhf needs of them."""
import torch
from accelerate import Accelerator

from rlhf.compat import set_sync_gradients, whole_model_loading


def test_set_sync_gradients_drives_accelerates_accumulation_flag():
    acc = Accelerator(cpu=True)
    set_sync_gradients(acc, False)
    assert acc.sync_gradients is False and acc.gradient_state.sync_gradients is False
    set_sync_gradients(acc, True)
    assert acc.sync_gradients is True


def test_whole_model_loading_hides_the_deepspeed_config_from_transformers_and_restores_it():
    from transformers.integrations import deepspeed as hf_deepspeed

    sentinel = object()
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = sentinel
    try:
        with whole_model_loading(True):
            assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()  # what from_pretrained asks before partitioning
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is sentinel
        with whole_model_loading(False):
            assert hf_deepspeed._hf_deepspeed_config_weak_ref is sentinel
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def test_the_accumulation_window_of_the_runtime_restores_the_flag():
    from rlhf.runtime import Runtime

    acc = Accelerator(cpu=True)
    rt = Runtime(acc, micro_batch_size=2)
    model = torch.nn.Linear(2, 1)
    with rt.accumulate([model], last=False):
        assert acc.sync_gradients is False
    assert acc.sync_gradients is True
    assert rt.micro_batches(range(5)) == [[0, 1], [2, 3], [4]]
