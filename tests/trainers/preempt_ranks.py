"""Subprocess helper (run under torchrun, 2 processes): only rank 1 is signalled; both must see the stop."""
import os
import signal
import time

from accelerate import Accelerator

from rlhf.trainers.guards import Preemption

if __name__ == "__main__":
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    with Preemption() as preemption:
        first = preemption.requested(acc)
        if acc.process_index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
        second = preemption.requested(acc)
    print(f"rank {acc.process_index}: before={first} after={second} signalled={preemption.signum is not None}",
          flush=True)
