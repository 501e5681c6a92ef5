"""Training on multi-turn episodes (tiny model): environment tokens contribute nothing to the loss, a single-turn
environment is the plain loop to the bit, PPO + GAE on episodes, TRL's environment contract runs unchanged."""
import dataclasses

import pytest
import torch

from rlhf.logging import PhaseTimer
from rlhf.trainers import Trainer
from rlhf.trainers.rewards import advantages
from rlhf.trainers.update import normalizer, policy_loss
from tests.conftest import requires_vllm

ENV = '''
from rlhf.envs import ToolCall


class Counter:
    """Every tool call adds one; the reward is the count."""

    def reset(self, **row):
        self.n = 0

    def count(self) -> str:
        """Count one more call."""
        self.n += 1
        return str(self.n)

    def get_reward(self) -> float:
        return float(self.n)


class Silent:
    """No tools, no observation: one turn, like the plain loop."""

    def reset(self, **row):
        return None


def always(text):
    """A parser for the tiny model's words: every non-empty turn calls `count`."""
    return [ToolCall("count", {})] if text.strip() else []
'''


@pytest.fixture
def env_file(tmp_path):
    path = tmp_path / "counter_env.py"
    path.write_text(ENV)
    return path


def counter(env_file, *extra):
    """The Counter environment; turns of up to 32 tokens, so that the random tiny model ends some with EOS."""
    return [f"env.factory={env_file}:Counter", f"env.tool_parser={env_file}:always", "env.max_turns=3",
            "env.max_tokens=100", "reward.functions=[]", "generation.max_new_tokens=32", *extra]


def test_episodes_train_with_environment_tokens_masked(tiny_cfg, env_file):
    trainer = Trainer(tiny_cfg(*counter(env_file), "train.steps=2"))
    exp, info = trainer.make_experience(PhaseTimer())
    env_tokens = (exp.mask_NT - exp.actions_NT).sum()
    assert env_tokens > 0 and info.metrics["env/tool_calls_mean"] > 0 and info.metrics["env/turns_mean"] > 1
    assert torch.equal(exp.train_mask_NT, exp.actions_NT)
    answered = torch.tensor([float(sum(m["role"] == "tool" for m in t)) for t in info.samples.transcripts])
    assert torch.all(exp.scores_N - answered >= 0) and torch.all(exp.scores_N - answered <= 1)  # + a dropped result
    records = trainer.train()
    assert len(records) == 2 and all(r["env/env_token_frac"] > 0 for r in records)
    for key in ("env/turns_mean", "env/tool_calls_mean", "env/tool_errors", "env/truncated_frac",
                "reward/Counter/mean"):
        assert key in records[0], key
    rows = (trainer.out / "completions.jsonl").read_text()
    assert '"transcript"' in rows and '"role": "tool"' in rows


def test_environment_tokens_contribute_nothing_to_the_loss(tiny_cfg, env_file):
    """Any advantage, reward, sampler or old log-prob on the environment's tokens leaves the loss and its gradient
    as they are (and the advantages of the model's tokens)."""
    trainer = Trainer(tiny_cfg(*counter(env_file), "algo.is_correction=token_truncate", "algo.kl.coef=0.1"))
    exp, _ = trainer.make_experience(PhaseTimer())
    env_NT = (exp.mask_NT - exp.actions_NT).bool()
    assert env_NT.any()
    torch.manual_seed(1)
    noisy = dataclasses.replace(exp)
    for name in ("adv_NT", "sampler_logp_NT", "ref_logp_NT", "rewards_NT"):
        t = getattr(exp, name).clone()
        t[env_NT] = torch.randn(int(env_NT.sum())) * 5
        setattr(noisy, name, t)
    adv_NT, _ = advantages(noisy, trainer.adv_fn, trainer.cfg.algo, trainer.cfg.train.samples_per_prompt, trainer.rt)
    assert torch.equal(adv_NT, exp.adv_NT)  # the advantages ignore the environment tokens' rewards
    L = dataclasses.replace(trainer.losses, beta=0.1)

    def loss_and_grads(e):
        norm = normalizer(e.train_mask_NT, trainer.rt, L.max_new_tokens)
        logp_NT, _ = trainer.fwd.logprobs(trainer.unwrapped, e)
        loss, _ = policy_loss(e, logp_NT, norm, L, gap=False)
        return loss, torch.autograd.grad(loss, [p for p in trainer.unwrapped.parameters() if p.requires_grad])

    (l1, g1), (l2, g2) = loss_and_grads(exp), loss_and_grads(noisy)
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_single_turn_environment_is_the_plain_loop_to_the_bit(tiny_cfg, env_file, yes_reward):
    plain = Trainer(tiny_cfg(yes_reward, "train.steps=2"))
    rec_p = plain.train()  # each trainer seeds the global RNG when built: build and train one after the other
    episodic = Trainer(tiny_cfg(yes_reward, "train.steps=2", f"env.factory={env_file}:Silent"))
    rec_e = episodic.train()
    assert [r["loss"] for r in rec_p] == [r["loss"] for r in rec_e]
    assert [r["reward/mean"] for r in rec_p] == [r["reward/mean"] for r in rec_e]
    for a, b in zip(plain.unwrapped.parameters(), episodic.unwrapped.parameters()):
        assert torch.equal(a, b)


def test_ppo_with_gae_on_episodes(tiny_cfg, env_file):
    trainer = Trainer(tiny_cfg(*counter(env_file), "algo.advantage=gae", "algo.lam=0.9", "algo.kl.placement=in_reward",
                               "algo.kl.estimator=k1", "critic.lora.enabled=false", "critic.lr=1e-3", "train.steps=2"))
    exp, _ = trainer.make_experience(PhaseTimer())
    env_NT = (exp.mask_NT - exp.actions_NT).bool()
    assert env_NT.any() and torch.all(exp.adv_NT[env_NT] == 0) and torch.all(exp.ret_NT[env_NT] == 0)
    assert torch.all(exp.rewards_NT[env_NT] == 0)  # no KL penalty on tokens the model did not sample
    records = trainer.train()
    assert all(torch.isfinite(torch.tensor([r["loss"], r["critic/value_loss"]])).all() for r in records)


TRL_ENV = '''
class MyEnv:
    def __init__(self):
        self.reward = 0.0

    def reset(self, **kwargs) -> str | None:
        self.reward = 0.0
        return "Initial observation for the model"

    def my_tool(self, arg1: str, arg2: int) -> str:
        """
        Description of what this tool does.

        Args:
            arg1: Description of arg1
            arg2: Description of arg2

        Returns:
            The result message.
        """
        self.reward = 1.0
        return "Tool result"

    def get_reward(self) -> float:
        return self.reward


def reward_func(environments, **kwargs) -> list[float]:
    return [env.reward for env in environments]


def get_weather(city: str) -> str:
    """
    Get the weather of a city.

    Args:
        city: The city's name.

    Returns:
        The weather.
    """
    return "sunny"
'''


def test_trls_documented_environment_and_a_trl_style_tool_run_unchanged(tiny_cfg, tmp_path):
    import importlib.util

    path = tmp_path / "trl_env.py"
    path.write_text(TRL_ENV)
    spec = importlib.util.spec_from_file_location("trl_env", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    trainer = Trainer(tiny_cfg("train.steps=1", "env.max_turns=2"), environment_factory=mod.MyEnv,
                      tools=[mod.get_weather], reward_funcs=[mod.reward_func])
    assert sorted(t.name for t in trainer.episodes.tools) == ["get_weather"]
    exp, info = trainer.make_experience(PhaseTimer())
    chat = trainer.episodes.chat
    messages = chat.prompt_messages(info.samples.prompts[0], "Initial observation for the model")
    assert exp.prompt_ids[0] == chat.prompt_ids(messages)  # reset's text is in the prompt the model saw
    assert ("my_tool(arg1: string, arg2: integer)" in messages[0]["content"]
            and "get_weather(city: string)" in messages[0]["content"])
    assert set(info.samples.per_fn) == {"reward_func", "MyEnv"}
    # from a recipe: the same classes by path
    cfg = tiny_cfg("train.steps=1", f"env.factory={path}:MyEnv", f"env.tools=['{path}:get_weather']",
                   f"reward.functions=[{{fn: '{path}:reward_func'}}]")
    (record,) = Trainer(cfg).train()
    assert "reward/MyEnv/mean" in record and "reward/reward_func/mean" in record


def test_evaluation_runs_episodes(tiny_cfg, env_file):
    from rlhf.evaluate import evaluate_engine

    trainer = Trainer(tiny_cfg(*counter(env_file), "data.eval=arithmetic", "eval.max_prompts=4", "eval.k=2"))
    result = evaluate_engine(trainer.engine, trainer.tokenizer, trainer.cfg, rewards=trainer.rewards,
                             episodes=trainer.episodes)
    assert result["num_prompts"] == 4 and "Counter" in result["reward_fns_greedy_mean"]
    assert all(ex["completion"].startswith("[assistant]") for ex in result["examples"])  # transcripts


@pytest.mark.slow
def test_episodes_under_accelerate_launch_with_two_processes(tiny_model_dir, tmp_path, env_file):
    from tests.trainers.test_distributed import base_overrides, run_layout

    overrides = [*base_overrides(tiny_model_dir, tmp_path, "grpo"), *counter(env_file), "train.steps=2"]
    res = run_layout("cpu_2proc.yaml", overrides, tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert res["world_size"] == 2 and [r["world_size"] for r in res["metrics"]] == [2, 2]
    assert (all(r["env/turns_mean"] >= 1 for r in res["metrics"])
            and any(r["env/env_token_frac"] > 0 for r in res["metrics"]))


@pytest.mark.slow
@requires_vllm
def test_episodes_with_the_vllm_engine(tiny_cfg, tiny_vllm_model_dir, env_file):
    trainer = Trainer(tiny_cfg(f"model.path={tiny_vllm_model_dir}", "generation.engine=vllm",
                               "generation.vllm.kv_cache_gb=0.25", *counter(env_file), "train.steps=2"))
    exp, info = trainer.make_experience(PhaseTimer())
    env_NT = (exp.mask_NT - exp.actions_NT).bool()
    assert env_NT.any() and torch.all(exp.sampler_logp_NT[env_NT] == 0)
    assert torch.all(exp.sampler_logp_NT[exp.actions_NT.bool()] < 0)  # the engine's own log-probs on its tokens
    records = trainer.train()
    assert all(r["engine/logp_gap_mean"] < 0.05 and r["env/turns_mean"] >= 1 for r in records)


@pytest.mark.slow
@requires_vllm
def test_episodes_run_asynchronously_with_the_vllm_engine(tiny_cfg, tiny_vllm_model_dir, env_file):
    """vLLM runs the episodes in the producer thread, its weights loaded between batches: every sample is at most
    one version stale, and the first step's (fresh) samples agree with the trainer."""
    trainer = Trainer(tiny_cfg(f"model.path={tiny_vllm_model_dir}", "generation.engine=vllm",
                               "generation.vllm.kv_cache_gb=0.25", *counter(env_file), "train.steps=3",
                               "train.max_staleness=1", "algo.is_correction=token_truncate"))
    records = trainer.train()
    assert [r["staleness"] for r in records] == [0.0, 1.0, 1.0]
    assert all(r["env/turns_mean"] >= 1 and "is/ratio_mean" in r for r in records)
    assert records[0]["engine/logp_gap_mean"] < 0.05
