"""Tool use over multi-turn episodes: `python recipes/tool_lookup.py [key=value ...]`
(also `accelerate launch recipes/tool_lookup.py ...`, or `rlhf train recipes/tool_lookup.yaml`)."""
from pathlib import Path

from rlhf import run_recipe

if __name__ == "__main__":
    run_recipe(Path(__file__).with_suffix(".yaml"))
