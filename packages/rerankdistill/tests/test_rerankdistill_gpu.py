"""The vLLM teacher backend, on GPU machines with vLLM installed (it is not a dependency of the package)."""

from __future__ import annotations

import pytest

from rerankdistill.teacher import Pair, TeacherStore, generate_teacher_outputs

pytestmark = pytest.mark.gpu


def test_vllm_teacher_fills_the_store_once(tiny_lm_dir, tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm on a CUDA machine)")
    from rerankdistill.backends.vllm import VLLMBackend

    pairs = [Pair(str(q), f"d{d}", f"query {q}", f"document {d} text") for q in range(2) for d in range(3)]
    backend = VLLMBackend(
        str(tiny_lm_dir),
        name="tiny-vllm",
        max_tokens=8,
        gpu_memory_utilization=0.3,
        max_model_len=512,
        enforce_eager=True,
    )
    with TeacherStore(tmp_path / "teacher.jsonl") as store:
        stats = generate_teacher_outputs(pairs, backend, store, batch_size=4, progress=False)
        again = generate_teacher_outputs(pairs, backend, store, batch_size=4, progress=False)
        keys = sorted(store.records)
    assert keys == sorted((p.qid, p.docid, "tiny-vllm") for p in pairs)
    assert stats.prompt_tokens > 0 and 0 < stats.completion_tokens <= 8 * len(pairs)
    assert again.done == 0 and again.skipped_existing == len(pairs)  # nothing is generated twice
