"""MXFP8 training: E8M0 block scales with the RCEIL rule, E4M3 elements, all three GEMMs of a linear layer quantized along their reduction axis."""
