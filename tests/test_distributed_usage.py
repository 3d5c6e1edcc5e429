"""Codebook usage under torch.distributed: each rank counts its own codes; reading sums all ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gsq_kernels import GroupedSphericalQuantizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        quantizer = GroupedSphericalQuantizer(2, 4, groups=1)
        with torch.no_grad():
            quantizer.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
        # rank 0 only hits code 0 (three times), rank 1 only code 2 (once)
        z = torch.tensor([[1.0, 0.0]] * 3) if rank == 0 else torch.tensor([[-1.0, 0.1]])
        quantizer(z)
        results[rank] = (
            quantizer.usage_histogram().tolist(),
            quantizer.codebook_usage(),
            quantizer._usage_counts.tolist(),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_usage_is_summed_across_ranks():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        histogram, usage, local = results[rank]
        assert histogram == [3, 0, 1, 0]
        assert usage == 50.0
    assert results[0][2] == [3, 0, 0, 0] and results[1][2] == [0, 0, 1, 0]  # local counts untouched
