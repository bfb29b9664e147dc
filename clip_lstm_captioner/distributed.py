"""Work shared by the processes of `accelerate launch`: whole batches per process, results back in order.

A script started with plain `python` is one process, which takes all the work: nothing changes.
Under `accelerate launch --num_processes N`, each process takes a contiguous run of whole batches
(so every item lands in the same batch as under one process, and batched results are identical),
and the main process gathers everyone's results in process order, which is the input order.

    state = process_state()                       # or the training script's Accelerator
    rows = share_of(len(paths), state, block=batch_size)
    results = gather_in_order(caption([paths[i] for i in rows]), state)
"""

from __future__ import annotations

import os


def process_state():
    """accelerate's `PartialState` as `accelerate launch` set it up: one process when run with plain python.

    `ACCELERATE_USE_CPU=1` is passed on as `cpu=True`: `PartialState` alone reads it only through
    an `Accelerator`, and without it two CPU processes would each run as an unconnected rank 0.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def share_bounds(num_items: int, num_processes: int, process_index: int, block: int = 1) -> range:
    """The items one process handles: a contiguous run of whole `block`s, as even as blocks allow.

    >>> [share_bounds(10, 3, rank, block=4) for rank in range(3)]
    [range(0, 4), range(4, 8), range(8, 10)]
    >>> [share_bounds(5, 2, rank) for rank in range(2)]
    [range(0, 2), range(2, 5)]
    """
    if num_processes < 1 or not 0 <= process_index < num_processes or block < 1:
        raise ValueError(f"no share {process_index} of {num_processes} processes in blocks of {block}")
    blocks = -(-num_items // block)  # ceil
    first = process_index * blocks // num_processes
    last = (process_index + 1) * blocks // num_processes
    return range(min(first * block, num_items), min(last * block, num_items))


def share_of(num_items: int, state, block: int = 1) -> range:
    """This process's share of `num_items` under `state` (an `Accelerator` or `PartialState`)."""
    return share_bounds(num_items, state.num_processes, state.process_index, block)


def gather_in_order(items: list, state) -> list:
    """Every process's `items` concatenated in process order; each process gets the whole list.

    Objects travel pickled (torch.distributed.all_gather_object): meant for captions and rows,
    not for tensors of features.
    """
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object  # only a launched run needs torch.distributed

    return gather_object(list(items))


def workers_per_process(requested: int | None, num_processes: int) -> int:
    """Image-decoding workers for each process: `requested`, else the CPU cores shared out, up to 8.

    >>> workers_per_process(3, 4), workers_per_process(None, 1) == min(8, os.cpu_count() or 1)
    (3, True)
    """
    if requested is not None:
        return requested
    return min(8, (os.cpu_count() or 1) // max(num_processes, 1))
