"""A whole run as `rlhf train` and recipe scripts do it: eval before, train, eval after, report.

    history = run(cfg)

1. builds the Trainer (config, rewards and data are checked before any model loads);
2. with `data.eval` set and `eval.before_after`, evaluates the policy before training
   (the base model) through the trainer's own generation engine;
3. trains;
4. evaluates the trained policy the same way and writes `<output_dir>/eval.json`
   ({"before": ..., "after": ...});
5. with `log.report`, writes `<output_dir>/report.html` and prints its path.

Evaluation and the report run on the main process only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from rlhf.config import Config


def run(cfg: Config, trainer=None) -> list[dict[str, Any]]:
    """Train `cfg` with the extras around the loop; returns the metrics history."""
    from rlhf.trainers import Trainer

    trainer = trainer or Trainer(cfg)
    evaluate = bool(cfg.data.eval) and cfg.eval.before_after and trainer.is_main
    resumed = cfg.checkpoint.resume != "none"
    before = _evaluate(trainer, "before") if evaluate and not resumed else None
    history = trainer.train()
    if not trainer.is_main:
        return history
    out = Path(cfg.output_dir)
    if evaluate and trainer.state["step"] >= cfg.train.steps:  # not after a preemption stop
        results = {"before": before, "after": _evaluate(trainer, "after")}
        if before is None:  # a resumed run keeps the "before" its first part measured
            previous = _read_json(out / "eval.json")
            results["before"] = previous.get("before") if previous else None
        (out / "eval.json").write_text(json.dumps(results, indent=1))
        b, a = results["before"], results["after"]
        trainer.log(f"eval on {cfg.data.eval}: greedy accuracy "
                    + (f"{b['greedy_accuracy']:.3f} before -> " if b else "")
                    + f"{a['greedy_accuracy']:.3f} after training"
                    + f"  ({out / 'eval.json'})")
    if cfg.log.report:
        from rlhf.report import write_report

        trainer.log(f"report: {write_report(out).resolve()}")
    return history


def _evaluate(trainer, label: str) -> dict[str, Any]:
    from rlhf.evaluate import evaluate_engine, summary_line

    result = evaluate_engine(trainer.engine, trainer.tokenizer, trainer.cfg, model_name=f"policy {label} training",
                             rewards=trainer.rewards, episodes=trainer.episodes)
    trainer.log(summary_line(result))
    return result


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None
