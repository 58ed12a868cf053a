"""recipes/train.py with a probe that records, from inside each process, how the model's parameters are sharded.

Usage (as ``accelerate launch ... fsdp_probe.py PROBE_DIR [--sigkill-rank1-at-step N] <recipe arguments>``): after
the first optimizer step, every rank writes ``PROBE_DIR/shards-rank{rank}.json`` with the world size, the model's
class and, per parameter, its tensor type, placements (``S(0)``: sharded along dim 0), full shape and element count,
and the element count held by this rank. Under FSDP2 the parameters are `DTensor`s sharded along dim 0 (each rank
holds a part); under DDP or one process they are plain full tensors. tests/training/test_distributed.py reads these
files: the recipe's own log line says FSDP was asked for, the files show that the model was actually sharded.

With ``--sigkill-rank1-at-step N`` the process of rank 1 kills itself with SIGKILL at the end of optimizer step N
(a crash between two checkpoints: no clean-up, no save); the launcher then takes the other process down and exits
non-zero.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from tiny_recipe import train as recipe
from transformers import TrainerCallback

import beacon_peft.training.trainer as trainer_module


class ShardProbe(TrainerCallback):
    """Writes this rank's view of every parameter once, at the end of the first optimizer step."""

    def __init__(self, folder: Path):
        self.folder, self.done = folder, False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.done:
            return
        self.done = True
        from torch.distributed.tensor import DTensor

        dist = torch.distributed
        rank = dist.get_rank() if dist.is_initialized() else 0
        params = {}
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            params[name] = dict(type=type(p).__name__, placements=[str(x) for x in getattr(p, "placements", ())],
                                shape=list(p.shape), numel=p.numel(), local_numel=local.numel())
        record = dict(rank=rank, world=dist.get_world_size() if dist.is_initialized() else 1,
                      model_class=type(model).__name__, params=params)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"shards-rank{rank}.json").write_text(json.dumps(record))


class KillRank1(TrainerCallback):
    """SIGKILL the process of rank 1 at the end of optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and torch.distributed.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    folder, rest = Path(argv[0]), argv[1:]
    probes = [ShardProbe(folder)]
    if rest[:1] == ["--sigkill-rank1-at-step"]:
        probes.append(KillRank1(int(rest[1])))
        rest = rest[2:]
    make_callbacks = trainer_module.make_callbacks
    trainer_module.make_callbacks = lambda *a, **k: [*make_callbacks(*a, **k), *probes]
    try:
        recipe.main(rest)
    finally:
        recipe.close_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
