"""FSDP-QLoRA and DDP on CPU (two gloo processes, fsdp2_qlora_worker.py): FSDP2 shards the packed 4-bit
weights (each rank holds half the bytes, for uint8 and bfloat16 quant_storage), training matches one process
and the adapter gathers whole; DDP never sends the frozen 4-bit tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shared_kernels.testing.gloo import run_worker

WORKER = Path(__file__).with_name("fsdp2_qlora_worker.py")


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_worker(WORKER, timeout=300)


@pytest.mark.parametrize("storage", ("uint8", "bfloat16"))
def test_fsdp2_shards_the_packed_4bit_bytes(ranks, storage):
    zero, one = ranks
    whole = zero[f"{storage}_whole_bytes"]
    assert len(whole) == 4  # up and down of two blocks; the head is skipped (dense)
    itemsize = torch.empty(0, dtype=getattr(torch, storage)).element_size()
    for name, n_bytes in whole.items():
        units = -(-n_bytes // itemsize)
        per_rank = -(-units // 2)  # fully_shard splits dim 0 in two, the last rank may hold fewer
        assert zero[f"{storage}_local_bytes"][name] == (per_rank * itemsize, "DTensor"), name
        assert one[f"{storage}_local_bytes"][name] == ((units - per_rank) * itemsize, "DTensor"), name
        assert per_rank * itemsize <= n_bytes / 2 + itemsize  # 1/N of the packed bytes


@pytest.mark.parametrize("storage", ("uint8", "bfloat16"))
def test_fsdp2_qlora_training_equals_one_process(ranks, storage):
    for rank in ranks:
        torch.testing.assert_close(
            rank[f"{storage}_losses"], rank[f"{storage}_ref_losses"], rtol=1e-6, atol=1e-6
        )
    assert ranks[0][f"{storage}_adapters_equal"] and ranks[0][f"{storage}_adapter_count"] == 8


def test_ddp_does_not_send_frozen_4bit_weights(ranks):
    for rank in ranks:
        torch.testing.assert_close(rank["ddp_losses"], rank["ddp_ref_losses"], rtol=1e-6, atol=1e-6)
        assert rank["ddp_sync_buffers"] is False  # no buffer is re-sent at each forward
        assert rank["ddp_bytes_per_step"] == 0
        # construction broadcasts the adapters and dense tensors only, never the 4-bit codes and constants
        assert rank["ignored_are_4bit"] and rank["ddp_bytes_at_construction"] == rank["other_bytes"]
