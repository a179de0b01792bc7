// Fused CPU kernels for the trainer's element-wise work on bf16 rows (see fused.py).
//
// Each kernel reads its inputs once and writes its outputs once, in fp32 registers between the two, where the
// equivalent chain of torch ops makes a pass over memory per op. Forwards round where torch's ops round, so they
// return the same values; backwards keep fp32 between what torch rounds to bf16 op by op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using bf16 = uint16_t;

inline float to_float(bf16 value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Round to nearest even, as c10::BFloat16 does; NaN stays NaN.
inline bf16 to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<bf16>(value != value ? 0x7FC0u : rounded);
}

inline float round_bf16(float value) { return to_float(to_bf16(value)); }

// expf within ~1 ulp (Cephes' range reduction and polynomial), written so that the compiler vectorises the loops
// that call it. From 88.4 it returns inf (expf overflows from 88.7); below -87.3, exp(-87.3).
inline float exp_f32(float x) {
  x = std::min(std::max(x, -87.3f), 89.0f);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t + (t < 0.0f ? -0.5f : 0.5f)));  // faster than floor
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

const bf16* input(const at::Tensor& tensor) { return reinterpret_cast<const bf16*>(tensor.const_data_ptr()); }
bf16* output(at::Tensor& tensor) { return reinterpret_cast<bf16*>(tensor.mutable_data_ptr()); }

void check_rows(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(tensor.scalar_type() == at::kBFloat16, name, " must be bf16, not ", tensor.scalar_type());
  TORCH_CHECK(tensor.is_contiguous(), name, " must be contiguous");
}

// Rows per parallel task: enough work per task to amortise scheduling.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// RMSNorm as transformers' Phi3RMSNorm computes it: y = bf16(weight * bf16(x * r)), r = rsqrt(mean(x²) + eps) in fp32.
// Returns y and r (fp32, x's shape with a last dimension of 1).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(weight, "weight");
  const int64_t width = x.size(-1);
  TORCH_CHECK(weight.numel() == width, "weight has ", weight.numel(), " values for rows of ", width);
  const int64_t rows = x.numel() / width;
  at::Tensor y = at::empty_like(x);
  std::vector<int64_t> scale_shape(x.sizes().begin(), x.sizes().end());
  scale_shape.back() = 1;
  at::Tensor scales = at::empty(scale_shape, x.options().dtype(at::kFloat));
  const bf16* xs = input(x);
  const bf16* ws = input(weight);
  bf16* ys = output(y);
  float* rs = scales.mutable_data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    const bf16* __restrict__ w = ws;
    for (int64_t row = begin; row < end; ++row) {
      const bf16* __restrict__ in = xs + row * width;
      bf16* __restrict__ out = ys + row * width;
      float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) {
        const float value = to_float(in[i]);
        squares += value * value;
      }
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(width) + epsilon);
      rs[row] = scale;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        out[i] = to_bf16(to_float(w[i]) * round_bf16(to_float(in[i]) * scale));
      }
    }
  });
  return {y, scales};
}

// The input gradient of rms_norm_forward: g' = grad * weight, dx = r * g' - x * r³ * mean(g' * x).
at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scales,
                             const at::Tensor& weight) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  check_rows(weight, "weight");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad and x differ in shape");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales must be contiguous fp32");
  const int64_t width = x.size(-1);
  const int64_t rows = x.numel() / width;
  TORCH_CHECK(scales.numel() == rows, "one scale per row");
  at::Tensor dx = at::empty_like(x);
  const bf16* gs = input(grad);
  const bf16* xs = input(x);
  const bf16* ws = input(weight);
  const float* rs = scales.const_data_ptr<float>();
  bf16* ds = output(dx);
  at::parallel_for(0, rows, grain(width), [&](int64_t begin, int64_t end) {
    const bf16* __restrict__ w = ws;
    for (int64_t row = begin; row < end; ++row) {
      const bf16* __restrict__ g = gs + row * width;
      const bf16* __restrict__ in = xs + row * width;
      bf16* __restrict__ out = ds + row * width;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < width; ++i) {
        dot += to_float(g[i]) * to_float(w[i]) * to_float(in[i]);
      }
      const float scale = rs[row];
      const float correction = dot * scale * scale * scale / static_cast<float>(width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        out[i] = to_bf16(to_float(g[i]) * to_float(w[i]) * scale - to_float(in[i]) * correction);
      }
    }
  });
  return dx;
}

// SwiGLU on a gate_up projection [..., 2n] (gate first, as Phi-3's gate_up_proj): bf16(up * bf16(silu(gate))).
at::Tensor swiglu_forward(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1) / 2;
  TORCH_CHECK(gate_up.size(-1) == 2 * width, "gate_up must have an even last dimension");
  const int64_t rows = gate_up.numel() / (2 * width);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = width;
  at::Tensor h = at::empty(shape, gate_up.options());
  const bf16* ins = input(gate_up);
  bf16* outs = output(h);
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bf16* __restrict__ gate = ins + row * 2 * width;
      const bf16* __restrict__ up = gate + width;
      bf16* __restrict__ out = outs + row * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = to_float(gate[i]);
        out[i] = to_bf16(to_float(up[i]) * round_bf16(g * sigmoid(g)));
      }
    }
  });
  return h;
}

// The gradient of swiglu_forward with respect to gate_up, [..., 2n], from the output's gradient [..., n].
at::Tensor swiglu_backward(const at::Tensor& grad, const at::Tensor& gate_up) {
  check_rows(grad, "grad");
  check_rows(gate_up, "gate_up");
  const int64_t width = grad.size(-1);
  TORCH_CHECK(gate_up.size(-1) == 2 * width && gate_up.numel() == 2 * grad.numel(), "gate_up must be grad's rows x2");
  const int64_t rows = grad.numel() / width;
  at::Tensor d_gate_up = at::empty_like(gate_up);
  const bf16* gs = input(grad);
  const bf16* ins = input(gate_up);
  bf16* outs = output(d_gate_up);
  at::parallel_for(0, rows, grain(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bf16* __restrict__ dh = gs + row * width;
      const bf16* __restrict__ gate = ins + row * 2 * width;
      const bf16* __restrict__ up = gate + width;
      bf16* __restrict__ d_gate = outs + row * 2 * width;
      bf16* __restrict__ d_up = d_gate + width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = to_float(gate[i]);
        const float s = sigmoid(g);
        const float d = to_float(dh[i]);
        d_up[i] = to_bf16(d * round_bf16(g * s));
        d_gate[i] = to_bf16(d * to_float(up[i]) * s * (1.0f + g * (1.0f - s)));
      }
    }
  });
  return d_gate_up;
}

// Calls visit(kind, packed, split, cos, sin) for every head of every row of a qkv projection [batch, tokens,
// (heads + 2 * kv_heads) * dim], rows in parallel: kind 0, 1 or 2 for a query, key or value head; packed, the head's
// offset in the projection; split, its offset in the [batch, heads of its kind, tokens, dim] tensor of its kind; cos
// and sin, the row's angles ([batch or 1, tokens, rotary dim]: one batch of angles serves every row; the rotary dim is
// the head dim or, with partial rotary, less).
template <typename Visit>
void for_each_head(const at::Tensor& cos, const at::Tensor& sin, int64_t batch, int64_t tokens, int64_t heads,
                   int64_t kv_heads, int64_t dim, const Visit& visit) {
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(), "cos and sin must be 3-d, of one shape");
  TORCH_CHECK((cos.size(0) == batch || cos.size(0) == 1) && cos.size(1) == tokens,
              "cos and sin must be [batch or 1, tokens, rotary dim]");
  const int64_t rotary = cos.size(2), width = (heads + 2 * kv_heads) * dim, angle_batches = cos.size(0);
  TORCH_CHECK(rotary % 2 == 0 && rotary <= dim, "the rotary dim must be even and at most the head dim");
  const bf16* coss = input(cos);
  const bf16* sins = input(sin);
  at::parallel_for(0, batch * tokens, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / tokens, t = row % tokens;
      const int64_t angle = (angle_batches == 1 ? t : row) * rotary;
      for (int64_t head = 0; head < heads + 2 * kv_heads; ++head) {
        const int kind = head < heads ? 0 : (head < heads + kv_heads ? 1 : 2);
        const int64_t index = kind == 0 ? head : head - heads - (kind == 2 ? kv_heads : 0);
        const int64_t count = kind == 0 ? heads : kv_heads;
        visit(kind, row * width + head * dim, ((b * count + index) * tokens + t) * dim, coss + angle, sins + angle);
      }
    }
  });
}

// Phi-3's attention inputs from its qkv projection [batch, tokens, (heads + 2 * kv_heads) * dim]: queries and keys
// rotated as transformers' apply_rotary_pos_emb computes them, bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)) with
// rotate_half(x) = [-x2, x1], on the first cos.size(2) dims of each head (all of them, or a fraction: Phi-4-mini's
// partial rotary), the rest passed through; and values, each [batch, heads, tokens, dim].
std::tuple<at::Tensor, at::Tensor, at::Tensor> rotary_qkv_forward(const at::Tensor& qkv, const at::Tensor& cos,
                                                                  const at::Tensor& sin, int64_t heads,
                                                                  int64_t kv_heads) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(qkv.dim() == 3 && cos.dim() == 3, "qkv must be [batch, tokens, width], cos [batch or 1, tokens, dim]");
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), dim = qkv.size(2) / (heads + 2 * kv_heads);
  const int64_t rotary = cos.size(2), half = rotary / 2;
  TORCH_CHECK(qkv.size(2) == (heads + 2 * kv_heads) * dim, "qkv's width is not (heads + 2 * kv_heads) * head dim");
  at::Tensor query = at::empty({batch, heads, tokens, dim}, qkv.options());
  at::Tensor key = at::empty({batch, kv_heads, tokens, dim}, qkv.options());
  at::Tensor value = at::empty({batch, kv_heads, tokens, dim}, qkv.options());
  const bf16* ins = input(qkv);
  bf16* outs[3] = {output(query), output(key), output(value)};
  for_each_head(cos, sin, batch, tokens, heads, kv_heads, dim,
                [&](int kind, int64_t packed, int64_t split, const bf16* angle_cos, const bf16* angle_sin) {
                  const bf16* __restrict__ x = ins + packed;
                  const bf16* __restrict__ c = angle_cos;
                  const bf16* __restrict__ s = angle_sin;
                  bf16* __restrict__ y = outs[kind] + split;
                  if (kind == 2) {
                    std::memcpy(y, x, dim * sizeof(bf16));
                    return;
                  }
                  for (int64_t i = 0; i < half; ++i) {
                    y[i] = to_bf16(round_bf16(to_float(x[i]) * to_float(c[i])) +
                                   round_bf16(-to_float(x[i + half]) * to_float(s[i])));
                  }
                  for (int64_t i = half; i < rotary; ++i) {
                    y[i] = to_bf16(round_bf16(to_float(x[i]) * to_float(c[i])) +
                                   round_bf16(to_float(x[i - half]) * to_float(s[i])));
                  }
                  std::memcpy(y + rotary, x + rotary, (dim - rotary) * sizeof(bf16));
                });
  return {query, key, value};
}
// The gradient of rotary_qkv_forward with respect to qkv, from the queries', keys' and values' gradients:
// dx = dy * cos + rotate_half^T(dy * sin), rotate_half^T(z) = [z2, -z1], on the rotated dims; dx = dy on the others.
at::Tensor rotary_qkv_backward(const at::Tensor& d_query, const at::Tensor& d_key, const at::Tensor& d_value,
                               const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(d_query, "d_query");
  check_rows(d_key, "d_key");
  check_rows(d_value, "d_value");
  const int64_t batch = d_query.size(0), heads = d_query.size(1), kv_heads = d_key.size(1);
  const int64_t tokens = d_query.size(2), dim = d_query.size(3), rotary = cos.size(2), half = rotary / 2;
  TORCH_CHECK(d_key.sizes() == d_value.sizes() && cos.dim() == 3 && rotary <= dim,
              "gradients and cos differ in shape");
  at::Tensor d_qkv = at::empty({batch, tokens, (heads + 2 * kv_heads) * dim}, d_query.options());
  const bf16* grads[3] = {input(d_query), input(d_key), input(d_value)};
  bf16* outs = output(d_qkv);
  for_each_head(cos, sin, batch, tokens, heads, kv_heads, dim,
                [&](int kind, int64_t packed, int64_t split, const bf16* angle_cos, const bf16* angle_sin) {
                  const bf16* __restrict__ g = grads[kind] + split;
                  const bf16* __restrict__ c = angle_cos;
                  const bf16* __restrict__ s = angle_sin;
                  bf16* __restrict__ dx = outs + packed;
                  if (kind == 2) {
                    std::memcpy(dx, g, dim * sizeof(bf16));
                    return;
                  }
                  for (int64_t i = 0; i < half; ++i) {
                    dx[i] = to_bf16(to_float(g[i]) * to_float(c[i]) + to_float(g[i + half]) * to_float(s[i + half]));
                  }
                  for (int64_t i = half; i < rotary; ++i) {
                    dx[i] = to_bf16(to_float(g[i]) * to_float(c[i]) - to_float(g[i - half]) * to_float(s[i - half]));
                  }
                  std::memcpy(dx + rotary, g + rotary, (dim - rotary) * sizeof(bf16));
                });
  return d_qkv;
}

// In place: causal softmax over the last dimension of a block of attention scores [heads, rows, keys], the block's
// first row being query row first_row: row r attends keys 0..first_row + r, each score times scale; the masked keys
// get probability 0. As torch's softmax of bf16 scores: fp32 inside, the probabilities rounded to bf16.
void causal_softmax_(at::Tensor& scores, double scale, int64_t first_row) {
  check_rows(scores, "scores");
  TORCH_CHECK(scores.dim() == 3, "scores must be [heads, rows, keys]");
  const int64_t rows = scores.size(1), keys = scores.size(2);
  TORCH_CHECK(first_row >= 0 && first_row + rows <= keys, "rows past the last key");
  bf16* all = output(scores);
  const auto softmax_rows = [&, factor = static_cast<float>(scale)](int64_t begin, int64_t end) {
    std::vector<float> exponentials(keys);
    float* __restrict__ e = exponentials.data();
    for (int64_t index = begin; index < end; ++index) {
      bf16* __restrict__ row = all + index * keys;
      const int64_t valid = first_row + index % rows + 1;
      float largest = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : largest)
      for (int64_t j = 0; j < valid; ++j) {
        largest = std::max(largest, to_float(row[j]) * factor);
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < valid; ++j) {
        e[j] = exp_f32(to_float(row[j]) * factor - largest);
        sum += e[j];
      }
      const float inverse = 1.0f / sum;
      for (int64_t j = 0; j < valid; ++j) {
        row[j] = to_bf16(e[j] * inverse);
      }
      std::fill(row + valid, row + keys, bf16{0});
    }
  };  // the scale captured by value: e[j] stores could alias a captured reference and stop vectorisation
  at::parallel_for(0, scores.size(0) * rows, grain(keys), softmax_rows);
}

// Cross-entropy of each row of bf16 logits [rows, vocab] against its target, in fp32: logsumexp - target logit.
// With gradient, the logits are overwritten in place by the loss's gradient, bf16(softmax - onehot(target)).
at::Tensor cross_entropy_rows_(at::Tensor& logits, const at::Tensor& targets, bool gradient) {
  check_rows(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits must be [rows, vocab]");
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.numel() == logits.size(0),
              "targets must be one contiguous int64 per row");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor losses = at::empty({rows}, logits.options().dtype(at::kFloat));
  bf16* all = output(logits);
  const int64_t* picked = targets.const_data_ptr<int64_t>();
  for (int64_t index = 0; index < rows; ++index) {
    TORCH_CHECK(picked[index] >= 0 && picked[index] < vocab, "target ", picked[index], " outside the vocabulary");
  }
  float* out = losses.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> exponentials(vocab);
    float* __restrict__ e = exponentials.data();
    for (int64_t index = begin; index < end; ++index) {
      bf16* __restrict__ row = all + index * vocab;
      const int64_t target = picked[index];
      float largest = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : largest)
      for (int64_t j = 0; j < vocab; ++j) {
        largest = std::max(largest, to_float(row[j]));
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < vocab; ++j) {
        e[j] = exp_f32(to_float(row[j]) - largest);
        sum += e[j];
      }
      out[index] = std::log(sum) + largest - to_float(row[target]);
      if (!gradient) continue;
      const float inverse = 1.0f / sum;
      for (int64_t j = 0; j < vocab; ++j) {
        row[j] = to_bf16(e[j] * inverse);
      }
      row[target] = to_bf16(e[target] * inverse - 1.0f);
    }
  });
  return losses;
}

// In place: the gradient of a softmax's input from its output's, times scale, over the last dimension:
// grad = probabilities * (grad - sum(grad * probabilities)) * scale (fp32 inside, rounded to bf16 once).
void softmax_backward_(at::Tensor& grad, const at::Tensor& probabilities, double scale) {
  check_rows(grad, "grad");
  check_rows(probabilities, "probabilities");
  TORCH_CHECK(grad.sizes() == probabilities.sizes(), "grad and probabilities differ in shape");
  const int64_t width = grad.size(-1);
  const int64_t rows = grad.numel() / std::max<int64_t>(width, 1);
  bf16* gs = output(grad);
  const bf16* ps = input(probabilities);
  const auto backward_rows = [&, factor = static_cast<float>(scale)](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      bf16* __restrict__ g = gs + index * width;
      const bf16* __restrict__ p = ps + index * width;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < width; ++j) {
        dot += to_float(g[j]) * to_float(p[j]);
      }
      for (int64_t j = 0; j < width; ++j) {
        g[j] = to_bf16(to_float(p[j]) * (to_float(g[j]) - dot) * factor);
      }
    }
  };  // the scale captured by value, as in causal_softmax_
  at::parallel_for(0, rows, grain(width), backward_rows);
}

}  // namespace

TORCH_LIBRARY(phitune_fused, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad, Tensor x, Tensor scales, Tensor weight) -> Tensor");
  m.def("swiglu_forward(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("rotary_qkv_forward(Tensor qkv, Tensor cos, Tensor sin, int heads, int kv_heads) -> (Tensor, Tensor, Tensor)");
  m.def("rotary_qkv_backward(Tensor d_query, Tensor d_key, Tensor d_value, Tensor cos, Tensor sin) -> Tensor");
  m.def("causal_softmax_(Tensor(a!) scores, float scale, int first_row) -> ()");
  m.def("cross_entropy_rows_(Tensor(a!) logits, Tensor targets, bool gradient) -> Tensor");
  m.def("softmax_backward_(Tensor(a!) grad, Tensor probabilities, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(phitune_fused, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("rotary_qkv_forward", &rotary_qkv_forward);
  m.impl("rotary_qkv_backward", &rotary_qkv_backward);
  m.impl("causal_softmax_", &causal_softmax_);
  m.impl("cross_entropy_rows_", &cross_entropy_rows_);
  m.impl("softmax_backward_", &softmax_backward_);
}
