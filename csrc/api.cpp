// pybind11 bindings of the CUDA kernels: module simcse_kernels._cuda_ext.
//
// Plain C++ (no CUDA, no torch header): every tensor arrives as an "operand" tuple
// (data_ptr, dtype_code, rows, row_stride, inv_norm_ptr) of Python ints, scalars as ints/floats,
// the CUDA stream as the integer torch.cuda.current_stream().cuda_stream. Each function checks
// its arguments and raises ValueError with the offending name before anything touches the GPU,
// then calls a launcher of launchers.h and raises RuntimeError if the launch failed.
// The Python side (simcse_kernels/ops/cuda_loss.py) validates the tensors themselves (device,
// dtype, contiguity, shapes); these checks are the last line against bad pointers and sizes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "launchers.h"

#ifndef SIMCSE_CUDA_ARCHS
#define SIMCSE_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using simcse::Operand;

namespace {

using OperandTuple = std::tuple<uintptr_t, int, int64_t, int64_t, uintptr_t>;

constexpr int64_t kMaxRows = int64_t(INT_MAX) * 8;  // grid.x = ceil(rows / 64) and ceil(rows / 8) fit in 2^31 - 1
constexpr int kMaxSplits = 65535;                   // grid.y limit

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw std::invalid_argument("simcse_kernels._cuda_ext." + where + ": " + what);
}

int element_size(int dtype) { return dtype == simcse::kFloat32 ? 4 : 2; }

void check_dtype(const std::string& where, const std::string& name, int dtype) {
  if (dtype != simcse::kFloat32 && dtype != simcse::kFloat16 && dtype != simcse::kBFloat16) {
    std::ostringstream msg;
    msg << name << " dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " << dtype;
    fail(where, msg.str());
  }
}

void check_pointer(const std::string& where, const std::string& name, uintptr_t ptr, int align) {
  if (ptr == 0) fail(where, name + " is a null pointer");
  if (ptr % static_cast<uintptr_t>(align) != 0) {
    std::ostringstream msg;
    msg << name << " pointer 0x" << std::hex << ptr << std::dec << " is not aligned to " << align << " bytes";
    fail(where, msg.str());
  }
}

void check_dim(const std::string& where, int64_t dim) {
  if (dim < 1) fail(where, "dim (D) must be >= 1, got " + std::to_string(dim));
  if (dim > INT_MAX) fail(where, "dim (D) must be < 2^31, got " + std::to_string(dim));
}

/// Checks one operand; ``min_rows`` 0 allows an absent one (rows 0, pointers may be 0).
Operand to_operand(const std::string& where, const std::string& name, const OperandTuple& t, int64_t dim,
                   int64_t min_rows, bool needs_inv_norm) {
  Operand op{std::get<0>(t), std::get<1>(t), std::get<2>(t), std::get<3>(t), std::get<4>(t)};
  check_dtype(where, name, op.dtype);
  if (op.rows < min_rows || op.rows > kMaxRows) {
    fail(where, name + " rows must be in [" + std::to_string(min_rows) + ", " + std::to_string(kMaxRows) +
                    "], got " + std::to_string(op.rows));
  }
  if (op.rows == 0) return op;
  if (op.stride < dim) {
    fail(where, name + " row stride must be >= dim (" + std::to_string(dim) + "), got " + std::to_string(op.stride));
  }
  check_pointer(where, name + ".data", op.data, element_size(op.dtype));
  if (needs_inv_norm) check_pointer(where, name + ".inv_norm", op.inv_norm, 4);
  return op;
}

void check_pair(const std::string& where, const Operand& rows, const Operand& cols) {
  const bool same = rows.dtype == cols.dtype;
  const bool one_f32 = rows.dtype == simcse::kFloat32 || cols.dtype == simcse::kFloat32;
  if (!same && !one_f32) {
    fail(where, "rows and cols dtypes must match or one must be float32 (got codes " + std::to_string(rows.dtype) +
                    " and " + std::to_string(cols.dtype) + ")");
  }
}

void check_pattern(const std::string& where, int pattern, const Operand& rows, const Operand& cols) {
  if (pattern < simcse::kPatternNone || pattern > simcse::kPatternMix4) {
    fail(where, "pattern must be 0 (none), 1 (hard), 2 (self), 3 (mix3) or 4 (mix4), got " + std::to_string(pattern));
  }
  if ((pattern == simcse::kPatternMix3 || pattern == simcse::kPatternMix4) && rows.rows != cols.rows) {
    fail(where, "MixCSE patterns need as many rows as columns, got " + std::to_string(rows.rows) + " and " +
                    std::to_string(cols.rows));
  }
}

void check_splits(const std::string& where, int n_splits) {
  if (n_splits < 1 || n_splits > kMaxSplits) {
    fail(where, "n_splits must be in [1, " + std::to_string(kMaxSplits) + "], got " + std::to_string(n_splits));
  }
}

void check_device(const std::string& where, int device) {
  if (device < 0) fail(where, "device index must be >= 0, got " + std::to_string(device));
}

/// The (rows, cols) operands of one logit block, checked: D, both operands, their dtype pair and
/// the block's pattern.
std::pair<Operand, Operand> block_operands(const std::string& where, const OperandTuple& rows,
                                           const OperandTuple& cols, int64_t dim, int pattern) {
  check_dim(where, dim);
  const Operand r = to_operand(where, "rows", rows, dim, 1, true);
  const Operand c = to_operand(where, "cols", cols, dim, 1, true);
  check_pair(where, r, c);
  check_pattern(where, pattern, r, c);
  return {r, c};
}

/// The softmax inputs of the backward kernels: tau, the row LSEs and weights, and the symmetric
/// loss's column LSEs and weights (both given or both 0).
void check_softmax_inputs(const std::string& where, uintptr_t tau, uintptr_t lse, uintptr_t row_weight,
                          uintptr_t col_lse, uintptr_t col_weight) {
  check_pointer(where, "tau", tau, 4);
  check_pointer(where, "lse", lse, 4);
  check_pointer(where, "row_weight", row_weight, 4);
  if ((col_lse == 0) != (col_weight == 0)) fail(where, "col_lse and col_weight must both be given or both be 0");
  if (col_lse != 0) {
    check_pointer(where, "col_lse", col_lse, 4);
    check_pointer(where, "col_weight", col_weight, 4);
  }
}

void raise_if_failed(const std::string& where, int code) {
  if (code != 0) {
    throw std::runtime_error("simcse_kernels._cuda_ext." + where + ": CUDA launch failed (" +
                             simcse::error_string(code) + ")");
  }
}

void row_inv_norms(const OperandTuple& x, int64_t dim, uintptr_t out, int device, uintptr_t stream) {
  const std::string where = "row_inv_norms";
  check_dim(where, dim);
  const Operand op = to_operand(where, "x", x, dim, 1, false);
  check_pointer(where, "out", out, 4);
  check_device(where, device);
  raise_if_failed(where, simcse::launch_row_inv_norms(op, dim, out, device, stream));
}

void lse_partials(const OperandTuple& rows, const OperandTuple& cols, int64_t dim, uintptr_t tau, double weight,
                  int pattern, int n_splits, uintptr_t out, int device, uintptr_t stream, uintptr_t labels,
                  int target_mode, int64_t target_col_offset, uintptr_t target_delta) {
  const std::string where = "lse_partials";
  const auto [r, c] = block_operands(where, rows, cols, dim, pattern);
  check_splits(where, n_splits);
  check_pointer(where, "tau", tau, 4);
  check_pointer(where, "out", out, 4);
  if (target_mode < simcse::kTargetNone || target_mode > simcse::kTargetCols) {
    fail(where, "target_mode must be 0 (none), 1 (rows) or 2 (cols), got " + std::to_string(target_mode));
  }
  if (target_mode != simcse::kTargetNone) {
    check_pointer(where, "labels", labels, 8);
    check_pointer(where, "target_delta", target_delta, 4);
    if (target_mode == simcse::kTargetRows && target_col_offset < 0) {
      fail(where, "target_mode 1 (rows) needs target_col_offset >= 0, got " + std::to_string(target_col_offset));
    }
  }
  check_device(where, device);
  raise_if_failed(where, simcse::launch_lse_partials(r, c, dim, tau, static_cast<float>(weight), pattern, n_splits,
                                                     out, labels, target_mode, target_col_offset, target_delta,
                                                     device, stream));
}

void block_backward(const OperandTuple& rows, const OperandTuple& cols, int64_t dim, uintptr_t tau, double weight,
                    int pattern, uintptr_t lse, uintptr_t row_weight, uintptr_t col_lse, uintptr_t col_weight,
                    uintptr_t grad_rows, uintptr_t grad_cols, uintptr_t dtau_acc, int n_splits, int device,
                    uintptr_t stream, uintptr_t labels, int64_t target_col_offset, uintptr_t target_delta,
                    uintptr_t target_grad) {
  const std::string where = "block_backward";
  const auto [r, c] = block_operands(where, rows, cols, dim, pattern);
  check_splits(where, n_splits);
  check_softmax_inputs(where, tau, lse, row_weight, col_lse, col_weight);
  if (grad_rows != 0) check_pointer(where, "grad_rows", grad_rows, 4);
  if (grad_cols != 0) check_pointer(where, "grad_cols", grad_cols, 4);
  check_pointer(where, "dtau_acc", dtau_acc, 8);
  if (target_col_offset < -1) {
    fail(where, "target_col_offset must be >= 0, or -1 for a block without margined targets, got " +
                    std::to_string(target_col_offset));
  }
  if (target_col_offset >= 0) {  // a margined block: labels and both per-row terms
    check_pointer(where, "labels", labels, 8);
    check_pointer(where, "target_delta", target_delta, 4);
    check_pointer(where, "target_grad", target_grad, 4);
  }
  check_device(where, device);
  raise_if_failed(where, simcse::launch_block_backward(r, c, dim, tau, static_cast<float>(weight), pattern, lse,
                                                       row_weight, col_lse, col_weight, grad_rows, grad_cols,
                                                       dtau_acc, n_splits, labels, target_col_offset, target_delta,
                                                       target_grad, device, stream));
}

void block_dlogits(const OperandTuple& rows, const OperandTuple& cols, int64_t dim, uintptr_t tau, double weight,
                   int pattern, int64_t row_start, int64_t row_end, uintptr_t lse, uintptr_t row_weight,
                   uintptr_t col_lse, uintptr_t col_weight, uintptr_t labels, uintptr_t g, int64_t target_col_offset,
                   uintptr_t out, int out_dtype, int64_t ld_out, int64_t out_col0, uintptr_t dtau_part,
                   int64_t n_tiles_total, int64_t tile_col0, int device, uintptr_t stream, uintptr_t target_delta,
                   uintptr_t target_grad) {
  const std::string where = "block_dlogits";
  const auto [r, c] = block_operands(where, rows, cols, dim, pattern);
  if (row_start < 0 || row_end <= row_start || row_end > r.rows) {
    fail(where, "need 0 <= row_start < row_end <= rows (" + std::to_string(r.rows) + "), got row_start " +
                    std::to_string(row_start) + " and row_end " + std::to_string(row_end));
  }
  if ((row_end - row_start + 63) / 64 > kMaxSplits) {
    fail(where, "a chunk may have at most " + std::to_string(int64_t(kMaxSplits) * 64) + " rows (grid.y), got " +
                    std::to_string(row_end - row_start));
  }
  check_softmax_inputs(where, tau, lse, row_weight, col_lse, col_weight);
  if (target_col_offset < -1) {
    fail(where, "target_col_offset must be >= 0, or -1 for a block without targets, got " +
                    std::to_string(target_col_offset));
  }
  if (target_col_offset >= 0) {
    check_pointer(where, "labels", labels, 8);
    check_pointer(where, "g", g, 4);
  }
  if ((target_delta == 0) != (target_grad == 0)) {
    fail(where, "target_delta and target_grad must both be given or both be 0");
  }
  if (target_delta != 0) {
    check_pointer(where, "target_delta", target_delta, 4);
    check_pointer(where, "target_grad", target_grad, 4);
  }
  if (out_dtype != simcse::kFloat32 && out_dtype != simcse::kBFloat16) {
    fail(where, "out_dtype code must be 0 (float32) or 2 (bfloat16), got " + std::to_string(out_dtype));
  }
  check_pointer(where, "out", out, element_size(out_dtype));
  if (out_col0 < 0 || ld_out < out_col0 + c.rows) {
    fail(where, "need out_col0 >= 0 and ld_out >= out_col0 + cols (" + std::to_string(c.rows) + "), got out_col0 " +
                    std::to_string(out_col0) + " and ld_out " + std::to_string(ld_out));
  }
  if (dtau_part != 0) {
    check_pointer(where, "dtau_part", dtau_part, 4);
    const int64_t tiles = (c.rows + 63) / 64;
    if (tile_col0 < 0 || n_tiles_total < tile_col0 + tiles) {
      fail(where, "need tile_col0 >= 0 and n_tiles_total >= tile_col0 + ceil(cols / 64) (" + std::to_string(tiles) +
                      "), got tile_col0 " + std::to_string(tile_col0) + " and n_tiles_total " +
                      std::to_string(n_tiles_total));
    }
  }
  check_device(where, device);
  raise_if_failed(where, simcse::launch_block_dlogits(r, c, dim, tau, static_cast<float>(weight), pattern, row_start,
                                                      row_end, lse, row_weight, col_lse, col_weight, labels, g,
                                                      target_col_offset, out, out_dtype, ld_out, out_col0, dtau_part,
                                                      n_tiles_total, tile_col0, target_delta, target_grad, device,
                                                      stream));
}

/// Shared checks of the target kernels: same dtype everywhere, negatives may be absent (rows 0).
void check_target_operands(const std::string& where, const Operand& a, const Operand& p, const Operand& n) {
  if (p.dtype != a.dtype || (n.rows > 0 && n.dtype != a.dtype)) {
    fail(where, "anchors, positives and negatives must share one dtype code");
  }
}

void target_cos(const OperandTuple& anchors, const OperandTuple& positives, const OperandTuple& negatives,
                int64_t dim, uintptr_t labels, uintptr_t out, int device, uintptr_t stream) {
  const std::string where = "target_cos";
  check_dim(where, dim);
  const Operand a = to_operand(where, "anchors", anchors, dim, 1, true);
  const Operand p = to_operand(where, "positives", positives, dim, 1, true);
  const Operand n = to_operand(where, "negatives", negatives, dim, 0, true);
  check_target_operands(where, a, p, n);
  check_pointer(where, "labels", labels, 8);
  check_pointer(where, "out", out, 4);
  check_device(where, device);
  raise_if_failed(where, simcse::launch_target_cos(a, p, n, dim, labels, out, device, stream));
}

void target_backward(const OperandTuple& anchors, const OperandTuple& positives, const OperandTuple& negatives,
                     int64_t dim, uintptr_t labels, uintptr_t g, uintptr_t grad_a, uintptr_t grad_p, uintptr_t grad_n,
                     int device, uintptr_t stream) {
  const std::string where = "target_backward";
  check_dim(where, dim);
  const Operand a = to_operand(where, "anchors", anchors, dim, 1, true);
  const Operand p = to_operand(where, "positives", positives, dim, 1, true);
  const Operand n = to_operand(where, "negatives", negatives, dim, 0, true);
  check_target_operands(where, a, p, n);
  check_pointer(where, "labels", labels, 8);
  check_pointer(where, "g", g, 4);
  check_pointer(where, "grad_a", grad_a, 4);
  check_pointer(where, "grad_p", grad_p, 4);
  if (n.rows > 0) check_pointer(where, "grad_n", grad_n, 4);
  check_device(where, device);
  raise_if_failed(where,
                  simcse::launch_target_backward(a, p, n, dim, labels, g, grad_a, grad_p, grad_n, device, stream));
}

void normalize_backward(const OperandTuple& x, int64_t dim, uintptr_t dz, uintptr_t tau, uintptr_t out, int device,
                        uintptr_t stream) {
  const std::string where = "normalize_backward";
  check_dim(where, dim);
  const Operand op = to_operand(where, "x", x, dim, 1, false);
  check_pointer(where, "dz", dz, 4);
  check_pointer(where, "tau", tau, 4);
  check_pointer(where, "out", out, element_size(op.dtype));
  check_device(where, device);
  raise_if_failed(where, simcse::launch_normalize_backward(op, dim, dz, tau, out, device, stream));
}

}  // namespace

PYBIND11_MODULE(_cuda_ext, m) {
  m.doc() =
      "CUDA kernels of simcse_kernels' 'cuda' backend (raw pointers; use simcse_kernels.ops.cuda_loss). "
      "Operands are tuples (data_ptr, dtype_code, rows, row_stride, inv_norm_ptr); dtype codes "
      "0 = float32, 1 = float16, 2 = bfloat16; patterns 0 none, 1 hard, 2 self, 3 mix3, 4 mix4.";
  m.attr("DTYPE_FLOAT32") = int(simcse::kFloat32);
  m.attr("DTYPE_FLOAT16") = int(simcse::kFloat16);
  m.attr("DTYPE_BFLOAT16") = int(simcse::kBFloat16);
  m.attr("PATTERN_NONE") = int(simcse::kPatternNone);
  m.attr("PATTERN_HARD") = int(simcse::kPatternHard);
  m.attr("PATTERN_SELF") = int(simcse::kPatternSelf);
  m.attr("PATTERN_MIX3") = int(simcse::kPatternMix3);
  m.attr("PATTERN_MIX4") = int(simcse::kPatternMix4);
  m.attr("TARGET_NONE") = int(simcse::kTargetNone);
  m.attr("TARGET_ROWS") = int(simcse::kTargetRows);
  m.attr("TARGET_COLS") = int(simcse::kTargetCols);
  m.attr("CUDA_ARCHS") = std::string(SIMCSE_CUDA_ARCHS);
  m.def("cuda_version", &simcse::compiled_cuda_version, "CUDART_VERSION the extension was compiled with.");
  m.def("runtime_status", &simcse::runtime_status,
        "'' when the extension's CUDA runtime sees a usable GPU, else the reason it does not.");
  m.def("row_inv_norms", &row_inv_norms, py::arg("x"), py::arg("dim"), py::arg("out"), py::arg("device"),
        py::arg("stream"), "out[i] = 1 / max(||x_i||, 1e-12) (float32).");
  m.def("lse_partials", &lse_partials, py::arg("rows"), py::arg("cols"), py::arg("dim"), py::arg("tau"),
        py::arg("weight"), py::arg("pattern"), py::arg("n_splits"), py::arg("out"), py::arg("device"),
        py::arg("stream"), py::arg("labels") = 0, py::arg("target_mode") = 0, py::arg("target_col_offset") = -1,
        py::arg("target_delta") = 0,
        "Partial row log-sum-exps of one logit block: out float32[n_splits, rows]; target_mode 1 (rows) / 2 "
        "(cols): the margins' target logits get + target_delta / tau.");
  m.def("block_backward", &block_backward, py::arg("rows"), py::arg("cols"), py::arg("dim"), py::arg("tau"),
        py::arg("weight"), py::arg("pattern"), py::arg("lse"), py::arg("row_weight"), py::arg("col_lse"),
        py::arg("col_weight"), py::arg("grad_rows"), py::arg("grad_cols"), py::arg("dtau_acc"), py::arg("n_splits"),
        py::arg("device"), py::arg("stream"), py::arg("labels") = 0, py::arg("target_col_offset") = -1,
        py::arg("target_delta") = 0, py::arg("target_grad") = 0,
        "Recomputing backward of one logit block; accumulates float32 gradients of the normalized rows.");
  m.def("block_dlogits", &block_dlogits, py::arg("rows"), py::arg("cols"), py::arg("dim"), py::arg("tau"),
        py::arg("weight"), py::arg("pattern"), py::arg("row_start"), py::arg("row_end"), py::arg("lse"),
        py::arg("row_weight"), py::arg("col_lse"), py::arg("col_weight"), py::arg("labels"), py::arg("g"),
        py::arg("target_col_offset"), py::arg("out"), py::arg("out_dtype"), py::arg("ld_out"), py::arg("out_col0"),
        py::arg("dtau_part"), py::arg("n_tiles_total"), py::arg("tile_col0"), py::arg("device"), py::arg("stream"),
        py::arg("target_delta") = 0, py::arg("target_grad") = 0,
        "dL/ds (times both inverse norms) of one logit block for a chunk of rows, and per column tile "
        "partials of sum dS cos (deterministic, no atomics).");
  m.def("target_cos", &target_cos, py::arg("anchors"), py::arg("positives"), py::arg("negatives"), py::arg("dim"),
        py::arg("labels"), py::arg("out"), py::arg("device"), py::arg("stream"),
        "out[i] = cos(anchors[i], candidates[labels[i]]) (float32).");
  m.def("target_backward", &target_backward, py::arg("anchors"), py::arg("positives"), py::arg("negatives"),
        py::arg("dim"), py::arg("labels"), py::arg("g"), py::arg("grad_a"), py::arg("grad_p"), py::arg("grad_n"),
        py::arg("device"), py::arg("stream"), "Target-logit part of the backward (float32 atomics).");
  m.def("normalize_backward", &normalize_backward, py::arg("x"), py::arg("dim"), py::arg("dz"), py::arg("tau"),
        py::arg("out"), py::arg("device"), py::arg("stream"),
        "dx = r (dz - z (z . dz)) / tau in x's dtype (out contiguous [rows, dim]).");
}
