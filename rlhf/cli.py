"""Command line: `rlhf train CONFIG [key=value ...]`, `rlhf reward train RECIPE [key=value ...]`, `rlhf model prepare`."""
from __future__ import annotations

import argparse
import sys
import textwrap

from rlhf.config import Config, ConfigError, describe, load_config

TRAIN_USAGE = "rlhf train CONFIG.yaml [key=value ...]   (keys below; nested keys are dotted, e.g. train.lr=1e-5)"


def keys_help(cls: type, usage: str) -> str:
    """`usage`, then every key of config dataclass `cls` with its type, default and help text."""
    lines = [usage, ""]
    for key, tp, default, help_text in describe(cls):
        lines.append(f"  {key:<32} {tp:<14} default {default}")
        if help_text:
            lines.extend(textwrap.wrap(help_text, 90, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def train_help() -> str:
    return keys_help(Config, TRAIN_USAGE)


def train_main(argv: list[str]) -> list[dict]:
    if not argv or argv[0] in ("-h", "--help"):
        print(train_help())
        return []
    path, overrides = argv[0], argv[1:]
    if "=" in path:  # no YAML, only overrides
        path, overrides = None, argv
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    from rlhf.trainers import Trainer

    try:
        trainer = Trainer(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    return trainer.train()


def model_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="rlhf model")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="materialize the embedded SmolLM2-135M-Instruct into the cache")
    prep.add_argument("--name", default="smollm2-135m-instruct")
    prep.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from rlhf.models import embedded

    print(embedded.prepare(args.name, force=args.force))


def reward_main(argv: list[str]) -> list[dict] | None:
    from reward_models.cli import main

    return main(argv)


COMMANDS = {"train": train_main, "reward": reward_main, "model": model_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: rlhf {{{','.join(COMMANDS)}}} ...\n  rlhf train --help   lists every config key\n  rlhf reward train --help   the reward-model trainer's keys")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
