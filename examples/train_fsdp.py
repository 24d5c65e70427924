"""Train the small GPT of ``gpt.py`` with FSDP2 (``fully_shard``), protected by arc-dist.

Everything but the wrapping is ``examples/train_ddp.py`` (the loop and its flags): each
transformer block and then the root module are sharded with ``fully_shard``, so parameters,
gradients and optimizer state are split across ranks. arc-dist's checks, rollbacks and sharded
checkpoints work on the shards; ``arc.resume()`` reshards when the world size changed.

Single node, 2 workers, through the launcher::

    python -m arc_dist.launch --nproc-per-node=2 --max-restarts=3 \\
        examples/train_fsdp.py --steps 300 --checkpoint-dir runs/fsdp

The same with plain torchrun::

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node=2 \\
        --max-restarts=3 examples/train_fsdp.py --steps 300 --checkpoint-dir runs/fsdp

Two nodes, elastic (run on each node, HEAD = the first node's address)::

    python -m arc_dist.launch --nnodes=1:2 --nproc-per-node=8 --max-restarts=10 \\
        --rdzv-endpoint=HEAD:29400 --rdzv-id=gpt-fsdp-1 \\
        examples/train_fsdp.py --steps 5000 --checkpoint-dir s3://bucket/gpt-fsdp-1

Faults: ``--chaos "nan_loss@40/1 crash@90/1"`` as in train_ddp.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from train_ddp import build_parser, train

from arc_dist.launch import main_entry


def wrap_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    if not dist.is_initialized():
        return model  # a single process: nothing to shard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:  # one all-gather per block in forward, one reduce-scatter back
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # embeddings, final norm and head
    return model


@main_entry
def main() -> None:
    train(build_parser(__doc__).parse_args(), wrap_fsdp, "fsdp")


if __name__ == "__main__":
    main()
