"""The one module-swap loop (`shared_kernels.modules`) that nf4lora and mxfp8train use."""

from __future__ import annotations

import torch
from torch import nn

from shared_kernels.modules import output_embedding, set_module, swap_modules


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Sequential(nn.Linear(7, 3), nn.Linear(3, 3)))
        self.lm_head = nn.Linear(3, 11)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


class _Wrapped(nn.Module):
    """A replacement that holds the original layer as a child: the loop must not visit (and re-wrap) it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_swap_modules_replaces_selected_layers_once_in_order():
    model = _Head()
    head = output_embedding(model)
    assert head is model.lm_head
    seen = []

    def build(name, module):
        seen.append(name)
        return None if name == "body.2.1" else _Wrapped(module)  # None keeps that one

    swapped = swap_modules(model, build, lambda name, m: type(m) is nn.Linear and m is not head)
    assert seen == ["body.0", "body.2.0", "body.2.1"]
    assert swapped == ["body.0", "body.2.0"]
    assert isinstance(model.body[0], _Wrapped) and isinstance(model.body[2][0], _Wrapped)
    assert type(model.body[2][1]) is nn.Linear and type(model.lm_head) is nn.Linear
    assert type(model.body[0].inner) is nn.Linear  # not wrapped twice
    x = torch.randn(2, 5)
    assert model.lm_head(model.body(x)).shape == (2, 11)


def test_swap_modules_never_replaces_the_root_and_set_module_addresses_by_name():
    linear = nn.Linear(4, 4)
    assert swap_modules(linear, lambda name, m: nn.Identity(), lambda name, m: True) == []
    assert output_embedding(linear) is None
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    set_module(model, "0.0", nn.Identity())
    assert isinstance(model[0][0], nn.Identity)
    set_module(model, "0", nn.Tanh())
    assert isinstance(model[0], nn.Tanh)
