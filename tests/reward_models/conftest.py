"""Fixtures of the reward-model tests (helpers live in rm_helpers.py)."""
from rm_helpers import separable_jsonl, trained_rm  # noqa: F401  (fixtures)
