"""siattn.hf: Llama / Qwen2 / Qwen3 switched to SI p-RoPE attention train, decode with the cache,
save/load."""

import pytest
import torch

pytest.importorskip("transformers")

import siattn.hf  # noqa: E402
from shared_kernels.testing.tiny_lm import tiny_causal_lm  # noqa: E402


def _model(family, seed=0):
    model = tiny_causal_lm(family=family, vocab_size=97, seed=seed, dtype=torch.float64)
    return siattn.hf.apply(model, tau=10.0, rope="p-rope", fraction=0.5, base=16.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_cached_decoding_gives_the_full_forward_logits(family):
    model = _model(family).eval()
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for i in range(8, 21):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_the_switch_changes_the_model_and_uses_p_rope():
    base = tiny_causal_lm(family="llama", vocab_size=97, dtype=torch.float64)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = base(ids).logits
        siattn.hf.apply(base, tau=10.0, rope="p-rope", base=16.0)
        after = base(ids).logits
    assert base.config._attn_implementation == "siattn"
    inv_freq = base.model.rotary_emb.inv_freq
    assert (inv_freq[len(inv_freq) // 2 :] == 0).all() and inv_freq[0] == 1.0
    assert not torch.allclose(before, after)
    # The first token sees only itself (t = 0: a_0 = 1, m_0 = 0, no rotation), so its logits cannot change.
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=1e-10, atol=1e-10)


def test_generate_matches_greedy_full_forward_and_padding_is_honoured():
    model = _model("qwen3").eval()
    prompt = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(6):  # greedy without the cache
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(gen, seq)
    # Left padding: the padded row's logits at real tokens equal the unpadded row's.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        a = model(padded, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, 3:]
        b = model(prompt).logits
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_training_step_and_save_load_round_trip(tmp_path):
    model = tiny_causal_lm(family="llama", vocab_size=97, seed=0)
    siattn.hf.apply(model, tau=5.0, rope="p-rope", base=32.0)
    ids = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # the tiny model memorises the batch
    model.save_pretrained(tmp_path)
    loaded = siattn.hf.from_pretrained(str(tmp_path))
    assert loaded.config.siattn["tau"] == 5.0 and loaded.config._attn_implementation == "siattn"
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bad_arguments_raise():
    model = tiny_causal_lm(family="llama", vocab_size=97)
    with pytest.raises(ValueError, match="rope"):
        siattn.hf.apply(model, rope="yarn")
    with pytest.raises(ValueError, match="tau"):
        siattn.hf.apply(model, tau=0)
    with pytest.raises(ValueError, match="rotary"):
        siattn.hf.apply(torch.nn.Linear(2, 2))


def _packed(lengths_per_row, seed=5):
    """Token ids (B, T), position_ids restarting at each document, and the documents' (row, start, end)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths_per_row[0])
    ids = torch.randint(1, 97, (len(lengths_per_row), T), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths_per_row])
    docs = []
    for b, row in enumerate(lengths_per_row):
        start = 0
        for n in row:
            docs.append((b, start, start + n))
            start += n
    return ids, pos, docs


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_documents_equal_each_document_alone(family):
    # fp32 at 1e-5: a document packed after others (position_ids restarting, or explicit doc_ids) gives the
    # logits it gives alone; without the per-document mask the second document's logits moved by ~0.3-0.5.
    model = tiny_causal_lm(family=family, vocab_size=97, seed=0, dtype=torch.float32)
    siattn.hf.apply(model, tau=10.0, rope="p-rope", fraction=0.5, base=16.0)
    model.eval()
    ids, pos, docs = _packed([[7, 12, 5], [3, 16, 5]])
    doc_ids = torch.cat(
        [
            torch.cat([torch.full((n,), i) for i, n in enumerate(row)])[None]
            for row in ([7, 12, 5], [3, 16, 5])
        ]
    )
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits
        packed_ids = model(ids, position_ids=pos, doc_ids=doc_ids).logits
        for b, s, e in docs:
            alone = model(ids[b : b + 1, s:e]).logits[0]
            torch.testing.assert_close(packed[b, s:e], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_ids[b, s:e], alone, rtol=1e-5, atol=1e-5)
        # KV-cache decoding continues the last document of each row: prefill the packed prefix, then step.
        out = model(ids[:, :-3], position_ids=pos[:, :-3], use_cache=True)
        steps, cache = [out.logits[:, -1]], out.past_key_values
        for i in range(ids.shape[1] - 3, ids.shape[1]):
            out = model(
                ids[:, i : i + 1], position_ids=pos[:, i : i + 1], past_key_values=cache, use_cache=True
            )
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
    for b in range(2):
        s = ids.shape[1] - 5
        alone = model(ids[b : b + 1, s:]).logits[0, -4:]
        torch.testing.assert_close(torch.stack([x[b] for x in steps]), alone, rtol=1e-5, atol=1e-5)
