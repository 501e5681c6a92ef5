"""Subprocess helper for the layout tests (run under `accelerate launch` with any config, or plainly).

Trains from `key=value` overrides with the accelerator the launcher set up (DDP, DeepSpeed, FSDP2 or
one process), then rank 0 writes to $RLHF_TEST_OUT (a .pt file): the world size, the layout, the
records, every trainable parameter after training (gathered whole), every completion of the
first step from every rank (to check that generation did not depend on the layout) and, with
generation.engine=vllm, each rank's check of its engine against its model after the last sync.
"""
import os
import sys

import torch

from rlhf.config import load_config
from rlhf.engine.sync_check import check_sync
from rlhf.trainers import Trainer
from rlhf.trainers import distributed as dist


def main(argv: list[str]) -> None:
    trainer = Trainer(load_config(None, argv))
    acc = trainer.acc
    first: list = []
    real_make = trainer.make_experience

    def make_experience(timer):  # record what every rank generated in step 1
        exp, info = real_make(timer)
        if not first:
            first.append([list(p) + [-1] + list(c) for p, c in zip(exp.prompt_ids, exp.completion_ids)])
        return exp, info

    trainer.make_experience = make_experience
    records = trainer.train()
    params = {n: t.detach().float().cpu().clone() for n, t in dist.full_parameters(trainer.unwrapped, trainer.layout)}
    sync = None
    if trainer.cfg.generation.engine == "vllm":
        report = check_sync(trainer.engine, trainer.unwrapped, trainer.tokenizer, [[7, 8, 9], [10, 11, 12, 13]], 8,
                            trainer.cfg.model.compute_dtype)
        sync = {"ok": report.ok(), "gap_mean": report.logp_gap_mean, "rank": acc.process_index}
    per_rank = [None] * acc.num_processes
    if acc.num_processes > 1:
        torch.distributed.all_gather_object(per_rank, (first[0], sync))
    else:
        per_rank = [(first[0], sync)]
    if acc.is_main_process:
        torch.save({"world_size": acc.num_processes, "layout": trainer.layout, "records": records, "params": params,
                    "completions": [r for rank_rows, _ in per_rank for r in rank_rows],
                    "sync": [s for _, s in per_rank]}, os.environ["RLHF_TEST_OUT"])
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
