/* The native MX casts of mx_cpu.c as C++ kernels of the operators `shared_kernels::mx_cast_cxx` and
   `shared_kernels::mx_cast_rows_cols_cxx` (schemas and fake implementations in shared_kernels/mx_cast.py),
   built and configured by shared_kernels/mx_cpu.py.

   Why C++: a compiled graph calls an op through the dispatcher; with a Python kernel every call then
   re-enters the interpreter (boxing, the Python function, two torch.empty, a 22-argument ctypes call),
   which costs ~15-35 us more than this (more after a large cast has evicted the interpreter's state from
   the caches). Here the dispatcher calls the kernel below directly, which allocates the outputs and calls
   the C entry point `mx_cast` through a function pointer handed over by mx_cpu.py (the C file is built and
   loaded once, by ctypes).

   The element formats (emax, mantissa bits, bias, saturation, NaN code) are computed in Python, their one
   home, and handed over once per element type and rule by `mx_cast_cxx_set_format`. */
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using mx_cast_fn = void (*)(const void*, int, int64_t, int64_t, int64_t, int, int, int, int, int, int, int,
                            float, float, uint32_t, int, uint8_t*, uint8_t*, uint8_t*, uint8_t*, int, int);

enum { MODE_ROWS = 0, MODE_COLUMNS = 1, MODE_BOTH = 2 };

struct Format {
    bool set = false;
    int emax = 0, mbits = 0, elem_bias = 0, rceil = 0, top_byte = 0, nan_code = 0;
    float max_pos = 0, magic = 0;
    uint32_t magic_bits = 0;
};

// Set once by mx_cpu.py (under its lock) before any cast; read-only afterwards.
mx_cast_fn kernel = nullptr;
int64_t min_elements_per_thread = 1 << 18;
int isa = 2;
Format formats[2][2];  // [element type: E4M3, E5M2][rule: floor, rceil]

Format& format_slot(at::ScalarType elem_dtype, c10::string_view scale_mode) {
    TORCH_CHECK(elem_dtype == at::kFloat8_e4m3fn || elem_dtype == at::kFloat8_e5m2,
                "elem_dtype must be float8_e4m3fn or float8_e5m2, got ", elem_dtype);
    TORCH_CHECK(scale_mode == "rceil" || scale_mode == "floor", "scale_mode must be 'rceil' or 'floor', got ",
                scale_mode);
    return formats[elem_dtype == at::kFloat8_e5m2][scale_mode == "rceil"];
}

void configure(int64_t kernel_address, int64_t min_per_thread, int64_t isa_cap) {
    kernel = reinterpret_cast<mx_cast_fn>(kernel_address);
    min_elements_per_thread = min_per_thread;
    isa = static_cast<int>(isa_cap);
}

void set_format(at::ScalarType elem_dtype, c10::string_view scale_mode, int64_t emax, int64_t mbits,
                int64_t elem_bias, int64_t rceil, int64_t top_byte, double max_pos, double magic,
                int64_t magic_bits, int64_t nan_code) {
    Format& f = format_slot(elem_dtype, scale_mode);
    f = Format{true,
               static_cast<int>(emax),
               static_cast<int>(mbits),
               static_cast<int>(elem_bias),
               static_cast<int>(rceil),
               static_cast<int>(top_byte),
               static_cast<int>(nan_code),
               static_cast<float>(max_pos),
               static_cast<float>(magic),
               static_cast<uint32_t>(magic_bits)};
}

const Format& format_of(at::ScalarType elem_dtype, c10::string_view scale_mode) {
    const Format& f = format_slot(elem_dtype, scale_mode);
    TORCH_CHECK(kernel != nullptr && f.set, "shared_kernels MX C++ op used before mx_cpu configured it");
    return f;
}

// The kernels read fp32 or bf16, contiguous (fp16 widened to fp32: exact).
at::Tensor prepare(const at::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
    const at::Tensor wide = x.scalar_type() == at::kHalf ? x.to(at::kFloat) : x;
    TORCH_CHECK(wide.scalar_type() == at::kFloat || wide.scalar_type() == at::kBFloat16,
                "x must be float32, bfloat16 or float16, got ", x.scalar_type());
    return wide.contiguous();
}

uint8_t* bytes(const at::Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

// One call of the C entry point on x viewed as (batch, m, n); the same thread policy as mx_cpu._launch.
void launch(const at::Tensor& x, int64_t batch, int64_t m, int64_t n, int mode, int64_t block_size,
            const Format& f, uint8_t* data, uint8_t* scale, uint8_t* data2, uint8_t* scale2) {
    const int64_t per_thread = x.numel() / min_elements_per_thread;
    const int threads = per_thread < 2 ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), per_thread));
    kernel(x.data_ptr(), x.scalar_type() == at::kFloat ? 0 : 1, batch, m, n, static_cast<int>(block_size), mode,
           f.emax, f.mbits, f.elem_bias, f.rceil, f.top_byte, f.max_pos, f.magic, f.magic_bits, f.nan_code, data,
           scale, data2, scale2, threads, isa);
}

// The cast of the prepared x along dim >= 0 into contiguous data (x's shape) and scale (ceil along dim).
void cast_into(const at::Tensor& x, int64_t block_size, int64_t dim, const Format& f, const at::Tensor& data,
               const at::Tensor& scale) {
    if (x.numel() == 0) return;
    int64_t outer = 1, inner = 1;
    for (int64_t i = 0; i < dim; ++i) outer *= x.size(i);
    for (int64_t i = dim + 1; i < x.dim(); ++i) inner *= x.size(i);
    const int64_t n = x.size(dim);
    // blocks along a dim with elements after it: columns of (outer, n, inner); else rows of (outer, n)
    if (inner > 1)
        launch(x, outer, n, inner, MODE_COLUMNS, block_size, f, bytes(data), bytes(scale), nullptr, nullptr);
    else
        launch(x, 1, outer, n, MODE_ROWS, block_size, f, bytes(data), bytes(scale), nullptr, nullptr);
}

std::vector<int64_t> scale_sizes(const at::Tensor& x, int64_t block_size, int64_t dim) {
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes[dim] = (sizes[dim] + block_size - 1) / block_size;
    return sizes;
}

// mx_cast_ref(x, elem_dtype, block_size, scale_mode, dim) as (codes as elem_dtype, uint8 scales); dim >= 0.
std::tuple<at::Tensor, at::Tensor> mx_cast_cxx(const at::Tensor& x_in, at::ScalarType elem_dtype,
                                               int64_t block_size, c10::string_view scale_mode, int64_t dim) {
    const Format& f = format_of(elem_dtype, scale_mode);
    const at::Tensor x = prepare(x_in);
    TORCH_CHECK(dim >= 0 && dim < x.dim(), "dim out of range: ", dim);
    at::Tensor data = at::empty(x.sizes(), x.options().dtype(elem_dtype));
    at::Tensor scale = at::empty(scale_sizes(x, block_size, dim), x.options().dtype(at::kByte));
    cast_into(x, block_size, dim, f, data, scale);
    return {data, scale};
}

void check_out(const at::Tensor& out, const char* name, at::IntArrayRef sizes, at::ScalarType dtype) {
    TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == dtype && out.sizes() == sizes,
                name, " must be a contiguous CPU tensor of dtype ", dtype, " and shape ", sizes, ", got ",
                out.scalar_type(), " ", out.sizes());
}

// mx_cast_cxx writing into data and scale (fresh, contiguous): the out-variant a compiled graph calls, so
// that inductor allocates the outputs itself and checks nothing after the call.
void mx_cast_cxx_out(const at::Tensor& x_in, at::ScalarType elem_dtype, int64_t block_size,
                     c10::string_view scale_mode, int64_t dim, const at::Tensor& data, const at::Tensor& scale) {
    const Format& f = format_of(elem_dtype, scale_mode);
    const at::Tensor x = prepare(x_in);
    TORCH_CHECK(dim >= 0 && dim < x.dim(), "dim out of range: ", dim);
    check_out(data, "data", x.sizes(), elem_dtype);
    check_out(scale, "scale", scale_sizes(x, block_size, dim), at::kByte);
    cast_into(x, block_size, dim, f, data, scale);
}

// Both casts of a 2-D x (M, N) from one pass into contiguous outputs: (row codes, row scales, column
// codes, column scales).
void rows_cols_into(const at::Tensor& x, int64_t block_size, const Format& f, const at::Tensor& row_data,
                    const at::Tensor& row_scale, const at::Tensor& col_data, const at::Tensor& col_scale) {
    if (x.numel() != 0)
        launch(x, 1, x.size(0), x.size(1), MODE_BOTH, block_size, f, bytes(row_data), bytes(row_scale),
               bytes(col_data), bytes(col_scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mx_cast_rows_cols_cxx(const at::Tensor& x_in,
                                                                                  at::ScalarType elem_dtype,
                                                                                  int64_t block_size,
                                                                                  c10::string_view scale_mode) {
    const Format& f = format_of(elem_dtype, scale_mode);
    const at::Tensor x = prepare(x_in);
    TORCH_CHECK(x.dim() == 2, "x must be 2-D, got ", x.dim(), " dims");
    const int64_t m = x.size(0), n = x.size(1);
    const auto codes = x.options().dtype(elem_dtype), scales = x.options().dtype(at::kByte);
    at::Tensor row_data = at::empty({m, n}, codes), row_scale = at::empty({m, (n + block_size - 1) / block_size}, scales);
    at::Tensor col_data = at::empty({m, n}, codes), col_scale = at::empty({(m + block_size - 1) / block_size, n}, scales);
    rows_cols_into(x, block_size, f, row_data, row_scale, col_data, col_scale);
    return {row_data, row_scale, col_data, col_scale};
}

// mx_cast_rows_cols_cxx writing into fresh contiguous outputs: the out-variant compiled graphs call.
void mx_cast_rows_cols_cxx_out(const at::Tensor& x_in, at::ScalarType elem_dtype, int64_t block_size,
                               c10::string_view scale_mode, const at::Tensor& row_data, const at::Tensor& row_scale,
                               const at::Tensor& col_data, const at::Tensor& col_scale) {
    const Format& f = format_of(elem_dtype, scale_mode);
    const at::Tensor x = prepare(x_in);
    TORCH_CHECK(x.dim() == 2, "x must be 2-D, got ", x.dim(), " dims");
    const int64_t m = x.size(0), n = x.size(1);
    check_out(row_data, "row_data", {m, n}, elem_dtype);
    check_out(row_scale, "row_scale", {m, (n + block_size - 1) / block_size}, at::kByte);
    check_out(col_data, "col_data", {m, n}, elem_dtype);
    check_out(col_scale, "col_scale", {(m + block_size - 1) / block_size, n}, at::kByte);
    rows_cols_into(x, block_size, f, row_data, row_scale, col_data, col_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(shared_kernels, CPU, m) {
    m.impl("mx_cast_cxx", mx_cast_cxx);
    m.impl("mx_cast_cxx_out", mx_cast_cxx_out);
    m.impl("mx_cast_rows_cols_cxx", mx_cast_rows_cols_cxx);
    m.impl("mx_cast_rows_cols_cxx_out", mx_cast_rows_cols_cxx_out);
}

// The set-up ops take no tensor (a catch-all kernel) and are internal: defined here, called by mx_cpu.py.
TORCH_LIBRARY_FRAGMENT(shared_kernels, m) {
    m.def("mx_cast_cxx_configure(int kernel, int min_elements_per_thread, int isa) -> ()", configure);
    m.def("mx_cast_cxx_set_format(ScalarType elem_dtype, str scale_mode, int emax, int mbits, int elem_bias,"
          " int rceil, int top_byte, float max_pos, float magic, int magic_bits, int nan_code) -> ()",
          set_format);
}
