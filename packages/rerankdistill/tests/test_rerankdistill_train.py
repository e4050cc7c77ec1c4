"""Training: loss masks, weighted NLL math, SFT / reward-weighted fine-tuning / GRPO change a tiny model as
expected, checkpoints resume."""

from __future__ import annotations

import math

import pytest
import torch

from rerankdistill.labels import INTERANK_PROMPT
from rerankdistill.teacher import Pair, TeacherRecord
from rerankdistill.train.common import (
    IGNORE,
    LoopConfig,
    LoraSpec,
    encode_example,
    per_example_nll,
    weighted_loss,
)
from rerankdistill.train.grpo import (
    ReferencePolicy,
    format_reward,
    group_loss,
    grpo,
    k3_kl,
    label_reward,
)
from rerankdistill.train.rwft import (
    RefinePair,
    group_weights,
    label_agreement_reward,
    reward_weighted_finetune,
)
from rerankdistill.train.sft import DistillExample, distill_examples, sft, target_text, tokenize_examples

EXAMPLES = [
    DistillExample(
        f"what is topic {i}",
        f"a document on topic {i % 2}",
        f"It covers topic {i % 2}. Relevance Label: {2 * (i % 2)}",
    )
    for i in range(6)
]


def mean_nll(model, tokenizer, examples, completion_only=True):
    enc, _ = tokenize_examples(tokenizer, examples, INTERANK_PROMPT, completion_only, None)
    model.eval()
    with torch.no_grad():
        vals = [
            per_example_nll(model(input_ids=torch.tensor([e.input_ids])).logits, torch.tensor([e.labels]))
            for e in enc
        ]
    return float(torch.cat(vals).mean())


def test_completion_only_mask_covers_exactly_the_answer(tiny_tokenizer):
    messages = INTERANK_PROMPT.messages("q text", "doc text")
    full = encode_example(tiny_tokenizer, messages, "Because. Relevance Label: 1 ##", completion_only=False)
    part = encode_example(tiny_tokenizer, messages, "Because. Relevance Label: 1 ##", completion_only=True)
    assert full.input_ids == part.input_ids and full.labels == full.input_ids
    prompt_len = len(
        tiny_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    assert part.labels[:prompt_len] == [IGNORE] * prompt_len
    assert part.labels[prompt_len:] == part.input_ids[prompt_len:]
    learned = tiny_tokenizer.decode(part.labels[prompt_len:])
    assert learned == "Because. Relevance Label: 1 ##<|im_end|>"
    assert encode_example(tiny_tokenizer, messages, "x", max_length=5) is None


def test_weighted_nll_math():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE
    labels[2, :] = IGNORE  # nothing learned in row 2
    nll = per_example_nll(logits, labels)
    for b in range(2):
        terms = [
            -logits[b, t - 1].log_softmax(-1)[labels[b, t]] for t in range(1, 7) if labels[b, t] != IGNORE
        ]
        torch.testing.assert_close(nll[b], torch.stack(terms).mean())
    assert nll[2] == 0
    r = torch.tensor([0.9, 1.0, 0.5])
    torch.testing.assert_close(weighted_loss(logits, labels, r**3), (r**3 * nll).mean())


@pytest.mark.parametrize(
    ("rewards", "kwargs", "expected"),
    [
        ([0.0, 0.5, 1.0], {}, [0.0, 0.0, 1.0]),
        ([0.2, 0.95, 1.0, 0.0], {}, [0.0, 0.95**3, 1.0, 0.0]),
        ([1.0, 0.0, 0.9], {"threshold": 0.85}, [1.0, 0.0, 0.9**3]),
        ([2.0, 4.0, 3.8], {"threshold": 0.85}, [0.0, 1.0, 0.9**3]),  # min-max within the group, not absolute
        ([3.0, 3.0], {}, [1.0, 1.0]),  # degenerate positive group
        ([0.0, 0.0], {}, [0.0, 0.0]),  # degenerate all-wrong group
        ([0.0, 1.0, 0.9], {"misclassification_rate": 0.25}, [0.0, 0.25, 0.25 * 0.9**3]),
        ([0.0, 1.0, 0.9], {"power": 1.0, "threshold": 0.0}, [0.0, 1.0, 0.9]),
    ],
)
def test_group_weights(rewards, kwargs, expected):
    got = group_weights(rewards, **kwargs)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert math.isclose(g, e, rel_tol=1e-12, abs_tol=1e-15)


def test_rewards():
    assert label_agreement_reward("x Relevance Label: 2", 2) == 1.0
    assert label_agreement_reward("x Relevance Label: 1", 2) == 0.5
    assert label_agreement_reward("no idea", 0) == 0.0
    assert label_reward(
        ["a Relevance Label: 0", [{"role": "assistant", "content": "Relevance Label: 2"}]], label=[2, 2]
    ) == [0.0, 1.0]
    assert format_reward(
        [
            "Good reason. Relevance Label: 1 ##",
            "Relevance Label: 1",
            "x Relevance Label: 1 and",
            "ok Relevance Label: 3",
        ]
    ) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="threshold"):
        group_weights([1.0], threshold=2)


def test_distill_examples_and_targets():
    assert target_text("Reason. Relevance Label: 2 extra", 2) == "Reason. Relevance Label: 2"
    assert target_text("It is not relevant at all.", 0) == "It is not relevant at all. Relevance Label: 0"
    pairs = {("1", "a"): Pair("1", "a", "q", "d")}
    recs = [
        TeacherRecord("1", "a", "t", "Fine. Relevance Label: 1", 1),
        TeacherRecord("1", "b", "t", "x", 2),
        TeacherRecord("1", "a", "u", "???", None),
    ]
    ex, counts = distill_examples(recs, pairs)
    assert counts == {"used": 1, "no_label": 1, "no_pair": 1} and ex[0].target == "Fine. Relevance Label: 1"


def test_sft_full_and_lora_lower_the_loss_and_resume(tmp_path, tiny_tokenizer):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=1)
    before = mean_nll(model, tiny_tokenizer, EXAMPLES)
    cfg = LoopConfig(lr=3e-3, epochs=4, batch_size=2, grad_accum=1, save_every=5)
    result = sft(model, tiny_tokenizer, EXAMPLES, tmp_path / "full", loop=cfg, progress=False)
    after = mean_nll(result.model, tiny_tokenizer, EXAMPLES)
    assert result.stats["steps"] == 12 and after < 0.75 * before
    assert (result.final_dir / "model.safetensors").exists()
    assert [p.name for p in sorted((tmp_path / "full" / "checkpoints").glob("step-*"))] == [
        "step-00000010",
        "step-00000012",
    ]

    lora_model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=1)
    frozen = {k: v.clone() for k, v in lora_model.state_dict().items()}
    res = sft(
        lora_model,
        tiny_tokenizer,
        EXAMPLES,
        tmp_path / "lora",
        loop=LoopConfig(**{**cfg.__dict__, "lr": 3e-2}),
        progress=False,
        lora=LoraSpec(r=8, alpha=16),
    )
    assert (
        mean_nll(res.model, tiny_tokenizer, EXAMPLES) < 0.97 * before
    )  # a rank-8 adapter on a 64-wide model moves less
    base = res.model.get_base_model().state_dict()
    assert all(
        torch.equal(
            base[k.replace(".weight", ".base_layer.weight")]
            if k.replace(".weight", ".base_layer.weight") in base
            else base[k],
            v,
        )
        for k, v in frozen.items()
    )
    assert (res.final_dir / "adapter_model.safetensors").exists()

    # resume: a run stopped after its step-10 checkpoint, continued to 12, equals the uninterrupted run
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resume" / "checkpoints")
    shutil.rmtree(tmp_path / "resume" / "checkpoints" / "step-00000012")
    (tmp_path / "resume" / "checkpoints" / "latest").unlink()  # the newest complete one is then step 10
    b = tiny_causal_lm(
        tokenizer=tiny_tokenizer, seed=7
    )  # other weights: all of them come from the checkpoint
    resumed = sft(b, tiny_tokenizer, EXAMPLES, tmp_path / "resume", loop=cfg, progress=False)
    assert resumed.stats["steps"] == 12
    for (name, p), q in zip(resumed.model.state_dict().items(), result.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_reward_weighted_finetune_trains_on_kept_samples(tmp_path, tiny_tokenizer):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=2)
    pairs = [RefinePair(e.query, e.document, int(e.target[-1]), e.target) for e in EXAMPLES[:3]]
    teacher_only = [DistillExample(p.query, p.document, p.teacher_text) for p in pairs]
    before = mean_nll(model, tiny_tokenizer, teacher_only)
    # the random tiny model never writes a label: samples score 0, the teacher's answer 1 -> only it is kept
    result = reward_weighted_finetune(
        model,
        tiny_tokenizer,
        pairs,
        tmp_path / "rwft",
        k=3,
        max_new_tokens=8,
        loop=LoopConfig(lr=3e-3, epochs=5, batch_size=1, grad_accum=1),
        progress=False,
    )
    assert (
        result.stats["candidates"] == 12 and result.stats["kept"] == 3 and result.stats["mean_weight"] == 1.0
    )
    assert mean_nll(result.model, tiny_tokenizer, teacher_only) < 0.7 * before

    # a length reward keeps the longest sampled answers with weights r^3 and trains on them only
    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=2)
    res = reward_weighted_finetune(
        model,
        tiny_tokenizer,
        pairs,
        tmp_path / "len",
        k=4,
        max_new_tokens=8,
        reward_fn=lambda text, ref: float(len(text)),
        include_teacher=False,
        loop=LoopConfig(lr=1e-3, epochs=1, batch_size=1, grad_accum=1),
        progress=False,
    )
    assert 3 <= res.stats["kept"] < 12 and 0.85**3 <= res.stats["mean_weight"] <= 1.0
    with pytest.raises(ValueError, match="threshold"):
        reward_weighted_finetune(
            tiny_causal_lm(tokenizer=tiny_tokenizer, seed=2),
            tiny_tokenizer,
            pairs,
            tmp_path / "none",
            k=2,
            max_new_tokens=4,
            include_teacher=False,
            progress=False,
        )


def test_grpo_moves_the_model_only_with_informative_rewards(tmp_path, tiny_tokenizer):
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    pairs = [RefinePair(e.query, e.document, int(e.target[-1])) for e in EXAMPLES[:2]]
    kwargs = dict(max_steps=2, num_generations=4, max_completion_length=8, learning_rate=1e-2, progress=False)

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    flat = grpo(
        model,
        tiny_tokenizer,
        pairs,
        tmp_path / "flat",
        reward_funcs=[lambda completions, **_: [1.0] * len(completions)],
        **kwargs,
    )
    # equal rewards -> zero group-relative advantages -> zero policy gradient (beta=0): weights unchanged
    assert flat.stats["steps"] == 2
    assert all(torch.equal(v, start[k]) for k, v in flat.model.state_dict().items())

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=4)
    length = grpo(
        model,
        tiny_tokenizer,
        pairs,
        tmp_path / "len",
        reward_funcs=[lambda completions, **_: [float(len(str(c))) for c in completions]],
        **kwargs,
    )
    changed = sum(not torch.equal(v, start[k]) for k, v in length.model.state_dict().items())
    assert changed > 0 and (tmp_path / "len" / "final" / "model.safetensors").exists()

    # killed after its step-2 checkpoint (the step-3 one removed), the same call resumes to the same weights
    import shutil

    full = grpo(
        tiny_causal_lm(tokenizer=tiny_tokenizer, seed=4),
        tiny_tokenizer,
        pairs,
        tmp_path / "full",
        reward_funcs=[lambda completions, **_: [float(len(str(c))) for c in completions]],
        save_every=2,
        **{**kwargs, "max_steps": 3},
    )
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000003")
    (tmp_path / "resumed" / "checkpoints" / "latest").unlink()
    resumed = grpo(
        tiny_causal_lm(tokenizer=tiny_tokenizer, seed=9),
        tiny_tokenizer,
        pairs,
        tmp_path / "resumed",
        reward_funcs=[lambda completions, **_: [float(len(str(c))) for c in completions]],
        save_every=2,
        **{**kwargs, "max_steps": 3},
    )
    assert resumed.stats["steps"] == 3 and resumed.stats["last_loss"] == full.stats["last_loss"]
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -0.1"):
        grpo(model, tiny_tokenizer, pairs, tmp_path / "kl", beta=-0.1)


def _group_batch(tokenizer, advantages):
    from rerankdistill.train.common import collate

    texts = ["It covers topic one.", "No idea at all, sorry", "Relevance Label: 2"]
    examples = [
        encode_example(tokenizer, INTERANK_PROMPT.messages("q one", "doc one"), t + INTERANK_PROMPT.stop, a)
        for t, a in zip(texts, advantages, strict=True)
    ]
    return collate(examples, tokenizer.pad_token_id)


def _grad(model, batch, beta, reference):
    model.zero_grad()
    ref = reference.token_logprobs(model, batch)
    loss, kl = group_loss(
        model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch, beta, ref
    )
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], kl


def test_k3_kl_is_zero_at_the_reference_and_positive_away_from_it():
    x = torch.randn(3, 7, dtype=torch.float64)
    assert torch.equal(k3_kl(x, x), torch.zeros_like(x))
    kl = k3_kl(x, x + torch.randn_like(x))
    assert (kl > 0).all()
    # the k3 estimate is unbiased for KL(p || q): E_p[q/p - log(q/p) - 1] on a small categorical
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    assert torch.isclose((p * k3_kl(q.log(), p.log())).sum(), (p * (p / q).log()).sum())


def test_kl_term_is_zero_at_the_reference_and_pulls_the_policy_back(tiny_tokenizer):
    """With policy == reference the KL and its gradient vanish (beta changes nothing); moved away from the
    reference, beta > 0 adds a gradient whose descent direction points back to the reference."""
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    torch.manual_seed(0)
    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=3).double()
    batch = _group_batch(tiny_tokenizer, [1.2, -0.4, -0.8])
    reference = ReferencePolicy(model)
    g0, kl0 = _grad(model, batch, 0.0, reference)
    g1, kl1 = _grad(model, batch, 0.5, reference)
    assert math.isclose(kl0, 0.0, abs_tol=1e-12) and math.isclose(kl1, 0.0, abs_tol=1e-12)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(g0, g1, strict=True))

    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g0, _ = _grad(model, batch, 0.0, reference)
    g1, kl = _grad(model, batch, 0.5, reference)
    assert kl > 1e-6
    # g1 - g0 = beta * grad KL; -(grad KL) . (theta - theta_ref) < 0: a step along -grad moves toward ref
    pull = sum(((b - a) * (p.detach() - s)).sum() for a, b, p, s in zip(g0, g1, model.parameters(), start))
    assert pull > 0
    with torch.no_grad():  # one small descent step on the KL term alone lowers the KL
        for a, b, p in zip(g0, g1, model.parameters(), strict=True):
            p.sub_(1e-2 * (b - a))
    _, after = _grad(model, batch, 0.5, reference)
    assert after < kl


def test_reference_of_a_lora_student_copies_its_adapters_only(tiny_tokenizer):
    from rerankdistill.train.common import apply_lora
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = apply_lora(
        tiny_causal_lm(tokenizer=tiny_tokenizer, seed=2), LoraSpec(r=2, target_modules=("q_proj",))
    )
    reference = ReferencePolicy(model)
    assert reference.params and all("lora_" in name for name in reference.params)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(reference.params) == trainable


def test_grpo_with_kl_logs_it_and_resumes(tmp_path, tiny_tokenizer):
    """beta > 0 on a LoRA student: the reference is the adapters as handed in (so the first step's KL is
    0, later ones are not), each row logs "kl", and a run killed after its step-2 checkpoint resumes, from
    the same starting student, to the same weights and KL."""
    import shutil

    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    pairs = [RefinePair(e.query, e.document, int(e.target[-1])) for e in EXAMPLES[:2]]
    lora = LoraSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    kwargs = dict(
        max_steps=3,
        num_generations=3,
        max_completion_length=6,
        learning_rate=5e-2,
        progress=False,
        beta=0.5,
        lora=lora,
        save_every=2,
        reward_funcs=[lambda completions, **_: [float(len(str(c))) for c in completions]],
    )
    full = grpo(
        tiny_causal_lm(tokenizer=tiny_tokenizer, seed=4), tiny_tokenizer, pairs, tmp_path / "a", **kwargs
    )
    assert full.stats["first_kl"] == pytest.approx(0.0, abs=1e-6) and full.stats["last_kl"] > 1e-6
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000003")
    (tmp_path / "b" / "checkpoints" / "latest").unlink()
    resumed = grpo(
        tiny_causal_lm(tokenizer=tiny_tokenizer, seed=4), tiny_tokenizer, pairs, tmp_path / "b", **kwargs
    )
    assert resumed.stats["last_kl"] == full.stats["last_kl"]
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())


def test_qlora_sft_through_nf4lora(tmp_path, tiny_tokenizer):
    pytest.importorskip("nf4lora.model", reason="nf4lora.prepare_model not available")
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = tiny_causal_lm(tokenizer=tiny_tokenizer, seed=1)
    before = mean_nll(model, tiny_tokenizer, EXAMPLES)
    result = sft(
        model,
        tiny_tokenizer,
        EXAMPLES,
        tmp_path / "qlora",
        progress=False,
        loop=LoopConfig(lr=3e-2, epochs=2, batch_size=3, grad_accum=1),
        lora=LoraSpec(r=8, alpha=16, quantize="nf4"),
    )
    assert getattr(result.model, "nf4lora_settings", None) is not None
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n.lower() for n in trainable)
    assert mean_nll(result.model, tiny_tokenizer, EXAMPLES) < 0.97 * before
    assert (result.final_dir / "adapter_model.safetensors").exists()


def test_save_model_writes_the_qlora_adapter_atomically_on_the_main_process(tmp_path, tiny_tokenizer):
    pytest.importorskip("nf4lora.model", reason="nf4lora.prepare_model not available")
    import json

    from safetensors.torch import load_file

    from nf4lora.model import lora_state_dict, prepare_model
    from rerankdistill.train.common import save_model
    from shared_kernels.finite import NonFiniteError
    from shared_kernels.testing.tiny_lm import tiny_causal_lm

    model = prepare_model(tiny_causal_lm(tokenizer=tiny_tokenizer, seed=1), r=4, alpha=8, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # adapters with random (not initial zero) weights, so a wrong tensor shows
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    out = tmp_path / "adapter"
    assert save_model(model, tiny_tokenizer, tmp_path, name="adapter", is_main_process=False) == out
    assert not out.exists()  # another rank: nothing written
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    assert (
        save_model(model, tiny_tokenizer, tmp_path, name="adapter", base_model_name_or_path="my-base") == out
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no adapter.tmp left, stale file gone
    assert not (out / "stale.txt").exists() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "my-base"
    saved, expected = load_file(out / "adapter_model.safetensors"), lora_state_dict(model)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k].cpu()) for k in saved)

    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"adapter: 1 of \d+ tensors hold NaN/inf"):
        save_model(model, tiny_tokenizer, tmp_path, name="adapter")
    assert torch.equal(
        load_file(out / "adapter_model.safetensors")[next(iter(saved))], saved[next(iter(saved))]
    )


def test_step_windows_are_shared_between_processes():
    from rerankdistill.train.common import step_windows
    from shared_kernels.training import shard_window

    cfg = LoopConfig(epochs=2, batch_size=2, grad_accum=4, seed=3)
    windows = step_windows(10, cfg)
    flat = [i for w in windows for m in w for i in m]
    assert sorted(flat) == sorted(list(range(10)) * 2) and len(windows) == 3  # 10 micro-batches, 4 per step
    for w in windows[:2]:
        shares = [shard_window(w, r, 2) for r in range(2)]
        assert shares[0] + shares[1] == w and len(shares[0]) == len(shares[1]) == 2
    with pytest.raises(ValueError, match="cannot be shared"):
        shard_window(windows[0][:3], 0, 2)


_DDP_SCRIPT = """
import json, sys, torch
from rerankdistill.train.common import LoopConfig, train_loop
from rerankdistill.train.sft import tokenize_examples
from rerankdistill.labels import INTERANK_PROMPT
from transformers import AutoModelForCausalLM, AutoTokenizer
from test_rerankdistill_train import EXAMPLES

torch.set_num_threads(1)
out, model_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)  # one saved model: every process trains the same weights
model = AutoModelForCausalLM.from_pretrained(model_dir)
enc, _ = tokenize_examples(tok, EXAMPLES, INTERANK_PROMPT, True, None)
loop = LoopConfig(lr=3e-3, epochs=2, batch_size=1, grad_accum=4, warmup_ratio=0.5)
stats = train_loop(model, enc, tok.pad_token_id, out, loop, progress=False)
if int(__import__("os").environ.get("RANK", "0")) == 0:
    __import__("os").makedirs(out, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    torch.save({k: v.detach().cpu() for k, v in unwrapped.state_dict().items()}, out + "/weights.pt")
    print(json.dumps(stats))
"""


@pytest.mark.slow
def test_train_loop_two_ddp_processes_match_one(tmp_path, tiny_lm_dir):
    """`accelerate launch` with 2 gloo processes shares each step's micro-batches: same steps, losses and
    weights as one process accumulating them all (and the scheduler steps once per step)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run_loop.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parent))
    one = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "one"), str(tiny_lm_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    two = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(script),
            str(tmp_path / "two"),
            str(tiny_lm_dir),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    outs = [p.communicate(timeout=600)[0] for p in (one, two)]
    for p, out in zip((one, two), outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    stats = [json.loads(next(x for x in reversed(o.splitlines()) if x.startswith("{"))) for o in outs]
    assert stats[0]["steps"] == stats[1]["steps"] == 3  # 12 micro-batches, 4 per step, on 1 or 2 processes
    assert stats[1]["first_loss"] == pytest.approx(stats[0]["first_loss"], rel=1e-5)
    assert stats[1]["last_loss"] == pytest.approx(stats[0]["last_loss"], rel=1e-4)
    a, b = (torch.load(tmp_path / n / "weights.pt") for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fit_documents_cuts_long_documents_instead_of_dropping(tiny_tokenizer):
    long = DistillExample("what is topic 1", "a document on topic 1 " * 200, "It fits. Relevance Label: 2")
    short_len = len(
        tokenize_examples(tiny_tokenizer, EXAMPLES[:1], INTERANK_PROMPT, True, None)[0][0].input_ids
    )
    limit = short_len + 40
    dropped, n = tokenize_examples(tiny_tokenizer, [long, EXAMPLES[0]], INTERANK_PROMPT, True, limit)
    assert n == 1 and len(dropped) == 1
    fitted, n = tokenize_examples(
        tiny_tokenizer, [long, EXAMPLES[0]], INTERANK_PROMPT, True, limit, fit_documents=True
    )
    assert n == 1 and len(fitted) == 2 and limit - 10 < len(fitted[0].input_ids) <= limit
    answer = [t for t in fitted[0].labels if t != IGNORE]
    assert tiny_tokenizer.decode(answer).startswith(
        "It fits. Relevance Label: 2 ##"
    )  # the answer is kept whole
    assert tokenize_examples(tiny_tokenizer, [long], INTERANK_PROMPT, True, 10, fit_documents=True)[0] == []


def test_release_target_format_and_full_sequence_loss(tiny_tokenizer):
    """InteRank's release: the target is the explanation, then a final `Relevance Label: n` line, no stop
    marker; with completion_only=False every token (prompt included) is learned."""
    from rerankdistill.labels import INTERANK_RELEASE_PROMPT, parse_relevance, truncate_at_stop

    release = INTERANK_RELEASE_PROMPT
    assert target_text("It fits.  Relevance Label: 2 ##", 2, release) == "It fits.\nRelevance Label: 2"
    assert (
        target_text("Clearly relevant, I think", 2, release)
        == "Clearly relevant, I think\nRelevance Label: 2"
    )
    assert (
        target_text("It fits. Relevance Label: 2 ##", 2) == "It fits. Relevance Label: 2"
    )  # the default format
    assert parse_relevance("It fits.\nRelevance Label: 1") == 1 and truncate_at_stop("a ## b", "") == "a ## b"
    ex = DistillExample("what is topic 1", "a document on topic 1", "It fits.\nRelevance Label: 2")
    full, _ = tokenize_examples(tiny_tokenizer, [ex], release, completion_only=False, max_length=None)
    answer_only, _ = tokenize_examples(tiny_tokenizer, [ex], release, completion_only=True, max_length=None)
    assert full[0].labels == full[0].input_ids == answer_only[0].input_ids
    learned = [t for t in answer_only[0].labels if t != IGNORE]
    assert tiny_tokenizer.decode(learned[:-1]) == "It fits.\nRelevance Label: 2"  # then the end-of-turn token
    assert learned[-1] == tiny_tokenizer.eos_token_id
