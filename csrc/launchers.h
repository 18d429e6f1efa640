// Host-side entry points of the CUDA kernels, callable from plain C++ (csrc/api.cpp).
//
// No CUDA or torch type appears here: device pointers and the CUDA stream travel as uintptr_t,
// dtypes as small integer codes. Every launcher assumes its arguments were checked by api.cpp,
// selects ``device`` (cudaSetDevice), launches on ``stream`` and returns the cudaError_t of the
// launch as an int (0 = success; turn it into text with error_string).
#pragma once

#include <stdint.h>

#include <string>

namespace simcse {

/// Element types of the embedding matrices.
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

/// Constant-logit pattern of one block of the logit matrix (see csrc/block_kernels.cuh).
enum PatternCode : int {
  kPatternNone = 0,  // plain cosine logits
  kPatternHard = 1,  // +w at (i, i): the paired hard negative (column P + i of the full matrix)
  kPatternSelf = 2,  // -inf at (i, i): anchors as negatives, self excluded
  kPatternMix3 = 3,  // logit 0 at (i, (i-1) mod N), then +w at (i, i) (MixCSE mixed positives)
  kPatternMix4 = 4,  // logit 0 at (i, (i+1) mod N), then +w at (i, i) (MixCSE mixed anchors)
};

/// Where a block's target entries are (the margins' epilogue, csrc/tile.cuh: TargetTerms). Anchor
/// row a's target is column labels[a] of the full logit matrix.
enum TargetCode : int {
  kTargetNone = 0,  // no target entry in this block (or none that the launch must modify)
  kTargetRows = 1,  // entry (a, labels[a] - target_col_offset): anchors x positives / negatives
  kTargetCols = 2,  // entry (labels[a], a): the transposed positives block (positives x anchors)
};

/// One (rows, D) matrix operand as the kernels see it.
struct Operand {
  uintptr_t data;      // device pointer to the first element
  int dtype;           // DtypeCode
  int64_t rows;        // number of rows
  int64_t stride;      // elements between consecutive rows (>= D)
  uintptr_t inv_norm;  // device float32[rows]: 1 / max(||row||, 1e-12), or 0 where not needed yet
};

/// Human-readable text of a cudaError_t code.
std::string error_string(int code);

/// cudaGetDeviceCount's status: "" when at least one device is usable, else why not.
std::string runtime_status();

/// CUDART_VERSION the extension was compiled with (e.g. 13000).
int compiled_cuda_version();

/// out[i] = 1 / max(||x_i||, 1e-12) for every row of x (float32[x.rows]).
int launch_row_inv_norms(const Operand& x, int64_t dim, uintptr_t out, int device, uintptr_t stream);

/// Partial row log-sum-exps of one logit block rows x cols.
///
/// The block's logits are s_ij = (x_i . y_j) r_i r_j / tau, then ``pattern``'s constants.
/// Column tiles (64 wide) are dealt round-robin to ``n_splits`` CTAs per row tile; out is
/// float32[n_splits, rows.rows] and out[s, i] is the log-sum-exp of row i over split s's
/// columns (-inf if none). tau is a device float32 scalar.
///
/// Margins (target_mode != kTargetNone, TargetCode): the target entry of anchor row a gets
/// + target_delta[a] / tau, with target_delta float32[N] = f(c_a) - m - c_a (reference.py) and
/// labels int64[N]; kTargetNone ignores labels, target_col_offset and target_delta.
int launch_lse_partials(const Operand& rows, const Operand& cols, int64_t dim, uintptr_t tau, float weight,
                        int pattern, int n_splits, uintptr_t out, uintptr_t labels, int target_mode,
                        int64_t target_col_offset, uintptr_t target_delta, int device, uintptr_t stream);

/// Recomputing backward of one logit block (see csrc/block_backward.cu).
///
/// dS_ij = row_weight_i exp(s_ij - lse_i) [+ col_weight_j exp(s_ij - col_lse_j)], 0 on constant
/// logits. Accumulates (float32 atomics) grad_rows[i] += sum_j dS_ij y_hat_j,
/// grad_cols[j] += sum_i dS_ij x_hat_i (gradients w.r.t. the normalized rows, times tau) and
/// dtau_acc (float64 scalar) += sum_ij dS_ij cos_ij. grad_rows / grad_cols / col_lse may be 0.
///
/// Margins (target_col_offset >= 0: the block's target entries are (i, labels[i] - target_col_offset)):
/// the target logit gets + target_delta[i] / tau, its dS is multiplied by target_grad[i] = f'(c_i) and
/// its dtau term reads cos + target_delta[i] = f(c_i) - m. target_col_offset = -1: no margin here.
int launch_block_backward(const Operand& rows, const Operand& cols, int64_t dim, uintptr_t tau, float weight,
                          int pattern, uintptr_t lse, uintptr_t row_weight, uintptr_t col_lse,
                          uintptr_t col_weight, uintptr_t grad_rows, uintptr_t grad_cols, uintptr_t dtau_acc,
                          int n_splits, uintptr_t labels, int64_t target_col_offset, uintptr_t target_delta,
                          uintptr_t target_grad, int device, uintptr_t stream);

/// dL/ds of one logit block for the anchor rows [row_start, row_end) (see csrc/block_dlogits.cu).
///
/// dS_ij = row_weight_i exp(s_ij - lse_i) [+ col_weight_j exp(s_ij - col_lse_j)]
/// - g_i [labels[i] == target_col_offset + j] (target_col_offset < 0: no target in this block),
/// 0 on constant logits. Writes out[(i - row_start) * ld_out + out_col0 + j] = dS_ij r_i r_j in
/// out_dtype (kFloat32 or kBFloat16) and, unless dtau_part is 0, the float32 partial
/// dtau_part[(i - row_start) * n_tiles_total + tile_col0 + t] = sum over column tile t (64 wide)
/// of dS_ij cos_ij without the target's -g_i. No atomics. col_lse / col_weight may be 0 (both).
///
/// Margins (target_delta, target_grad float32[N], both given or both 0): the target logit gets
/// + target_delta[i] / tau, the target's dS (its -g_i included) is multiplied by target_grad[i] =
/// f'(c_i), and its dtau term reads cos + target_delta[i] = f(c_i) - m (still without -g_i).
int launch_block_dlogits(const Operand& rows, const Operand& cols, int64_t dim, uintptr_t tau, float weight,
                         int pattern, int64_t row_start, int64_t row_end, uintptr_t lse, uintptr_t row_weight,
                         uintptr_t col_lse, uintptr_t col_weight, uintptr_t labels, uintptr_t g,
                         int64_t target_col_offset, uintptr_t out, int out_dtype, int64_t ld_out, int64_t out_col0,
                         uintptr_t dtau_part, int64_t n_tiles_total, int64_t tile_col0, uintptr_t target_delta,
                         uintptr_t target_grad, int device, uintptr_t stream);

/// target_cos[i] = x_hat_i . c_hat_{labels[i]} with candidates c = [positives; negatives].
int launch_target_cos(const Operand& anchors, const Operand& positives, const Operand& negatives, int64_t dim,
                      uintptr_t labels, uintptr_t out, int device, uintptr_t stream);

/// Target-logit backward: grad_a[i] -= g_i c_hat_{l_i}, grad_c[l_i] -= g_i a_hat_i (float32 atomics;
/// with margins the caller passes g_i f'(c_i) as g_i).
int launch_target_backward(const Operand& anchors, const Operand& positives, const Operand& negatives,
                           int64_t dim, uintptr_t labels, uintptr_t g, uintptr_t grad_a, uintptr_t grad_p,
                           uintptr_t grad_n, int device, uintptr_t stream);

/// Normalization backward: out_i = r_i (dz_i - z_i (z_i . dz_i)) / tau with z_i = r_i x_i
/// (dz_i / (eps tau) when ||x_i|| < eps), written in x's dtype; dz float32[x.rows, dim], out
/// contiguous [x.rows, dim].
int launch_normalize_backward(const Operand& x, int64_t dim, uintptr_t dz, uintptr_t tau, uintptr_t out,
                              int device, uintptr_t stream);

}  // namespace simcse
