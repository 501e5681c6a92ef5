import pytest
import torch
from rm_helpers import separable_rows

from reward_models.data import encode
from reward_models.model import load_reward_model, score_sequences
from reward_models.packing import pack_groups, packed_pair_scores, packed_scores, shared_prefix_len
from rlhf.config import load_config


def tiny_rm(model_dir, tokenizer, lora: bool):
    torch.manual_seed(0)
    mcfg = load_config(None, [f"model.path={model_dir}", f"model.lora.enabled={str(lora).lower()}",
                              "model.compute_dtype=fp32"]).model
    model = load_reward_model(mcfg, tokenizer)
    with torch.no_grad():  # a non-trivial head and adapter, so that a wrong context or column changes the scores
        for n, p in model.named_parameters():
            if "lora_B" in n or "score" in n:
                p.normal_(0, 0.5)
    return model


def test_shared_prefix_leaves_a_token_on_each_side():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # identical: the last token stays in each suffix
    assert shared_prefix_len([[1, 2], [1, 2, 3, 4]]) == 1
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5], [1, 7, 3, 4]]) == 1


@pytest.mark.parametrize("lora", [False, True])
def test_packed_scores_and_gradients_equal_unpacked(tiny_model_dir, tokenizer, lora):
    rows = separable_rows() + separable_rows(conversational=False)
    prompts = [r["prompt"] for r in rows]
    chosen = encode(tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = encode(tokenizer, prompts, [r["rejected"] for r in rows])
    chosen[0] = chosen[0] + [tokenizer.pad_token_id]  # ends in the pad token: the score is read before it
    pad = tokenizer.pad_token_id
    model = tiny_rm(tiny_model_dir, tokenizer, lora)
    params = [p for p in model.parameters() if p.requires_grad]

    flat = score_sequences(model, chosen + rejected, pad, "cpu", "fp32")
    grads_flat = torch.autograd.grad((flat[: len(rows)] - flat[len(rows):]).sum(), params)
    keys = [str(r["prompt"]) for r in rows]  # 4 conversational pairs of one prompt share a row, then 4 standard ones
    r_c, r_r = packed_pair_scores(model, chosen, rejected, pad, "cpu", "fp32", prompt_keys=keys)
    grads_packed = torch.autograd.grad((r_c - r_r).sum(), params)

    assert (pack_groups([[c, r] for c, r in zip(chosen, rejected)], pad).input_ids_RL.numel()
            < sum(map(len, chosen + rejected)))
    assert torch.allclose(r_c, flat[: len(rows)], atol=1e-5) and torch.allclose(r_r, flat[len(rows):], atol=1e-5)
    assert flat.std() > 1e-2  # the check has teeth: the scores differ from pair to pair
    for g_flat, g_packed in zip(grads_flat, grads_packed):
        assert torch.allclose(g_flat, g_packed, rtol=1e-4, atol=1e-4)


def test_groups_of_completions_score_as_unpacked(tiny_model_dir, tokenizer):
    """The scorer's case: the G completions of one prompt share a row."""
    prompt = separable_rows()[0]["prompt"]
    answers = ["yes", "no no", "the answer is yes", "no", "yes yes yes"]
    seqs = encode(tokenizer, [prompt] * len(answers), answers)
    model = tiny_rm(tiny_model_dir, tokenizer, lora=False)
    with torch.no_grad():
        flat = score_sequences(model, seqs, tokenizer.pad_token_id, "cpu", "fp32")
        packed = pack_groups([seqs[:3], seqs[3:]], tokenizer.pad_token_id)
        grouped = packed_scores(model, packed, "cpu", "fp32")
    assert packed.input_ids_RL.shape[0] == 2 and packed.row_N.tolist() == [0, 0, 0, 1, 1]
    assert torch.allclose(grouped, flat, atol=1e-5) and flat.std() > 1e-2
