"""Learned reward models (train and score), a client of rlhf.

    tasks.py    built-in preference tasks (PREFERENCE_TASKS: arithmetic_preferences)
    data.py     preference pairs: load, validate, render (chat template), tokenize
    model.py    the reward model: causal-LM backbone + 1-output score head, LoRA or full; save (merged)
    trainer.py  Bradley-Terry training with pairwise accuracy on held-out pairs
    scorer.py   a trained reward model as a reward function: `reward_model:PATH` in a recipe
    config.py   the typed run config; cli.py: `rlhf reward train RECIPE.yaml [key=value ...]`

Submodules are imported on use. Rule-based rewards and the code sandbox live in `rlhf.rewards`; this package
plugs its `reward_model:` factory and the `rlhf reward` command into rlhf through entry points (pyproject.toml).
"""
