"""siattn.models.GPT: every variant decodes with its KV cache exactly as the full pass; configs validate."""

import pytest
import torch

from siattn.models import GPT, GPTConfig

VARIANTS = [
    ("rope", "softmax"),
    ("p-rope", "si"),
    ("nope", "si"),
    ("alibi", "softmax"),
    ("p-rope", "logn"),
    ("p-rope", "logn-learned"),
    ("nope", "softmax"),
]


@pytest.mark.parametrize("position,attention", VARIANTS)
def test_kv_cache_decoding_equals_the_full_pass(position, attention):
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layer=2,
        d_model=32,
        n_head=4,
        n_kv_head=2,
        position=position,
        attention=attention,
        train_length=8,
        p_rope_base=16.0,
    )
    model = GPT(cfg).double().eval()
    tokens = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :6], cache=cache)] + [
            model(tokens[:, i : i + 1], cache=cache) for i in range(6, 19)
        ]
    assert cache.length() == 19 and cache.length(1) == 19
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_logn_is_the_identity_within_the_training_length():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=1, d_model=32, n_head=2, position="p-rope", attention="softmax", train_length=16)
    )
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        plain = model(tokens)
        model.cfg.attention = "logn"
        logn = model(tokens)
    torch.testing.assert_close(logn[:, :15], plain[:, :15])  # n = i + 1 <= 15 < 16 keys: scale 1
    assert not torch.allclose(logn[:, 20:], plain[:, 20:])


def test_si_model_trains():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=1, d_model=32, n_head=2, position="p-rope", attention="si", si_backend="chunked")
    )
    tokens = torch.randint(0, 256, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(position="yarn"), "position"),
        (dict(attention="flash"), "attention"),
        (dict(d_model=30), "even"),
        (dict(n_kv_head=3), "multiple"),
        (dict(position="alibi", attention="si"), "alibi"),
    ],
)
def test_bad_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_bad_tokens_raise():
    with pytest.raises(ValueError, match="tokens"):
        GPT(GPTConfig(n_layer=1, d_model=16, n_head=2))(torch.zeros(2, 3))
