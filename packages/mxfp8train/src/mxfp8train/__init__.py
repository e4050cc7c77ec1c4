"""MXFP8 training: E8M0 block scales with the RCEIL rule, E4M3 elements, all three GEMMs of a linear layer
quantized along their reduction axis (arXiv 2506.08027, OCP Microscaling v1.0)."""

from mxfp8train.mx_tensor import MXTensor, to_mx

__all__ = ["MXTensor", "to_mx"]
