"""Several processes (`accelerate launch --multi_gpu --num_processes N -m conceptkit.cli ...`, or `torchrun
--nproc_per_node N -m conceptkit.cli ...`): who this process is, and the few collective operations the trainers and
the generating commands need. NCCL with one GPU per process when CUDA is there, gloo on CPU otherwise (accelerate's
own `--cpu` launch starts several processes only through MPI).

Launched alone (no WORLD_SIZE > 1 in the environment) everything here is a no-op and nothing of torch.distributed
or accelerate is touched, so a single-process run is exactly what it was before.

Training (learn/loop.py): `--batch` is the batch of one process; the global batch is batch x processes. Every
process draws the whole global batch from the step's (seed, step) generator and keeps its own slice, so the samples
are those of a single-process run with --batch batch x processes; the trained tensors' gradients (and the loss, for
the log) are averaged over the processes after the backward passes, one all-reduce a step. The results equal the
single-process run's up to the order of float sums. Only the main process writes files.

Inference (generate, compose, evaluate): `split` hands each process its share of a job list, `gather` brings the
per-process results back in the original order on every process.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass


def launched_processes() -> int:
    """How many processes the launcher started (1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    count: int = 1
    device: str | None = None  # this process's device when launched with several ("auto" resolves to it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.count > 1

    def share(self, n: int) -> slice:
        """Which n of the global count*n items this process takes (training batches: equal shares)."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def barrier(self) -> None:
        if self.several:
            import torch.distributed as dist

            dist.barrier()

    def mean_(self, flat) -> None:
        """All-reduce a 1-D tensor in place to its mean over the processes."""
        if self.several:
            import torch.distributed as dist

            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.count)

    def split(self, items: list) -> list:
        """This process's share of `items`: contiguous, in order, as even as can be (accelerate's
        split_between_processes; the first processes get one more when they do not divide evenly)."""
        if not self.several:
            return list(items)
        from accelerate import PartialState

        with PartialState().split_between_processes(list(items)) as mine:
            return list(mine)

    def gather(self, mine: list) -> list:
        """Every process's `split` share put back together in the original order (any picklable items)."""
        if not self.several:
            return list(mine)
        import torch.distributed as dist

        shares: list = [None] * self.count
        dist.all_gather_object(shares, list(mine))
        return [item for share in shares for item in share]


@functools.lru_cache(maxsize=1)
def processes() -> Processes:
    """This process's place among the launched ones; starts accelerate's process group (gloo on CPU, NCCL on
    GPUs) on first use when there are several."""
    if launched_processes() == 1:
        return Processes()
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # without CUDA (or with `accelerate launch --cpu`): gloo on CPU; PartialState() alone would see no GPUs and
    # fall back to one process
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    if state.num_processes != launched_processes():
        raise RuntimeError(f"launched as {launched_processes()} processes but accelerate set up "
                           f"{state.num_processes} ({state.distributed_type})")
    return Processes(state.process_index, state.num_processes, str(state.device))


def process_device(device: str) -> str:
    """--device as given, except that 'auto' under a multi-process launch is this process's own device
    (cuda:LOCAL_RANK on a multi-GPU machine, cpu with `accelerate launch --cpu`)."""
    if device == "auto" and launched_processes() > 1:
        return processes().device or device
    return device
