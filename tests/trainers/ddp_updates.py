"""Subprocess helper (run under torchrun, 2 processes): train from `key=value` overrides, then write
the world size, each rank's parameter checksum and the first records to $RLHF_TEST_OUT (rank 0)."""
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
    before = torch.cat([p.detach().reshape(-1).clone() for p in trainer.unwrapped.parameters() if p.requires_grad])
    records = trainer.train()
    after = torch.cat([p.detach().reshape(-1) for p in trainer.unwrapped.parameters() if p.requires_grad])
    both = acc.gather(after.unsqueeze(0))
    if acc.is_main_process:
        with open(os.environ["RLHF_TEST_OUT"], "w") as f:
            json.dump({"world_size": acc.num_processes, "rank_diff": float((both[0] - both[1]).abs().max()),
                       "moved": float((after - before).abs().max()), "records": records}, f)
