// KerasAdamwApplyAdam: the whole Adam/AdamW update of many variables in one
// TensorFlow op, one pass over each element, on TensorFlow's CPU thread pool.
//
// The formula and its order of operations are keras_adamw/adam_math.py's
// (Keras 3's), so that float32 results agree with the XLA path to rounding:
//
//   alpha    = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)
//   variable = variable - variable * weight_decay * lr   (weight_decay != 0;
//              variable - variable * weight_decay with independent_decay)
//   momentum = momentum + (gradient - momentum) * (1 - beta_1)
//   velocity = velocity + (gradient^2 - velocity) * (1 - beta_2)
//   velocity_hat = max(velocity_hat, velocity)            (amsgrad)
//   variable = variable - (momentum * alpha) / (sqrt(velocity[_hat]) + eps)
//
// Half-precision variables (and their slots) are computed in float32 and
// rounded once when stored; float32 in float32; float64 in float64. Slots
// are in the variable's dtype or, with moment_dtype, float32 or bfloat16
// (rounded once when stored; the update reads them unrounded). The
// gradients come already in that compute dtype. The learning rate is the
// step's scalar times a per-variable multiplier; the other hyperparameters
// are float64 vectors with one entry per variable (so per-variable rules
// need no other op); all are rounded to the compute dtype as the XLA path
// rounds them.
//
// Variables are locked as TensorFlow's own ResourceApply* kernels lock them
// (every mutex, in address order, so two ops never deadlock) and updated
// copy-on-write when a read still holds their buffer. Every check runs
// before any element is written: the op changes everything or nothing.
//
// Build: see keras_adamw/kernels/__init__.py (g++ -O3 -fno-math-errno so the
// loops vectorise; -ffp-contract=off so no multiply-add is fused, which would
// round differently from the XLA path).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace keras_adamw {
namespace {

using ::tensorflow::DataType;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::Var;

// The slots (momentums, velocities and, with amsgrad, velocity hats) of a
// set of variables, held together so that a step passes one handle for all
// of them: a tf.function pays about 5 us per captured input on every call,
// which for 2000 small variables was most of the step. The group holds a
// reference to each slot's Var; a slot's value may be replaced (restore,
// assign) as its Var stays the same.
class SlotGroup : public tensorflow::ResourceBase {
 public:
  explicit SlotGroup(std::vector<tensorflow::core::RefCountPtr<Var>> slots)
      : slots_(std::move(slots)) {}
  std::string DebugString() const override {
    return absl::StrCat("KerasAdamwSlotGroup of ", slots_.size(), " slots");
  }
  const std::vector<tensorflow::core::RefCountPtr<Var>>& slots() const {
    return slots_;
  }

 private:
  std::vector<tensorflow::core::RefCountPtr<Var>> slots_;
};

REGISTER_OP("KerasAdamwSlotGroup")
    .Input("slots: M * resource")
    .Output("group: resource")
    .Attr("M: int >= 1")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
Groups M slot variables (momentums, then velocities, then velocity hats) for
KerasAdamwApplyAdam. The handle owns the group; the group keeps the slots'
variables alive.
)doc");

class SlotGroupOp : public OpKernel {
 public:
  explicit SlotGroupOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    std::vector<tensorflow::core::RefCountPtr<Var>> slots(ctx->num_inputs());
    for (int i = 0; i < ctx->num_inputs(); ++i) {
      OP_REQUIRES_OK(ctx,
                     LookupResource(ctx, HandleFromInput(ctx, i), &slots[i]));
    }
    Tensor* handle;
    tensorflow::AllocatorAttributes on_host;
    on_host.set_on_host(true);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}),
                                             &handle, on_host));
    handle->scalar<tensorflow::ResourceHandle>()() =
        tensorflow::ResourceHandle::MakeRefCountingHandle<SlotGroup>(
            new SlotGroup(std::move(slots)), ctx->device()->name());
  }
};

REGISTER_KERNEL_BUILDER(Name("KerasAdamwSlotGroup")
                            .Device(tensorflow::DEVICE_CPU),
                        SlotGroupOp);

REGISTER_OP("KerasAdamwApplyAdam")
    .Input("variables: N * resource")
    .Input("slots: resource")
    .Input("gradients: T")
    .Input("learning_rate: double")
    .Input("learning_rate_multiplier: double")
    .Input("beta_1: double")
    .Input("beta_2: double")
    .Input("epsilon: double")
    .Input("weight_decay: double")
    .Input("step: int64")
    .Attr("N: int >= 1")
    .Attr("T: list({float, double})")
    .Attr("independent_decay: bool = false")
    .Attr("kahan: bool = false")
    .SetIsStateful()
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext*) {
      return absl::OkStatus();
    })
    .Doc(R"doc(
Adam/AdamW update of N variables and their slots, in place.

variables: N resource variables.
slots: a KerasAdamwSlotGroup of their slots, N of each, aligned with the
  variables: momentums, velocities, velocity hats (amsgrad), compensations
  (kahan).
gradients: N dense gradients in each variable's compute dtype.
learning_rate: the step's learning rate (float64 scalar).
learning_rate_multiplier, beta_1, beta_2, epsilon, weight_decay: float64
  vectors of length N, one entry per variable; weight_decay 0 means no
  decay.
step: the 1-based step t (int64 scalar).
independent_decay: decay by weight_decay alone (weight_decay_mode=
  "independent"), not weight_decay * learning_rate.
kahan: the group ends with a compensation per (half-precision) variable.
)doc");

// One variable's share of the work.
struct Job {
  DataType dtype;
  DataType slot_dtype;
  bool independent_decay;  // weight_decay_mode="independent".
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
// dtype C. bfloat16 (with C float) is handled as raw 16-bit integers with
// shifts and adds that GCC vectorises: Eigen's bfloat16 struct is not
// vectorised, which made bfloat16 steps 1.8x slower than float32 ones.
// The rounding is Eigen's: to nearest even, NaN to a quiet NaN of the same
// sign.
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

// T: the variable's dtype; S: its slots' (moment_dtype); C: the compute
// dtype, the gradient's.
// kKahan: the variable is stored with a compensation of its dtype
// (kahan_summation, half precision only), as keras_adamw/precision.py.
template <typename T, typename S, typename C, Decay kDecay, bool kAmsgrad,
          bool kKahan>
void UpdateRange(const Job& job, int64_t step, int64_t begin, int64_t end) {
  using Variables = Storage<T, C>;
  using Slots = Storage<S, C>;
  auto* __restrict variable = static_cast<typename Variables::Raw*>(job.variable);
  auto* __restrict momentum = static_cast<typename Slots::Raw*>(job.momentum);
  auto* __restrict velocity = static_cast<typename Slots::Raw*>(job.velocity);
  auto* __restrict velocity_hat =
      static_cast<typename Slots::Raw*>(job.velocity_hat);
  auto* __restrict compensation =
      static_cast<typename Variables::Raw*>(job.compensation);
  const C* __restrict gradient = static_cast<const C*>(job.gradient);
  // The scalars as the XLA path computes them: rounded to C, then in C
  // (the multiplier only where it is not 1, as keras_adamw/step.py).
  C lr = static_cast<C>(job.learning_rate);
  if (job.learning_rate_multiplier != 1.0) {
    lr = lr * static_cast<C>(job.learning_rate_multiplier);
  }
  const C beta_1 = static_cast<C>(job.beta_1);
  const C beta_2 = static_cast<C>(job.beta_2);
  const C epsilon = static_cast<C>(job.epsilon);
  const C weight_decay = static_cast<C>(job.weight_decay);
  const C t = static_cast<C>(step);
  const C alpha = lr * std::sqrt(C(1) - std::pow(beta_2, t)) /
                  (C(1) - std::pow(beta_1, t));
  const C one_minus_beta_1 = C(1) - beta_1;
  const C one_minus_beta_2 = C(1) - beta_2;
  for (int64_t k = begin; k < end; ++k) {
    const C g = gradient[k];
    C x = Variables::Load(variable[k]);
    if (kKahan) x = x + Variables::Load(compensation[k]);
    if (kDecay == kLrScaled) x = x - x * weight_decay * lr;
    if (kDecay == kIndependent) x = x - x * weight_decay;
    C m = Slots::Load(momentum[k]);
    m = m + (g - m) * one_minus_beta_1;
    C v = Slots::Load(velocity[k]);
    v = v + (g * g - v) * one_minus_beta_2;
    C denominator_velocity = v;
    if (kAmsgrad) {
      C h = Slots::Load(velocity_hat[k]);
      // tf.maximum's NaN propagation: NaN if either is NaN.
      h = (h < v || v != v) ? v : h;
      velocity_hat[k] = Slots::Store(h);
      denominator_velocity = h;
    }
    // The update reads the moments before they are rounded to S, as the
    // XLA path does.
    x = x - (m * alpha) / (std::sqrt(denominator_velocity) + epsilon);
    if (kKahan) {
      // The weight as stored, and what that rounding lost.
      const auto weight = Variables::Store(x);
      compensation[k] = Variables::Store(x - Variables::Load(weight));
      variable[k] = weight;
    } else {
      variable[k] = Variables::Store(x);
    }
    momentum[k] = Slots::Store(m);
    velocity[k] = Slots::Store(v);
  }
}

template <typename T, typename S, typename C, Decay kDecay, bool kAmsgrad>
void UpdateCompensated(const Job& job, int64_t step, int64_t begin,
                       int64_t end) {
  // Compensations exist for half-precision variables only.
  if constexpr (std::is_same_v<T, Eigen::half> ||
                std::is_same_v<T, Eigen::bfloat16>) {
    if (job.compensation != nullptr) {
      return UpdateRange<T, S, C, kDecay, kAmsgrad, true>(job, step, begin,
                                                          end);
    }
  }
  UpdateRange<T, S, C, kDecay, kAmsgrad, false>(job, step, begin, end);
}

template <typename T, typename S, typename C, Decay kDecay>
void UpdateDecayed(const Job& job, int64_t step, int64_t begin, int64_t end) {
  if (job.velocity_hat != nullptr) {
    UpdateCompensated<T, S, C, kDecay, true>(job, step, begin, end);
  } else {
    UpdateCompensated<T, S, C, kDecay, false>(job, step, begin, end);
  }
}

template <typename T, typename S, typename C>
void UpdateTyped(const Job& job, int64_t step, int64_t begin, int64_t end) {
  if (job.weight_decay == 0.0) {
    UpdateDecayed<T, S, C, kNoDecay>(job, step, begin, end);
  } else if (job.independent_decay) {
    UpdateDecayed<T, S, C, kIndependent>(job, step, begin, end);
  } else {
    UpdateDecayed<T, S, C, kLrScaled>(job, step, begin, end);
  }
}

// Slots in the variable's dtype, or float32 or bfloat16 (moment_dtype; the
// op checks which before any write).
template <typename T, typename C>
void UpdateSlots(const Job& job, int64_t step, int64_t begin, int64_t end) {
  if (job.slot_dtype == tensorflow::DataTypeToEnum<T>::value) {
    UpdateTyped<T, T, C>(job, step, begin, end);
  } else if (job.slot_dtype == tensorflow::DT_FLOAT) {
    UpdateTyped<T, float, C>(job, step, begin, end);
  } else {
    UpdateTyped<T, Eigen::bfloat16, C>(job, step, begin, end);
  }
}

void Update(const Job& job, int64_t step, int64_t begin, int64_t end) {
  switch (job.dtype) {
    case tensorflow::DT_HALF:
      return UpdateSlots<Eigen::half, float>(job, step, begin, end);
    case tensorflow::DT_BFLOAT16:
      return UpdateSlots<Eigen::bfloat16, float>(job, step, begin, end);
    case tensorflow::DT_FLOAT:
      return UpdateSlots<float, float>(job, step, begin, end);
    default:
      return UpdateSlots<double, double>(job, step, begin, end);
  }
}

DataType ComputeDtype(DataType dtype) {
  return dtype == tensorflow::DT_DOUBLE ? tensorflow::DT_DOUBLE
                                        : tensorflow::DT_FLOAT;
}

// Holds the exclusive locks of a set of variables, taken in address order.
class LockSet {
 public:
  explicit LockSet(std::vector<tensorflow::mutex*> mutexes)
      : mutexes_(std::move(mutexes)) {
    std::sort(mutexes_.begin(), mutexes_.end());
    mutexes_.erase(std::unique(mutexes_.begin(), mutexes_.end()),
                   mutexes_.end());
    for (auto* mu : mutexes_) mu->lock();
  }
  ~LockSet() {
    for (auto it = mutexes_.rbegin(); it != mutexes_.rend(); ++it) {
      (*it)->unlock();
    }
  }

 private:
  std::vector<tensorflow::mutex*> mutexes_;
};

class ApplyAdamOp : public OpKernel {
 public:
  explicit ApplyAdamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("N", &n_));
    OP_REQUIRES_OK(ctx,
                   ctx->GetAttr("independent_decay", &independent_decay_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kahan", &kahan_));
  }

  void Compute(OpKernelContext* ctx) override {
    const int n = n_;
    std::vector<tensorflow::core::RefCountPtr<Var>> variables(n);
    for (int i = 0; i < n; ++i) {
      OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, i),
                                         &variables[i]));
    }
    tensorflow::core::RefCountPtr<SlotGroup> group;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, n), &group));
    const int num_slots = static_cast<int>(group->slots().size());
    const int base = (kahan_ ? 3 : 2) * n;
    OP_REQUIRES(ctx, num_slots == base || num_slots == base + n,
                absl::InvalidArgumentError(absl::StrCat(
                    "the slot group holds ", num_slots, " slots; ", n,
                    " variables need ", base, " or, with amsgrad, ",
                    base + n)));
    const bool amsgrad = num_slots == base + n;
    // resources[slot * n + i]: slot 0 the variable i, 1 its momentum, 2 its
    // velocity, then its velocity hat (amsgrad), then its compensation
    // (kahan).
    const int compensation_slot = amsgrad ? 4 : 3;
    const int num_resources = n + num_slots;
    std::vector<Var*> resources(num_resources);
    std::vector<tensorflow::mutex*> mutexes;
    for (int i = 0; i < num_resources; ++i) {
      resources[i] = i < n ? variables[i].get() : group->slots()[i - n].get();
      mutexes.push_back(resources[i]->mu());
    }
    const int first_gradient = n + 1;
    const int first_hyper = first_gradient + n;
    const Tensor& learning_rate = ctx->input(first_hyper);
    OP_REQUIRES(ctx, learning_rate.dims() == 0,
                absl::InvalidArgumentError("learning_rate must be a scalar"));
    std::vector<const double*> hypers;
    for (int j = 1; j < 6; ++j) {
      const Tensor& hyper = ctx->input(first_hyper + j);
      OP_REQUIRES(ctx, hyper.dims() == 1 && hyper.dim_size(0) == n,
                  absl::InvalidArgumentError(absl::StrCat(
                      "hyperparameter input ", j, " must have shape [", n,
                      "], got ", hyper.shape().DebugString())));
      hypers.push_back(hyper.flat<double>().data());
    }
    const Tensor& step_tensor = ctx->input(first_hyper + 6);
    OP_REQUIRES(ctx, step_tensor.dims() == 0,
                absl::InvalidArgumentError("step must be a scalar"));
    const int64_t step = step_tensor.scalar<int64_t>()();

    LockSet locks(std::move(mutexes));
    // Every check before any write.
    for (int i = 0; i < n; ++i) {
      const Tensor& variable = *resources[i]->tensor();
      const DataType dtype = variable.dtype();
      OP_REQUIRES(
          ctx,
          dtype == tensorflow::DT_HALF || dtype == tensorflow::DT_BFLOAT16 ||
              dtype == tensorflow::DT_FLOAT || dtype == tensorflow::DT_DOUBLE,
          absl::InvalidArgumentError(absl::StrCat(
              "variable ", i, " has unsupported dtype ",
              tensorflow::DataTypeString(dtype))));
      OP_REQUIRES(ctx,
                  !kahan_ || dtype == tensorflow::DT_HALF ||
                      dtype == tensorflow::DT_BFLOAT16,
                  absl::InvalidArgumentError(absl::StrCat(
                      "kahan needs half-precision variables; variable ", i,
                      " is ", tensorflow::DataTypeString(dtype))));
      for (int slot = 0; slot < compensation_slot + (kahan_ ? 1 : 0);
           ++slot) {
        Var* resource = resources[slot * n + i];
        OP_REQUIRES(ctx, resource->is_initialized,
                    absl::FailedPreconditionError(absl::StrCat(
                        "input ", slot * n + i, " (variable ", i,
                        ") is not initialized")));
        const Tensor& tensor = *resource->tensor();
        // The variable itself, then its slots: all in one dtype, the
        // variable's or float32 or bfloat16 (moment_dtype).
        const DataType slot_dtype =
            resources[n + i]->tensor()->dtype();
        const DataType expected =
            slot == 0 || slot == compensation_slot ? dtype : slot_dtype;
        OP_REQUIRES(ctx,
                    tensor.dtype() == expected &&
                        (expected == dtype ||
                         expected == tensorflow::DT_FLOAT ||
                         expected == tensorflow::DT_BFLOAT16) &&
                        tensor.shape() == variable.shape(),
                    absl::InvalidArgumentError(absl::StrCat(
                        "slot ", slot, " of variable ", i, " is ",
                        tensorflow::DataTypeString(tensor.dtype()),
                        tensor.shape().DebugString(), ", the variable ",
                        tensorflow::DataTypeString(dtype),
                        variable.shape().DebugString(),
                        " (slots: one dtype, the variable's or float or "
                        "bfloat16)")));
      }
      const Tensor& gradient = ctx->input(first_gradient + i);
      OP_REQUIRES(ctx,
                  gradient.dtype() == ComputeDtype(dtype) &&
                      gradient.shape() == variable.shape(),
                  absl::InvalidArgumentError(absl::StrCat(
                      "gradient ", i, " is ",
                      tensorflow::DataTypeString(gradient.dtype()),
                      gradient.shape().DebugString(), ", expected ",
                      tensorflow::DataTypeString(ComputeDtype(dtype)),
                      variable.shape().DebugString())));
    }
    // Copy-on-write: a read in flight keeps its buffer (as TensorFlow's
    // PrepareToUpdateVariable does); the update writes to a fresh copy.
    for (int i = 0; i < num_resources; ++i) {
      Var* resource = resources[i];
      Tensor* tensor = resource->tensor();
      if (resource->copy_on_read_mode.load() || !tensor->RefCountIsOne()) {
        Tensor copy;
        tensorflow::AllocatorAttributes attributes;
        attributes.set_gpu_compatible(true);
        attributes.set_nic_compatible(true);
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensor->dtype(),
                                               tensor->shape(), &copy,
                                               attributes));
        if (tensor->TotalBytes() > 0) {
          std::memcpy(copy.data(), tensor->data(), tensor->TotalBytes());
        }
        *tensor = copy;
      }
    }
    std::vector<Job> jobs(n);
    std::vector<int64_t> starts(n + 1, 0);
    for (int i = 0; i < n; ++i) {
      Job& job = jobs[i];
      job.dtype = resources[i]->tensor()->dtype();
      job.slot_dtype = resources[n + i]->tensor()->dtype();
      job.independent_decay = independent_decay_;
      job.variable = resources[i]->tensor()->data();
      job.momentum = resources[n + i]->tensor()->data();
      job.velocity = resources[2 * n + i]->tensor()->data();
      job.velocity_hat =
          amsgrad ? resources[3 * n + i]->tensor()->data() : nullptr;
      job.compensation =
          kahan_ ? resources[compensation_slot * n + i]->tensor()->data()
                 : nullptr;
      job.gradient = ctx->input(first_gradient + i).data();
      job.learning_rate = learning_rate.scalar<double>()();
      job.learning_rate_multiplier = hypers[0][i];
      job.beta_1 = hypers[1][i];
      job.beta_2 = hypers[2][i];
      job.epsilon = hypers[3][i];
      job.weight_decay = hypers[4][i];
      starts[i + 1] = starts[i] + resources[i]->tensor()->NumElements();
    }
    // One index space over all elements of all variables, cut into shards
    // for the thread pool: small variables share a shard, big ones split.
    auto work = [&jobs, &starts, step](int64_t begin, int64_t end) {
      int i = std::upper_bound(starts.begin(), starts.end(), begin) -
              starts.begin() - 1;
      for (; i < static_cast<int>(jobs.size()) && starts[i] < end; ++i) {
        const int64_t from = std::max(begin, starts[i]) - starts[i];
        const int64_t to = std::min(end, starts[i + 1]) - starts[i];
        if (from < to) Update(jobs[i], step, from, to);
      }
    };
    const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
    // About 30 bytes move per element; the cost is in cycles.
    tensorflow::Shard(threads->num_threads, threads->workers, starts[n],
                      /*cost_per_unit=*/20, work);
  }

 private:
  int n_;
  bool independent_decay_;
  bool kahan_;
};

REGISTER_KERNEL_BUILDER(Name("KerasAdamwApplyAdam")
                            .Device(tensorflow::DEVICE_CPU),
                        ApplyAdamOp);

}  // namespace
}  // namespace keras_adamw
