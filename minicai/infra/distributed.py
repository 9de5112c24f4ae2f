"""torch.distributed, the few calls the scripts need. Run any script under torchrun:

    torchrun --nproc_per_node 2 train_sl.py --out runs/sl ...

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single
process, so the same script runs on a laptop unchanged. Backend: NCCL on CUDA, gloo on CPU.
Gradients are averaged by DistributedDataParallel (or sharded by FSDP's fully_shard with --fsdp);
statistics that must be global (token counts, whitening moments) go through all_reduce here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that logs, prints progress and writes checkpoints."""
        return self.rank == 0


def init(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment (or stay single-process).
    On CUDA each rank takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank, world, local)


def rank_device(device: torch.device, d: Dist) -> torch.device:
    """cuda -> cuda:LOCAL_RANK under torchrun; cpu stays cpu."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.world > 1 else device


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of x over ranks (x itself when single-process). Returns a new tensor."""
    x = x.clone()
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Elementwise max of x over ranks (x itself when single-process). Returns a new tensor."""
    x = x.clone()
    if d.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def loss_denominator(mask: torch.Tensor, d: Dist) -> torch.Tensor:
    """The count a data-parallel loss divides its masked sum by: the number of real tokens (or
    rows) of the whole global batch, divided by the number of processes because DDP averages
    the processes' gradients. Each rank's loss sum_local / this then has, after DDP's average,
    the gradient of sum_global / count_global: the single-process loss. One process: mask.sum().
    mask: any shape, bool or 0/1 -> 0-d fp32."""
    return all_reduce_sum(mask.sum().float(), d) / d.world


def gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Undo `shard` for a tensor: rank r holds rows r, r + world, ... of the global batch, all ranks
    the same shape (b, ...); every rank gets the global (b * world, ...) tensor in global row order
    (local row i of rank r is global row i * world + r). Single process: x itself."""
    if d.world == 1:
        return x
    if x.dtype == torch.bool:  # gloo has no bool all_gather
        return gather_rows(x.to(torch.uint8), d).bool()
    parts = [torch.empty_like(x) for _ in range(d.world)]
    dist.all_gather(parts, x.contiguous())  # world x (b, ...)
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])  # (b, world, ...) -> (b * world, ...)


def gather_uneven(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """gather_rows for ranks holding different numbers of rows (n_r, k), as `shard` of a list
    leaves them (counts differ by at most one): every rank gets all rows, (sum n_r, k), in the
    global order of the sharded list. Each rank pads to the largest count with a validity column,
    gathers, and drops the padding."""
    if d.world == 1:
        return x
    n = int(all_reduce_max(torch.tensor([len(x)], device=x.device), d))
    padded = torch.zeros(n, x.shape[1] + 1, dtype=x.dtype, device=x.device)  # (n, k + 1)
    padded[:len(x), :-1] = x
    padded[:len(x), -1] = 1
    rows = gather_rows(padded, d)  # (n * world, k + 1)
    return rows[rows[:, -1] == 1, :-1]  # (sum n_r, k)


def rank_share(idx: list, d: Dist) -> tuple[list, int]:
    """This rank's part of a global micro-batch idx: every world-th item, the batch first repeated
    to at least world items so that every rank has work (DDP needs a backward on every rank).
    Returns (items, n_real): the first n_real items are real; a repeated one (only when the batch
    is smaller than the world) must get weight 0, so the batch still weighs exactly len(idx) items."""
    items = shard((idx * d.world)[:max(len(idx), d.world)], d)
    return items, len(shard(idx, d))


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def wrap(model: torch.nn.Module, d: Dist, fsdp: bool = False) -> torch.nn.Module:
    """DDP (every rank holds the whole model, gradients are averaged) or FSDP2's fully_shard
    (parameters, gradients and optimizer state sharded per block). Single process: unchanged."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard  # opt-in (--fsdp, under torchrun): imported when asked

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP  # under torchrun only

    ids = [d.local_rank] if next(model.parameters()).is_cuda else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (FSDP shards in place, so it is the module itself)."""
    return getattr(model, "module", model)


def full_state_dict(model: torch.nn.Module, d: Dist) -> dict:
    """The model's full (unsharded) state dict. With FSDP each parameter is a DTensor holding one
    shard; full_tensor() all-gathers it, so every rank must call this together."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in unwrap(model).state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer, d: Dist) -> dict | None:
    """FSDP: the optimizer state gathered into full tensors keyed by parameter name (a collective:
    every rank calls it). torch.distributed.checkpoint's state_dict API does the gathering."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # FSDP only

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """FSDP: load a full optimizer state (from full_optimizer_state) and re-shard it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # FSDP only

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shard(items: list, d: Dist) -> list:
    """This rank's share of a list: items rank, rank + world, ... (every rank gets a fixed part)."""
    return items[d.rank::d.world]


def finish(d: Dist) -> None:
    """Leave the process group. Every rank first waits at a barrier, so that no rank tears down
    gloo while another still has collectives in flight (FSDP2 can leave asynchronous all-gathers
    queued; a rank that destroyed its group early was seen to abort the other with SIGABRT)."""
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
