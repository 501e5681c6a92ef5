"""Subprocess helper (run under torchrun, 2 processes): train from `key=value` overrides, then write
the world size, each rank's parameter checksum (the policy's, and the critic's when there is one) and the
first records to $RLHF_TEST_OUT (rank 0)."""
import json
import os
import sys

import torch
from accelerate import Accelerator

from rlhf.config import load_config
from rlhf.trainers import Trainer

if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    trainer = Trainer(load_config(None, sys.argv[1:]), acc)
    flat = lambda m: torch.cat([p.detach().reshape(-1).clone() for p in m.parameters() if p.requires_grad])  # noqa: E731
    models = {"": lambda: trainer.unwrapped}
    if getattr(trainer, "critic", None) is not None:
        models["critic_"] = lambda: trainer.acc.unwrap_model(trainer.critic.model)
    before = {k: flat(m()) for k, m in models.items()}
    records = trainer.train()
    result = {"world_size": acc.num_processes, "records": records}
    for k, m in models.items():
        after = flat(m())
        both = acc.gather(after.unsqueeze(0))
        result.update({f"{k}rank_diff": float((both[0] - both[1]).abs().max()),
                       f"{k}moved": float((after - before[k]).abs().max())})
    if acc.is_main_process:
        with open(os.environ["RLHF_TEST_OUT"], "w") as f:
            json.dump(result, f)
