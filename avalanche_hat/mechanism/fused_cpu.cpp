// Fused CPU kernels for the per-step vector work of a HAT layer, built on first use by
// avalanche_hat/mechanism/fused.py (torch.utils.cpp_extension). Each is one loop where the PyTorch
// version is a chain of small operations: on a CPU their dispatch, not their arithmetic, is the cost.
// Float32 and float64, contiguous, CPU only; the Python side falls back to PyTorch operations
// for anything else.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// dL/de of Eq. 3 per unit of dL/da: s_max / (2 (cosh e + 1)), times exp(min(0, c - s |e|)) (the original
// code's clamp of s e at c). 2 (cosh a + 1) = e^a (1 + e^-a)^2, so with q = e^-|e| in (0, 1] the factor
// is s_max q / (1 + q)^2: finite for every e (0 where |e| is huge).
template <typename T>
inline T compensation(T e, T scale, T max_scale, T saturation, bool saturate) {
  const T a = std::abs(e);
  const T q = std::exp(-a);
  const T p = T(1) + q;
  T k = max_scale * q / (p * p);
  if (saturate) {
    const T excess = scale * a - saturation;
    if (excess > T(0)) k *= std::exp(-excess);
  }
  return k;
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name, " must be float32 or float64");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Row task_id of the (tasks x units) gradient of the embedding: grad_mask times the factor above.
// Returns the full-size gradient (zeros elsewhere), as autograd expects for the whole embedding.
at::Tensor compensated_embedding_grad(const at::Tensor& grad_mask, const at::Tensor& embedding, int64_t task_id,
                                      double scale, double max_scale, double saturation, bool saturate) {
  check(embedding, "embedding");
  const at::Tensor grad = grad_mask.to(embedding.scalar_type()).contiguous();
  const int64_t units = embedding.size(1);
  TORCH_CHECK(grad.numel() == units, "the mask gradient has ", grad.numel(), " units, the embedding ", units);
  at::Tensor out = at::zeros_like(embedding);
  AT_DISPATCH_FLOATING_TYPES(embedding.scalar_type(), "hat_compensated_grad", [&] {
    const scalar_t* e = embedding.data_ptr<scalar_t>() + task_id * units;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>() + task_id * units;
    const auto s = static_cast<scalar_t>(scale), m = static_cast<scalar_t>(max_scale);
    const auto c = static_cast<scalar_t>(saturation);
    for (int64_t j = 0; j < units; ++j) o[j] = g[j] * compensation(e[j], s, m, c, saturate);
  });
  return out;
}

// a = sigmoid(s e_t) (Eq. 1), row task_id of the (tasks x units) embedding.
at::Tensor soft_mask_values(const at::Tensor& embedding, int64_t task_id, double scale) {
  check(embedding, "embedding");
  TORCH_CHECK(embedding.dim() == 2 && task_id >= 0 && task_id < embedding.size(0), "task ", task_id,
              " is not a row of the mask embedding");
  const int64_t units = embedding.size(1);
  at::Tensor mask = at::empty({units}, embedding.options());
  AT_DISPATCH_FLOATING_TYPES(embedding.scalar_type(), "hat_soft_mask", [&] {
    const scalar_t* e = embedding.data_ptr<scalar_t>() + task_id * units;
    scalar_t* a = mask.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    for (int64_t j = 0; j < units; ++j) a[j] = scalar_t(1) / (scalar_t(1) + std::exp(-s * e[j]));
  });
  return mask;
}

// What a node needs from forward to backward for the embedding's gradient (Eq. 3), and that gradient.
void save_mask_arguments(AutogradContext* ctx, int64_t task_id, double scale, double max_scale, double saturation,
                         bool saturate) {
  ctx->saved_data["task_id"] = task_id;
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["max_scale"] = max_scale;
  ctx->saved_data["saturation"] = saturation;
  ctx->saved_data["saturate"] = saturate;
}

at::Tensor saved_embedding_grad(AutogradContext* ctx, const at::Tensor& grad_mask, const at::Tensor& embedding) {
  return compensated_embedding_grad(grad_mask, embedding, ctx->saved_data["task_id"].toInt(),
                                    ctx->saved_data["scale"].toDouble(), ctx->saved_data["max_scale"].toDouble(),
                                    ctx->saved_data["saturation"].toDouble(), ctx->saved_data["saturate"].toBool());
}

// The soft mask whose backward is the compensated gradient of Eq. 3.
struct SoftMask : public torch::autograd::Function<SoftMask> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& embedding, int64_t task_id, double scale,
                            double max_scale, double saturation, bool saturate) {
    at::Tensor mask = soft_mask_values(embedding, task_id, scale);
    ctx->save_for_backward({embedding});
    save_mask_arguments(ctx, task_id, scale, max_scale, saturation, saturate);
    return mask;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor grad = saved_embedding_grad(ctx, grads[0], ctx->get_saved_variables()[0]);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor soft_mask(const at::Tensor& embedding, int64_t task_id, double scale, double max_scale,
                     double saturation, bool saturate) {
  return SoftMask::apply(embedding, task_id, scale, max_scale, saturation, saturate);
}

// Units whose 0/1 ownership is on, as indices.
std::vector<int64_t> owned_indices(const at::Tensor& owned, bool on) {
  const at::Tensor flags = owned.to(at::kDouble).contiguous();
  const double* f = flags.data_ptr<double>();
  std::vector<int64_t> rows;
  for (int64_t i = 0, n = flags.numel(); i < n; ++i)
    if ((f[i] > 0) == on) rows.push_back(i);
  return rows;
}

at::Tensor index_tensor(const std::vector<int64_t>& rows) {
  return at::tensor(at::IntArrayRef(rows), at::TensorOptions().dtype(at::kLong));
}

// The column mask of a restore or a zeroing: all bits set at the listed columns, none elsewhere.
template <typename Bits>
std::vector<Bits> column_mask(const int64_t* cols, int64_t ncols, int64_t row_len) {
  std::vector<Bits> mask(row_len, Bits(0));
  for (int64_t j = 0; j < ncols; ++j) mask[cols[j]] = ~Bits(0);
  return mask;
}

// Dense enough columns (one in eight or more) touch every cache line of a row anyway: the row is
// then read whole, branch-free, against a column mask (loops the compiler vectorises) rather than
// gathered entry by entry.
inline bool dense_columns(int64_t ncols, int64_t row_len) { return ncols > 0 && 8 * ncols >= row_len; }

// The weight gradient of F.linear, grad2d^T x2d, with Eq. 2 applied by index: rows of owned outputs
// are zeroed where their input is owned too (the whole row when the inputs' ownership is unknown).
// Once a third or more of the outputs are owned with every input owned, the frozen rows' share of
// the product is skipped. The same operations, in the same order, as masks._nullified_weight_grad.
at::Tensor nullified_weight_grad(const at::Tensor& grad2d, const at::Tensor& x2d, const at::Tensor& out_owned,
                                 const at::Tensor& in_owned) {
  const std::vector<int64_t> rows = owned_indices(out_owned, true);
  const int64_t outputs = out_owned.numel();
  const bool many = !rows.empty() && 3 * static_cast<int64_t>(rows.size()) >= outputs;
  const bool inputs_all_owned = !in_owned.defined() || owned_indices(in_owned, false).empty();
  if (many && inputs_all_owned) {
    const std::vector<int64_t> free = owned_indices(out_owned, false);
    at::Tensor grad_w = at::zeros({grad2d.size(1), x2d.size(1)}, grad2d.options());
    if (!free.empty()) {
      const at::Tensor index = index_tensor(free);
      grad_w.index_copy_(0, index, grad2d.index_select(1, index).t().mm(x2d));
    }
    return grad_w;
  }
  at::Tensor grad_w = grad2d.t().mm(x2d);
  if (rows.empty()) return grad_w;
  if (!in_owned.defined()) return grad_w.index_fill_(0, index_tensor(rows), 0.0);
  if (grad_w.is_contiguous() && (grad_w.scalar_type() == at::kFloat || grad_w.scalar_type() == at::kDouble)) {
    // One pass over the owned rows, zeroing their owned inputs in place (the same zeros as the
    // gather, masked fill and scatter below, without their two row-sized copies).
    const std::vector<int64_t> cols = owned_indices(in_owned, true);
    if (cols.empty()) return grad_w;
    const int64_t n = grad_w.size(1);
    const int64_t ncols = static_cast<int64_t>(cols.size());
    const bool dense = dense_columns(ncols, n);
    AT_DISPATCH_FLOATING_TYPES(grad_w.scalar_type(), "hat_zero_owned_entries", [&] {
      using Bits = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
      const std::vector<Bits> mask = dense ? column_mask<Bits>(cols.data(), ncols, n) : std::vector<Bits>();
      const Bits* __restrict__ m = mask.data();
      scalar_t* g = grad_w.data_ptr<scalar_t>();
      at::parallel_for(0, static_cast<int64_t>(rows.size()), 16, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          scalar_t* row = g + rows[k] * n;
          if (dense) {  // +0.0 has no bits set: clearing the masked bits writes exactly the zeros below
            Bits* __restrict__ bits = reinterpret_cast<Bits*>(row);
            for (int64_t j = 0; j < n; ++j) bits[j] &= ~m[j];
          } else {
            for (const int64_t c : cols) row[c] = scalar_t(0);
          }
        }
      });
    });
    return grad_w;
  }
  const at::Tensor index = index_tensor(rows);
  return grad_w.index_copy_(0, index, grad_w.index_select(0, index).masked_fill_(in_owned > 0, 0.0));
}

// A HAT linear layer's training step as one autograd node: (F.linear(x, weight, bias), the soft
// mask), with Eq. 2 on the weight and bias gradients and Eq. 3 on the embedding's. The Python
// version is masks._MaskedNullifiedLinear; this one gives the same bits without its interpreter work.
struct MaskedNullifiedLinear : public torch::autograd::Function<MaskedNullifiedLinear> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& embedding, const at::Tensor& out_owned,
                               const at::Tensor& in_owned, int64_t task_id, double scale, double max_scale,
                               double saturation, bool saturate) {
    const at::Tensor mask = soft_mask_values(embedding, task_id, scale);
    // An absent bias or input ownership arrives as an empty tensor (autograd functions take no undefined ones).
    const bool has_bias = bias.numel() > 0, has_in_owned = in_owned.numel() > 0;
    ctx->save_for_backward({x, weight, out_owned, in_owned, embedding});
    ctx->saved_data["has_in_owned"] = has_in_owned;
    save_mask_arguments(ctx, task_id, scale, max_scale, saturation, saturate);
    ctx->saved_data["has_bias"] = has_bias;
    return {at::linear(x, weight, has_bias ? c10::optional<at::Tensor>(bias) : c10::nullopt), mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &out_owned = saved[2];
    const at::Tensor in_owned = ctx->saved_data["has_in_owned"].toBool() ? saved[3] : at::Tensor();
    const at::Tensor& embedding = saved[4];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_w, grad_b, grad_e;
    if (ctx->needs_input_grad(0)) grad_x = grad.matmul(weight);
    const at::Tensor grad2d = grad.reshape({-1, grad.size(-1)});
    if (ctx->needs_input_grad(1))
      grad_w = nullified_weight_grad(grad2d, x.reshape({-1, x.size(-1)}), out_owned, in_owned);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))
      grad_b = grad2d.sum(0).mul_(1.0 - out_owned);
    if (ctx->needs_input_grad(3))
      grad_e = saved_embedding_grad(ctx, grads[1], embedding);
    return {grad_x, grad_w, grad_b, grad_e, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::vector<at::Tensor> masked_nullified_linear(const at::Tensor& x, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias, const at::Tensor& embedding,
                                                const at::Tensor& out_owned, const c10::optional<at::Tensor>& in_owned,
                                                int64_t task_id, double scale, double max_scale, double saturation,
                                                bool saturate) {
  const at::Tensor none = at::empty({0}, weight.options());
  return MaskedNullifiedLinear::apply(x, weight, bias.value_or(none), embedding, out_owned,
                                      in_owned.has_value() ? *in_owned : none, task_id, scale, max_scale,
                                      saturation, saturate);
}

template <typename T>
inline void scale_row(T* __restrict__ out, const T* __restrict__ in, const T* __restrict__ factor, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = in[j] * factor[j];
}

template <typename T>
inline void accumulate_product(T* __restrict__ sum, const T* __restrict__ u, const T* __restrict__ v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] += u[j] * v[j];
}

// data * mask along the last axis, on PyTorch's threads. Its backward is one pass over the upstream
// gradient for both results: d data = grad * mask and d mask = sum over rows of grad * data.
struct MaskLastAxis : public torch::autograd::Function<MaskLastAxis> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& data, const at::Tensor& mask) {
    check(data, "data");
    check(mask, "mask");
    TORCH_CHECK(data.scalar_type() == mask.scalar_type(), "data and mask must have one dtype");
    const int64_t units = mask.numel();
    TORCH_CHECK(data.dim() >= 1 && data.size(-1) == units, "the mask has ", units,
                " units but the last axis of the data has ", data.dim() ? data.size(-1) : 0);
    at::Tensor out = at::empty_like(data);
    const int64_t rows = units ? data.numel() / units : 0;
    AT_DISPATCH_FLOATING_TYPES(data.scalar_type(), "hat_mask_last_axis", [&] {
      const scalar_t* x = data.data_ptr<scalar_t>();
      const scalar_t* a = mask.data_ptr<scalar_t>();
      scalar_t* y = out.data_ptr<scalar_t>();
      // Threads over rows where PyTorch's own elementwise operations would use them too.
      at::parallel_for(0, rows, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(units, 1)),
                       [&](int64_t r0, int64_t r1) {
                         for (int64_t r = r0; r < r1; ++r) scale_row(y + r * units, x + r * units, a, units);
                       });
    });
    ctx->save_for_backward({data, mask});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& data = saved[0];
    const at::Tensor& mask = saved[1];
    const at::Tensor grad = grads[0].to(data.scalar_type()).contiguous();
    const bool want_data = ctx->needs_input_grad(0), want_mask = ctx->needs_input_grad(1);
    const int64_t units = mask.numel();
    const int64_t rows = units ? data.numel() / units : 0;
    at::Tensor grad_data = want_data ? at::empty_like(data) : at::Tensor();
    at::Tensor grad_mask = want_mask ? at::empty_like(mask) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(data.scalar_type(), "hat_mask_last_axis_backward", [&] {
      const scalar_t* g = grad.data_ptr<scalar_t>();
      const scalar_t* x = data.data_ptr<scalar_t>();
      const scalar_t* a = mask.data_ptr<scalar_t>();
      scalar_t* gx = want_data ? grad_data.data_ptr<scalar_t>() : nullptr;
      // d mask: each block of kBlock rows is summed in the data's precision (a loop the compiler
      // vectorises), the blocks' sums in double and in block order. The rounding error does not grow
      // with the number of rows, and the result does not depend on the number of threads.
      constexpr int64_t kBlock = 64;
      const int64_t blocks = (rows + kBlock - 1) / kBlock;
      std::vector<scalar_t> partial(want_mask ? blocks * units : 0, scalar_t(0));
      at::parallel_for(0, blocks, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(kBlock * units, 1)),
                       [&](int64_t b0, int64_t b1) {
                         for (int64_t b = b0; b < b1; ++b) {
                           for (int64_t r = b * kBlock, end = std::min(rows, r + kBlock); r < end; ++r) {
                             if (want_data) scale_row(gx + r * units, g + r * units, a, units);
                             if (want_mask) accumulate_product(partial.data() + b * units, g + r * units, x + r * units, units);
                           }
                         }
                       });
      if (want_mask) {
        std::vector<double> total(units, 0.0);
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t j = 0; j < units; ++j) total[j] += static_cast<double>(partial[b * units + j]);
        scalar_t* gm = grad_mask.data_ptr<scalar_t>();
        for (int64_t j = 0; j < units; ++j) gm[j] = static_cast<scalar_t>(total[j]);
      }
    });
    return {grad_data, grad_mask};
  }
};

at::Tensor mask_last_axis(const at::Tensor& data, const at::Tensor& mask) { return MaskLastAxis::apply(data, mask); }

// Clamp the embedding to [-bound, bound] in place, outside autograd (as ``.data.clamp_`` does).
void clamp_embedding(const at::Tensor& embedding, double bound) {
  check(embedding, "embedding");
  AT_DISPATCH_FLOATING_TYPES(embedding.scalar_type(), "hat_clamp_embedding", [&] {
    scalar_t* e = embedding.data_ptr<scalar_t>();
    const auto c = static_cast<scalar_t>(bound);
    for (int64_t j = 0, n = embedding.numel(); j < n; ++j) e[j] = e[j] > c ? c : (e[j] < -c ? -c : e[j]);
  });
}


// The guard's restore (avalanche_hat/guard.py): copy ``ref`` back into ``weight`` at the protected
// entries, i.e. the rows ``rows`` of their (out, K) views and, in each of those rows, the columns
// ``cols`` (every column when ``cols`` is empty). Only owned rows are visited, and an entry is written
// only where its bits differ from the reference, so a step that moved nothing protected (zero
// gradients, no state) reads the owned part once and dirties no memory. Bits, not values, are
// compared: -0.0 against 0.0 and NaNs are copied exactly.
template <typename T, typename Bits>
bool restore_rows_impl(T* w, const T* r, int64_t row_len, const int64_t* rows, int64_t nrows,
                       const int64_t* cols, int64_t ncols) {
  std::atomic<bool> wrote{false};
  const bool dense = dense_columns(ncols, row_len);
  const std::vector<Bits> mask = dense ? column_mask<Bits>(cols, ncols, row_len) : std::vector<Bits>();
  const Bits* __restrict__ m = mask.data();
  at::parallel_for(0, nrows, 16, [&](int64_t begin, int64_t end) {
    bool changed = false;
    for (int64_t k = begin; k < end; ++k) {
      Bits* __restrict__ wr = reinterpret_cast<Bits*>(w + rows[k] * row_len);
      const Bits* __restrict__ rr = reinterpret_cast<const Bits*>(r + rows[k] * row_len);
      if (ncols == 0) {
        if (std::memcmp(wr, rr, sizeof(T) * row_len) != 0) {
          std::memcpy(wr, rr, sizeof(T) * row_len);
          changed = true;
        }
        continue;
      }
      if (dense) {
        Bits diff = 0;
        for (int64_t j = 0; j < row_len; ++j) diff |= (wr[j] ^ rr[j]) & m[j];
        if (diff != 0) {
          for (int64_t j = 0; j < row_len; ++j) wr[j] = (wr[j] & ~m[j]) | (rr[j] & m[j]);
          changed = true;
        }
        continue;
      }
      for (int64_t j = 0; j < ncols; ++j) {
        const int64_t c = cols[j];
        if (wr[c] != rr[c]) {
          wr[c] = rr[c];
          changed = true;
        }
      }
    }
    if (changed) wrote.store(true, std::memory_order_relaxed);
  });
  return wrote.load();
}

bool restore_rows(const at::Tensor& weight, const at::Tensor& ref, const at::Tensor& rows, const at::Tensor& cols) {
  check(weight, "weight");
  check(ref, "reference");
  TORCH_CHECK(weight.scalar_type() == ref.scalar_type() && weight.sizes() == ref.sizes(),
              "the reference must match the weight");
  TORCH_CHECK(weight.dim() >= 1, "weight must have an output dimension");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.dim() == 1, "rows: int64 vector");
  TORCH_CHECK(cols.scalar_type() == at::kLong && cols.is_contiguous() && cols.dim() == 1, "cols: int64 vector");
  const int64_t out = weight.size(0);
  const int64_t row_len = out ? weight.numel() / out : 0;
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  for (int64_t k = 0; k < rows.numel(); ++k) TORCH_CHECK(rp[k] >= 0 && rp[k] < out, "row index out of range");
  for (int64_t j = 0; j < cols.numel(); ++j) TORCH_CHECK(cp[j] >= 0 && cp[j] < row_len, "column index out of range");
  bool wrote;
  if (weight.scalar_type() == at::kFloat) {
    wrote = restore_rows_impl<float, uint32_t>(weight.data_ptr<float>(), ref.data_ptr<float>(), row_len, rp, rows.numel(),
                                       cp, cols.numel());
  } else {
    wrote = restore_rows_impl<double, uint64_t>(weight.data_ptr<double>(), ref.data_ptr<double>(), row_len, rp,
                                                rows.numel(), cp, cols.numel());
  }
  // An in-place write, as far as autograd's saved-tensor checks are concerned (torch.where(out=) bumps it too).
  if (wrote) torch::autograd::impl::bump_version(weight);
  return wrote;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("soft_mask", &soft_mask);
  m.def("compensated_embedding_grad", &compensated_embedding_grad);
  m.def("mask_last_axis", &mask_last_axis);
  m.def("clamp_embedding", &clamp_embedding);
  m.def("masked_nullified_linear", &masked_nullified_linear);
  m.def("restore_rows", &restore_rows);
}
