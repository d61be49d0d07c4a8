"""Sharding over processes started by ``torchrun``: who does which video, and one barrier.

``torch.distributed`` is used only when ``WORLD_SIZE > 1``, and only for barriers, over the
gloo backend on every device (no tensors travel between ranks; gloo needs no GPU and its
barrier works beside CUDA). Each rank loads its own model, on ``cuda:LOCAL_RANK`` when CUDA
is available, writes its own prediction file, and rank 0 merges after the last barrier.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and local rank of this process; ``active`` when a process group is up."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment: {name} must be an integer, got {value!r}") from None


def init_distributed(timeout_hours: float = 72.0) -> DistContext:
    """Join the process group when launched with ``WORLD_SIZE > 1``; else a 1-process context.

    The timeout is long because a barrier waits for the slowest rank to finish all its videos.
    """
    world, local = _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=timeout_hours))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, active=True)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in one process)."""
    if ctx.active:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group."""
    if ctx.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank_device(ctx: DistContext, requested: str | None) -> str:
    """The device for this rank's model.

    None: ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``. ``"cuda"``: the local
    rank's GPU. ``"cuda:N"``: as given in one process, the local rank's GPU under torchrun.
    Anything else (``"cpu"``, ``"mps"``) as given.
    """
    import torch

    if requested is None and not torch.cuda.is_available():
        return "cpu"
    if requested is not None and not requested.startswith("cuda"):
        return requested
    if not torch.cuda.is_available():
        raise ValueError(f"device: {requested!r} requested but CUDA is not available")
    if requested not in (None, "cuda") and ctx.world_size == 1:
        return requested
    index = ctx.local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def assign_videos(question_counts: dict[str, int], world_size: int) -> list[list[str]]:
    """Split videos over ``world_size`` ranks, balanced by question count.

    Deterministic (every rank computes the same split): videos by decreasing count, then
    name, each to the rank with the fewest questions so far (lowest rank on ties). Each
    rank's list keeps that order.
    """
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    heap = [(0, r) for r in range(world_size)]
    shards: list[list[str]] = [[] for _ in range(world_size)]
    for video, count in sorted(question_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        load, r = heapq.heappop(heap)
        shards[r].append(video)
        heapq.heappush(heap, (load + count, r))
    return shards
