"""Subprocess entry for training tests: ``python train_worker.py CONFIG.json`` (also under
torchrun). One thread per process, so runs are quick and do not fight over the cores."""
import faulthandler
import sys

import torch

faulthandler.enable(all_threads=True)  # a fatal signal (an abort in C++) prints every thread's Python stack

torch.set_num_threads(1)

from flamingo_rt.runtime.train import Trainer, load_train_config  # noqa: E402
from flamingo_rt.runtime.train.distributed import exit_distributed_process  # noqa: E402

if __name__ == "__main__":
    trainer = Trainer(load_train_config(sys.argv[1]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.world_size > 1:  # as `flamingo-rt train`: no abort in torch's teardown at exit
        exit_distributed_process(0)
