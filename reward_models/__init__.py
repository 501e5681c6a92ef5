"""Reward content: rule-based scorers used by recipes, and (later) learned reward models."""
