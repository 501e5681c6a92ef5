"""Find reward functions by registry name, `module.path:function`, `path/to/file.py:function`,
or a factory spec `factory:argument` (e.g. `reward_model:runs/rm/final`, a learned reward model)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from rlhf.errors import RewardError, UserError
from rlhf.registry import Registry
from rlhf.rewards import code_exec, rules

REWARDS: Registry[Callable] = Registry("reward function")
REWARDS.register("first_number_matches")(rules.first_number_matches)
REWARDS.register("contains_answer")(rules.contains_answer)
REWARDS.register("code_exec")(code_exec.code_exec)

# Factories build a reward function from the text after `name:` (checked before module specs). Packages add
# theirs through the "rlhf.reward_factories" entry points: `reward_model:PATH` (a learned reward model) comes
# from reward_models (pyproject.toml), which rlhf never imports itself.
REWARD_FACTORIES: Registry[Callable[[str], Callable]] = Registry("reward function factory", "rlhf.reward_factories")


def reward_fn_name(spec: str) -> str:
    """The default metric name of a spec: the function name, or the factory name for factory specs."""
    head, sep, _ = spec.partition(":")
    return head if sep and head in REWARD_FACTORIES else spec.rsplit(":", 1)[-1]


def load_reward_fn(spec: str) -> Callable:
    """Resolve a reward function spec; errors name the spec and what is missing."""
    if ":" not in spec:
        return REWARDS.get(spec)
    head, _, arg = spec.partition(":")
    if head in REWARD_FACTORIES:
        try:
            return REWARD_FACTORIES.get(head)(arg)
        except UserError:
            raise
        except (OSError, ValueError) as e:  # a missing or unusable model directory, a bad option
            raise RewardError(f"reward function '{spec}': {e}") from None
    target, fn_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise RewardError(f"reward function '{spec}': file {path} not found")
        mod_name = f"_rlhf_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        if mod_name not in sys.modules:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            try:
                mspec.loader.exec_module(module)
            except Exception as e:  # noqa: BLE001 - the user's file can raise anything at import
                del sys.modules[mod_name]
                raise RewardError(f"reward function '{spec}': importing {path} failed: {type(e).__name__}: {e}") from e
        module = sys.modules[mod_name]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward function '{spec}': cannot import module '{target}': {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward function '{spec}': '{target}' has no function '{fn_name}'")
    return fn
