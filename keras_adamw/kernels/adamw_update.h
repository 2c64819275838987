// The AdamW update of one variable's elements, for keras_adamw/kernels/
// adamw_op.cc (see its header for the formula and the dtypes).
//
// Step is the formula, written once. Update runs it on a range of a
// variable's elements: element by element for float32 and float64 (GCC
// vectorises the loops), and on 16 float32 lanes for variables holding half
// precision anywhere (variable, slots or gradient), widened in registers
// and rounded once when stored.

#ifndef KERAS_ADAMW_KERNELS_ADAMW_UPDATE_H_
#define KERAS_ADAMW_KERNELS_ADAMW_UPDATE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __AVX512F__
#include <immintrin.h>  // Vector float16/bfloat16 conversions.
#endif

#include "tensorflow/core/framework/types.h"

namespace keras_adamw {

using ::tensorflow::DataType;

// One variable's share of the work.
struct Job {
  DataType dtype;           // The variable's.
  DataType slot_dtype;      // Its slots' (moment_dtype).
  DataType gradient_dtype;  // The variable's or the compute dtype.
  bool independent_decay;   // weight_decay_mode="independent".
  void* variable;
  void* momentum;
  void* velocity;
  void* velocity_hat;  // nullptr without amsgrad.
  void* compensation;  // nullptr without kahan_summation.
  const void* gradient;
  double learning_rate, learning_rate_multiplier;
  double beta_1, beta_2, epsilon, weight_decay;
};

// How an element stored as T is read into and written from the compute
// dtype C, one at a time (slots of float64 variables, the tails of lanes).
// bfloat16 (with C float) is handled as raw 16-bit integers (Eigen's
// bfloat16 struct is not vectorised). The rounding is Eigen's: to nearest
// even, NaN to a quiet NaN of the same sign.
template <typename T, typename C>
struct Storage {
  using Raw = T;
  static C Load(Raw value) { return static_cast<C>(value); }
  static Raw Store(C value) { return static_cast<Raw>(value); }
};

template <>
struct Storage<Eigen::bfloat16, float> {
  using Raw = uint16_t;
  static float Load(uint16_t raw) {
    const uint32_t bits = static_cast<uint32_t>(raw) << 16;
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return result;
  }
  static uint16_t Store(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = ((bits >> 16) & 0x8000u) | 0x7fc0u;
    const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;
    return static_cast<uint16_t>(is_nan ? quiet_nan : rounded);
  }
};

// How a variable is decayed (weight_decay_mode; none where its weight decay
// is 0).
enum Decay { kNoDecay, kLrScaled, kIndependent };

// A job's scalars in its compute dtype C, as the XLA path computes them:
// rounded to C, then in C (the multiplier only where it is not 1, as
// keras_adamw/step.py). Made once per job and shard.
template <typename C>
struct Scalars {
  Scalars(const Job& job, int64_t step) {
    lr = static_cast<C>(job.learning_rate);
    if (job.learning_rate_multiplier != 1.0) {
      lr = lr * static_cast<C>(job.learning_rate_multiplier);
    }
    const C beta_1 = static_cast<C>(job.beta_1);
    const C beta_2 = static_cast<C>(job.beta_2);
    epsilon = static_cast<C>(job.epsilon);
    weight_decay = static_cast<C>(job.weight_decay);
    const C t = static_cast<C>(step);
    alpha = lr * std::sqrt(C(1) - std::pow(beta_2, t)) /
            (C(1) - std::pow(beta_1, t));
    one_minus_beta_1 = C(1) - beta_1;
    one_minus_beta_2 = C(1) - beta_2;
  }
  C lr, epsilon, weight_decay, alpha, one_minus_beta_1, one_minus_beta_2;
};

// 16 float32 lanes (GCC's vector extension: AVX-512 registers where the CPU
// has them, else two AVX or four SSE ones). Arithmetic on lanes rounds each
// lane as the scalar operation does.
constexpr int kLanes = 16;
// Lanes live in registers only where their functions are inlined.
#define KERAS_ADAMW_INLINE inline __attribute__((always_inline))
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline float Sqrt(float value) { return std::sqrt(value); }
inline double Sqrt(double value) { return std::sqrt(value); }
KERAS_ADAMW_INLINE Lanes Sqrt(Lanes value) {
#ifdef __AVX512F__
  return reinterpret_cast<Lanes>(
      _mm512_sqrt_ps(reinterpret_cast<__m512>(value)));
#else
  for (int i = 0; i < kLanes; ++i) value[i] = std::sqrt(value[i]);
  return value;
#endif
}

// The formula on one element (V = C) or on lanes of float32 elements, in
// place. One definition for every path, so every dtype rounds alike.
template <typename V, typename C, Decay kDecay, bool kAmsgrad>
KERAS_ADAMW_INLINE void Step(const Scalars<C>& s, V gradient, V& x, V& momentum,
                 V& velocity, V& velocity_hat) {
  if (kDecay == kLrScaled) x = x - x * s.weight_decay * s.lr;
  if (kDecay == kIndependent) x = x - x * s.weight_decay;
  momentum = momentum + (gradient - momentum) * s.one_minus_beta_1;
  velocity = velocity + (gradient * gradient - velocity) * s.one_minus_beta_2;
  V denominator_velocity = velocity;
  if (kAmsgrad) {
    // tf.maximum's NaN propagation: NaN if either is NaN.
    velocity_hat = ((velocity_hat < velocity) | (velocity != velocity))
                       ? velocity
                       : velocity_hat;
    denominator_velocity = velocity_hat;
  }
  // The update reads the moments before they are rounded to their storage
  // dtype, as the XLA path does.
  x = x - (momentum * s.alpha) / (Sqrt(denominator_velocity) + s.epsilon);
}

// Element by element over [begin, end) (GCC vectorises the loop): the
// variable and gradient hold C, the compute dtype; the slots S (C, or for
// float64 variables with moment_dtype float32 or bfloat16), rounded once
// when stored.
template <typename C, typename S, Decay kDecay, bool kAmsgrad>
void UpdateRange(const Job& job, const Scalars<C>& scalars, int64_t begin,
                 int64_t end) {
  using Slots = Storage<S, C>;
  C* __restrict variable = static_cast<C*>(job.variable);
  auto* __restrict momentum = static_cast<typename Slots::Raw*>(job.momentum);
  auto* __restrict velocity = static_cast<typename Slots::Raw*>(job.velocity);
  auto* __restrict velocity_hat =
      static_cast<typename Slots::Raw*>(job.velocity_hat);
  const C* __restrict gradient = static_cast<const C*>(job.gradient);
  for (int64_t k = begin; k < end; ++k) {
    C x = variable[k];
    C m = Slots::Load(momentum[k]);
    C v = Slots::Load(velocity[k]);
    C h = kAmsgrad ? Slots::Load(velocity_hat[k]) : C(0);
    Step<C, C, kDecay, kAmsgrad>(scalars, gradient[k], x, m, v, h);
    variable[k] = x;
    momentum[k] = Slots::Store(m);
    velocity[k] = Slots::Store(v);
    if (kAmsgrad) velocity_hat[k] = Slots::Store(h);
  }
}

// Loading kLanes elements stored as T into float32 lanes (exactly) and
// storing them back, rounded to nearest even as tf.cast (Eigen) rounds; a
// NaN stays a NaN (quiet, of the same sign). Where the CPU has them (the
// build targets this CPU), hardware conversions do a whole vector at once;
// the tail of an array (count < kLanes) goes element by element.
template <typename T>
struct LanesOf;

template <>
struct LanesOf<float> {
  static KERAS_ADAMW_INLINE Lanes Load(const void* data, int64_t k, int count) {
    Lanes lanes = {};
    std::memcpy(&lanes, static_cast<const float*>(data) + k,
                count * sizeof(float));
    return lanes;
  }
  static KERAS_ADAMW_INLINE void Store(Lanes lanes, void* data, int64_t k,
                                  int count) {
    std::memcpy(static_cast<float*>(data) + k, &lanes, count * sizeof(float));
  }
};

template <>
struct LanesOf<Eigen::bfloat16> {
  using Scalar = Storage<Eigen::bfloat16, float>;
  static KERAS_ADAMW_INLINE Lanes Load(const void* data, int64_t k, int count) {
    const auto* in = static_cast<const uint16_t*>(data) + k;
#ifdef __AVX512F__
    if (count == kLanes) {
      const __m256i raw =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
      return reinterpret_cast<Lanes>(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
#endif
    Lanes lanes = {};
    for (int i = 0; i < count; ++i) lanes[i] = Scalar::Load(in[i]);
    return lanes;
  }
  static KERAS_ADAMW_INLINE void Store(Lanes lanes, void* data, int64_t k,
                                  int count) {
    auto* out = static_cast<uint16_t*>(data) + k;
#if defined(__AVX512BF16__) && defined(__AVX512VL__)
    if (count == kLanes) {
      const __m256bh rounded =
          _mm512_cvtneps_pbh(reinterpret_cast<__m512>(lanes));
      std::memcpy(out, &rounded, sizeof(rounded));
      return;
    }
#endif
    for (int i = 0; i < count; ++i) out[i] = Scalar::Store(lanes[i]);
  }
};

template <>
struct LanesOf<Eigen::half> {
  static KERAS_ADAMW_INLINE Lanes Load(const void* data, int64_t k, int count) {
    const auto* in = static_cast<const Eigen::half*>(data) + k;
#ifdef __AVX512F__
    if (count == kLanes) {
      return reinterpret_cast<Lanes>(_mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in))));
    }
#endif
    Lanes lanes = {};
    for (int i = 0; i < count; ++i) lanes[i] = static_cast<float>(in[i]);
    return lanes;
  }
  static KERAS_ADAMW_INLINE void Store(Lanes lanes, void* data, int64_t k,
                                  int count) {
    auto* out = static_cast<Eigen::half*>(data) + k;
#ifdef __AVX512F__
    if (count == kLanes) {
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(out),
          _mm512_cvtps_ph(reinterpret_cast<__m512>(lanes),
                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    }
#endif
    for (int i = 0; i < count; ++i) out[i] = static_cast<Eigen::half>(lanes[i]);
  }
};

// A job computed in float32 whose variable is stored as T and slots as S,
// one of them half precision, kLanes elements at a time: each is widened
// in registers, updated and rounded once when stored, so memory sees only
// the stored dtypes (14 bytes per bfloat16 parameter, as torch's fused
// AdamW). The gradient is float32 or T; amsgrad and kahan_summation are
// tested per vector, which the CPU predicts (fewer loops to compile). With
// kahan_summation the variable is read as variable + compensation and
// stored as weight = round(x) and compensation = round(x - weight), as
// keras_adamw/precision.py.
template <typename T, typename S, Decay kDecay>
void UpdateLanes(const Job& job, const Scalars<float>& scalars,
                 int64_t begin, int64_t end) {
  const bool amsgrad = job.velocity_hat != nullptr;
  const bool kahan = job.compensation != nullptr;
  const bool float_gradient = job.gradient_dtype == tensorflow::DT_FLOAT;
  for (int64_t k = begin; k < end; k += kLanes) {
    const int count = static_cast<int>(std::min<int64_t>(kLanes, end - k));
    Lanes x = LanesOf<T>::Load(job.variable, k, count);
    if (kahan) x = x + LanesOf<T>::Load(job.compensation, k, count);
    Lanes m = LanesOf<S>::Load(job.momentum, k, count);
    Lanes v = LanesOf<S>::Load(job.velocity, k, count);
    const Lanes g = float_gradient
                        ? LanesOf<float>::Load(job.gradient, k, count)
                        : LanesOf<T>::Load(job.gradient, k, count);
    if (amsgrad) {
      Lanes h = LanesOf<S>::Load(job.velocity_hat, k, count);
      Step<Lanes, float, kDecay, true>(scalars, g, x, m, v, h);
      LanesOf<S>::Store(h, job.velocity_hat, k, count);
    } else {
      Lanes unused;
      Step<Lanes, float, kDecay, false>(scalars, g, x, m, v, unused);
    }
    LanesOf<T>::Store(x, job.variable, k, count);
    if (kahan) {
      // What storing lost: x minus the weight as stored.
      const Lanes weight = LanesOf<T>::Load(job.variable, k, count);
      LanesOf<T>::Store(x - weight, job.compensation, k, count);
    }
    LanesOf<S>::Store(m, job.momentum, k, count);
    LanesOf<S>::Store(v, job.velocity, k, count);
  }
}

// Calls `update(decay)` with the job's weight_decay_mode (none where its
// weight decay is 0) as a compile-time constant.
template <typename Update>
KERAS_ADAMW_INLINE void WithDecay(const Job& job, Update&& update) {
  if (job.weight_decay == 0.0) {
    update(std::integral_constant<Decay, kNoDecay>{});
  } else if (job.independent_decay) {
    update(std::integral_constant<Decay, kIndependent>{});
  } else {
    update(std::integral_constant<Decay, kLrScaled>{});
  }
}

template <typename C, typename S>
void UpdateElements(const Job& job, int64_t step, int64_t begin,
                    int64_t end) {
  const Scalars<C> scalars(job, step);
  WithDecay(job, [&](auto decay) {
    constexpr Decay kDecay = decltype(decay)::value;
    if (job.velocity_hat != nullptr) {
      UpdateRange<C, S, kDecay, true>(job, scalars, begin, end);
    } else {
      UpdateRange<C, S, kDecay, false>(job, scalars, begin, end);
    }
  });
}

template <typename T, typename S>
void UpdateHalf(const Job& job, int64_t step, int64_t begin, int64_t end) {
  const Scalars<float> scalars(job, step);
  WithDecay(job, [&](auto decay) {
    UpdateLanes<T, S, decltype(decay)::value>(job, scalars, begin, end);
  });
}

// The slots of a variable stored as T are T, or float32 or bfloat16
// (moment_dtype; the op checks which before any write).
template <typename T>
void UpdateHalfSlots(const Job& job, int64_t step, int64_t begin,
                     int64_t end) {
  if (job.slot_dtype == tensorflow::DT_FLOAT) {
    return UpdateHalf<T, float>(job, step, begin, end);
  }
  if (job.slot_dtype == tensorflow::DT_BFLOAT16) {
    return UpdateHalf<T, Eigen::bfloat16>(job, step, begin, end);
  }
  UpdateHalf<T, T>(job, step, begin, end);
}

// One variable's elements [begin, end): float32 and float64 element by
// element, anything holding half precision in float32 lanes.
inline void Update(const Job& job, int64_t step, int64_t begin,
                   int64_t end) {
  switch (job.dtype) {
    case tensorflow::DT_DOUBLE:
      if (job.slot_dtype == tensorflow::DT_DOUBLE) {
        return UpdateElements<double, double>(job, step, begin, end);
      }
      if (job.slot_dtype == tensorflow::DT_FLOAT) {
        return UpdateElements<double, float>(job, step, begin, end);
      }
      return UpdateElements<double, Eigen::bfloat16>(job, step, begin, end);
    case tensorflow::DT_FLOAT:
      if (job.slot_dtype == tensorflow::DT_FLOAT) {
        return UpdateElements<float, float>(job, step, begin, end);
      }
      return UpdateHalf<float, Eigen::bfloat16>(job, step, begin, end);
    case tensorflow::DT_BFLOAT16:
      return UpdateHalfSlots<Eigen::bfloat16>(job, step, begin, end);
    default:
      return UpdateHalfSlots<Eigen::half>(job, step, begin, end);
  }
}

}  // namespace keras_adamw

#endif  // KERAS_ADAMW_KERNELS_ADAMW_UPDATE_H_
