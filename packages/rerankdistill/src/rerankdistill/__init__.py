"""Reasoning rerankers: teacher explanations and labels, distillation into a small student, reward-based refinement, pointwise reranking of BM25 candidates, nDCG@10."""
