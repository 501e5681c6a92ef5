"""`rlhf eval`: greedy accuracy and pass@k on a recipe's eval split, scored by its reward functions."""
import itertools
import json

import pytest
import torch

from rlhf.cli import main
from rlhf.config import ConfigError, load_config
from rlhf.engine import Rollouts
from rlhf.evaluate import eval_prompts, evaluate, evaluate_engine, load_for_eval, pass_at_k


def brute_pass_at_k(n, c, k):
    draws = list(itertools.combinations([1] * c + [0] * (n - c), k))
    return sum(any(d) for d in draws) / len(draws)


@pytest.mark.parametrize("n,c,k", [(4, 0, 1), (4, 1, 1), (4, 1, 4), (5, 2, 2), (8, 3, 4), (6, 6, 3)])
def test_pass_at_k_matches_counting(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k=5, n=4"):
        pass_at_k(4, 1, 5)


class ScriptedEngine:
    """Answers 'What is a + b?' right in greedy mode when a + b is even; when sampling, the first
    (a % n) of a prompt's n samples are right. Tracks its calls."""

    def __init__(self, tokenizer):
        self.tok, self.calls = tokenizer, []

    def generate(self, prompt_ids, n, sampling, return_logps=False):
        self.calls.append((len(prompt_ids), n, sampling.greedy))
        out = []
        for ids in prompt_ids:
            words = self.tok.decode(ids).split()
            i = len(words) - 1 - words[::-1].index("+")
            a, b = int(words[i - 1]), int(words[i + 1].rstrip("?"))
            for j in range(1 if sampling.greedy else n):
                right = (a + b) % 2 == 0 if sampling.greedy else j < a % n
                out.append(self.tok.encode(str(a + b if right else a + b + 1), add_special_tokens=False))
        return Rollouts(prompt_ids=[p for p in prompt_ids for _ in range(1 if sampling.greedy else n)],
                        completion_ids=out, finished=[True] * len(out))


def test_evaluate_engine_counts_exactly(tiny_model_dir, tokenizer):
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "data.eval=arithmetic", "eval.k=2", "eval.samples=4",
                             "eval.batch_size=7"])
    source = eval_prompts(cfg, tokenizer)
    answers = source.ds["answer"]
    firsts = [int(m[-1]["content"].split()[2]) for m in source.ds["prompt"]]
    engine = ScriptedEngine(tokenizer)
    result = evaluate_engine(engine, tokenizer, cfg)
    assert result["num_prompts"] == len(answers) == 20
    assert result["greedy_accuracy"] == pytest.approx(sum(a % 2 == 0 for a in answers) / 20)
    assert result["pass@2"] == pytest.approx(sum(pass_at_k(4, a % 4, 2) for a in firsts) / 20)
    assert result["pass@1"] == pytest.approx(sum((a % 4) / 4 for a in firsts) / 20)
    assert engine.calls == [(7, 1, True), (7, 4, False), (7, 1, True), (7, 4, False), (6, 1, True), (6, 4, False)]
    json.dumps(result)  # JSON-able


def test_threshold_decides_what_counts_as_correct(tiny_model_dir, tokenizer):
    overrides = [f"model.path={tiny_model_dir}", "data.eval=arithmetic", "eval.k=0",
                 "reward.functions=[{fn: first_number_matches, weight: 0.5}]"]
    engine = ScriptedEngine(tokenizer)
    strict = evaluate_engine(engine, tokenizer, load_config(None, overrides))
    lenient = evaluate_engine(engine, tokenizer, load_config(None, overrides + ["eval.threshold=0.5"]))
    assert strict["greedy_accuracy"] == 0.0 and lenient["greedy_accuracy"] > 0.2
    assert "pass@0" not in strict and strict["samples"] == 0


def test_eval_functions_decide_correctness_when_training_weighs_them_zero(tiny_model_dir, tokenizer):
    """On-policy distillation trains with the task reward at weight 0: eval.functions still measure the task."""
    overrides = [f"model.path={tiny_model_dir}", "data.eval=arithmetic", "eval.k=0",
                 "reward.functions=[{fn: first_number_matches, weight: 0.0}]"]
    engine = ScriptedEngine(tokenizer)
    by_training = evaluate_engine(engine, tokenizer, load_config(None, overrides))
    by_eval = evaluate_engine(engine, tokenizer,
                              load_config(None, overrides + ["eval.functions=[{fn: first_number_matches}]"]))
    assert by_training["greedy_accuracy"] == 0.0 and by_eval["greedy_accuracy"] > 0.2


def test_eval_needs_an_eval_split(tiny_model_dir):
    with pytest.raises(ConfigError, match="data.eval is not set"):
        evaluate(tiny_model_dir, load_config(None, [f"model.path={tiny_model_dir}"]))


def test_adapter_dir_evaluates_like_the_live_policy(lora_run):
    """6 steps on a tiny random model do not reliably change its greedy answers, so that the trained adapter is
    what `evaluate` loads (and not the base model) is checked on the logits."""
    run_dir, trainer = lora_run
    live = json.loads((run_dir / "eval.json").read_text())["after"]
    loaded = evaluate(run_dir / "final", trainer.cfg)
    assert [e["completion"] for e in loaded["examples"]] == [e["completion"] for e in live["examples"]]
    assert loaded["greedy_accuracy"] == live["greedy_accuracy"]
    model, _ = load_for_eval(run_dir / "final", trainer.cfg)
    ids = torch.tensor([trainer.tokenizer.encode("What is 3 + 4? The answer is")])
    policy = trainer.unwrapped
    with torch.no_grad():
        got, trained = model(ids).logits, policy(ids).logits
        with policy.disable_adapter():
            base = policy(ids).logits
    assert torch.allclose(got, trained, atol=1e-4)
    assert (trained - base).abs().max() > 1e-2  # training moved the policy


def test_eval_cli_on_a_run_dir(lora_run, tmp_path, capsys):
    run_dir, _ = lora_run
    out = tmp_path / "e.json"
    main(["eval", str(run_dir), "eval.k=0", "eval.max_prompts=3", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 3 and result["model"].endswith("final")
    assert "greedy accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="data.eval is not set"):
        main(["eval", str(run_dir / "final"), f"model.path={run_dir}", "--output", str(out)])
