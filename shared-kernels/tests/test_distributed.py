"""`shared_kernels.distributed` and `CheckpointManager` on FSDP2-sharded models: two CPU processes
(gloo) shard small models with `fully_shard` (see fsdp2_checkpoint_worker.py); gathered state dicts are
the unsharded ones bit for bit, checkpoints resume exactly into freshly sharded models, and move between
sharded and unsharded runs. One process checks the unsharded paths, which must return what
`state_dict()` returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shared_kernels.distributed import (
    full_optimizer_state_dict,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state_dict,
    load_full_state_dict,
)
from shared_kernels.testing.gloo import run_worker

WORKER = Path(__file__).with_name("fsdp2_checkpoint_worker.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_worker(WORKER, tmp_path_factory.mktemp("fsdp2_checkpoints"), timeout=300)


def test_gathered_state_dict_is_the_unsharded_one_bit_for_bit(ranks):
    zero, one = ranks
    assert zero["is_sharded"] == one["is_sharded"] == (True, False)
    assert (zero["uneven_local_rows"], one["uneven_local_rows"]) == (3, 2)  # head.weight: 5 rows over 2 ranks
    assert zero["gathered_equals_unsharded"] and zero["gathered_on_cpu"]
    assert one["other_rank_gets_empty"]


def test_checkpoint_of_a_sharded_run_holds_whole_tensors(ranks):
    for rank in ranks:
        assert rank["file_shards_match"] and rank["file_optimizer_shards_match"] and rank["optimizer_format"]
    # clipping on DTensor gradients gives one norm, the same on both ranks
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"] and all(n > 0 for n in ranks[0]["grad_norms"])


def test_resume_into_a_freshly_sharded_model_is_exact(ranks):
    for rank in ranks:
        assert rank["resume_step"] == 2
        assert rank["resumed_params_are_dtensors"]
        assert (
            rank["resumed_params_equal"]
            and rank["resumed_optimizer_equal"]
            and rank["resumed_scheduler_equal"]
        )
        assert rank["step_after_resume_equal"]


def test_checkpoints_move_between_sharded_and_unsharded_runs(ranks):
    assert ranks[0]["unsharded_weights_file_identical"] and ranks[0]["unsharded_optimizer_equal"]
    assert all(rank["unsharded_checkpoint_into_sharded"] for rank in ranks)


def test_trainable_only_under_fsdp2(ranks):
    for rank in ranks:
        assert (
            "embed.weight" not in rank["trainable_only_names"]
            and "head.weight" in rank["trainable_only_names"]
        )
        assert "scale" not in rank["trainable_only_names"]  # buffers are not trainable
        assert rank["trainable_only_loaded"] and rank["frozen_untouched"]


def test_mismatch_raises_on_every_rank(ranks):
    assert all(rank["mismatch_raises"] for rank in ranks)


# ------------------------------------------------------------------------------------------ one process
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 3, bias=False)
        self.c = nn.Linear(3, 4, bias=False)
        self.c.weight = self.a.weight
        self.register_buffer("count", torch.tensor(2))


def test_unsharded_paths_are_plain_state_dicts():
    torch.manual_seed(0)
    model = _Tied()
    assert not is_sharded(model)
    whole = full_state_dict(model)
    assert list(whole) == list(model.state_dict())
    assert all(torch.equal(whole[k], v) for k, v in model.state_dict().items())
    assert whole["a.weight"].untyped_storage().data_ptr() != whole["c.weight"].untyped_storage().data_ptr()
    model.a.weight.requires_grad_(False)
    assert list(full_state_dict(model, trainable_only=True)) == ["a.bias", "b.weight"]

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.b(model.a(torch.randn(2, 3))).sum().backward()
    opt.step()
    assert full_optimizer_state_dict(opt).keys() == opt.state_dict().keys()
    whole = full_state_dict(model)

    torch.manual_seed(1)
    other = _Tied()
    other.a.weight.requires_grad_(False)
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=0.1)
    load_full_state_dict(other, whole)
    load_full_optimizer_state_dict(other_opt, full_optimizer_state_dict(opt))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert torch.equal(other_opt.state[other.b.weight]["exp_avg"], opt.state[model.b.weight]["exp_avg"])
    with pytest.raises(ValueError, match="missing"):
        load_full_state_dict(other, {"a.bias": whole["a.bias"]})
