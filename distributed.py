"""Data parallel training for processes started by torchrun (train_shakespeare.py --long).

    torchrun --nproc_per_node N train_shakespeare.py --long ...

Each of the N processes holds the whole model, draws its own rows of every global batch, and
torch's DistributedDataParallel averages the gradients (NCCL between GPUs, one per process by
LOCAL_RANK; gloo between CPU processes). Rank 0 alone prints, evaluates and writes. Outside torchrun
every function here is the identity of a one-process job, so the training loop reads the same.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun (which sets TORCHELASTIC_RUN_ID and LOCAL_RANK), even with one process."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> torch.device:
    """Join the job: NCCL with one GPU per process (cuda:LOCAL_RANK) when `device` is CUDA, else
    gloo on the CPU. Ranks other than 0 stay silent (stdout to /dev/null; errors still reach stderr).
    Returns this process's device."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torchrun: process {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
                             f"visible); give --nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def finish() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def my_rows(batch_size: int) -> range:
    """The rows of a global batch that this process draws: an equal, contiguous share."""
    share = batch_size // world()
    return range(rank() * share, (rank() + 1) * share)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module a training step calls: DDP around the model in a job, the model itself outside one.
    DDP copies rank 0's buffers to the others before every forward: LTE's lambda (and the counts of
    its controller, when on) follow rank 0's shard."""
    if not active():
        return model
    device_ids = [device.index] if device.type == "cuda" else None  # one GPU per process, or the CPU
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def seed_dropout(seed: int) -> None:
    """A dropout stream of this process's own (rank 0 keeps the one-process stream): the same masks
    on every shard would correlate the shards' noise."""
    if rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence((seed, rank())).generate_state(1)[0]))


def global_mean(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """total / count over the global batch, from this process's shard sums: (what to backpropagate,
    its value). The shards hold different numbers of weighted targets, so a mean of the shards'
    means would weigh them wrongly; DDP averages gradients over N processes, so each backpropagates
    N * its own total / the global count, whose average is the gradient of the global mean."""
    if not active():
        mean = total / count.clamp(min=1)
        return mean, mean.detach()
    count, value = count.detach().clone(), total.detach().clone()
    dist.all_reduce(count)
    dist.all_reduce(value)
    count = count.clamp(min=1)
    return total * world() / count, value / count


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a per-shard mean over equal shards (the LTE penalty): the global batch's mean."""
    if not active():
        return x.detach()
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world()


def total(x: torch.Tensor | int, device: torch.device) -> torch.Tensor | int:
    """A count summed over the processes (a device tensor in a job, no host sync)."""
    if not active():
        return x
    x = torch.as_tensor(x, device=device).clone()
    dist.all_reduce(x)
    return x


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when any process says so: every process must stop at the same step (Ctrl-C reaches
    each at its own moment), or the others would wait for it in the next all-reduce."""
    if not active():
        return flag
    x = torch.tensor(int(flag), device=device)
    dist.all_reduce(x)
    return bool(x.item())


def gather(obj) -> list:
    """Every process's obj, in rank order (each process's random generator states, for a checkpoint)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
