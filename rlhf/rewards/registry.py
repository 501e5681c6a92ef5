"""Find reward functions by registry name, `module.path:function` or `path/to/file.py:function`."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from reward_models import code_exec, rules
from rlhf.registry import Registry

REWARDS: Registry[Callable] = Registry("reward function")
REWARDS.register("first_number_matches")(rules.first_number_matches)
REWARDS.register("contains_answer")(rules.contains_answer)
REWARDS.register("code_exec")(code_exec.code_exec)


def load_reward_fn(spec: str) -> Callable:
    """Resolve a reward function spec; errors name the spec and what is missing."""
    if ":" not in spec:
        return REWARDS.get(spec)
    target, fn_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward function '{spec}': file {path} not found")
        mod_name = f"_rlhf_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        if mod_name not in sys.modules:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            mspec.loader.exec_module(module)
        module = sys.modules[mod_name]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ImportError(f"reward function '{spec}': cannot import module '{target}': {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise AttributeError(f"reward function '{spec}': '{target}' has no function '{fn_name}'")
    return fn
