"""Testing toolkit shared by every package's tests.

- tolerance helpers (`assert_exact`, `assert_sqnr`, `assert_error_ratio`) for the three kinds of op:
  casts and quantization codes match bit for bit; quantize-dequantize keeps an SQNR floor; fused float math
  has at most ~2x the error of a same-precision torch version against an fp64 reference;
- `shared_data_dir()` locating ../shared/data (or $SHARED_DATA);
- tiny causal LMs and an in-process byte-level BPE tokenizer (`tiny_lm`, imported lazily: transformers);
- a pytest plugin (`shared_kernels.testing.pytest_plugin`) with the fixtures and the `gpu`/`slow` markers.
"""

from shared_kernels.testing.data import shared_data_dir
from shared_kernels.testing.tolerances import (
    assert_error_ratio,
    assert_exact,
    assert_sqnr,
    sqnr_db,
)

__all__ = ["assert_error_ratio", "assert_exact", "assert_sqnr", "shared_data_dir", "sqnr_db"]
