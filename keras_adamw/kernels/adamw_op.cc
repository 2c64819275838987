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
// The formula is written once (Step) and run element by element for
// float32 and float64 jobs, and on 16 float32 lanes for jobs holding half
// precision, which are widened in registers and rounded once when stored.
// Half-precision variables (and their slots) are computed in float32;
// float32 in float32; float64 in float64. Slots are in the variable's
// dtype or, with moment_dtype, float32 or bfloat16 (rounded once when
// stored; the update reads them unrounded). Gradients come in that compute
// dtype or, for half-precision variables, in the variable's own (then no
// float32 copy is made: a bfloat16 step moves 14 bytes per parameter, as
// torch's fused AdamW). The learning rate is the step's scalar times a
// per-variable multiplier; the other hyperparameters are float64 vectors
// with one entry per variable (so per-variable rules need no other op);
// all are rounded to the compute dtype as the XLA path rounds them.
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
#include <cstring>
#include <vector>

#include "adamw_update.h"  // Job and Update: the formula over elements.

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

// A step's variables and their slots (momentums, velocities, velocity hats
// with amsgrad, compensations with kahan_summation), held together so that
// a step passes one handle for all of them: a tf.function pays about 5 us
// per captured input on every call, and TensorFlow's graph optimizations
// on its first call grow faster than linearly with an op's inputs (2000
// inputs 1.8 s, 4000 inputs 4.2 s, measured). The group holds a reference
// to each Var; a value may be replaced (restore, assign) as its Var stays
// the same.
class VariableGroup : public tensorflow::ResourceBase {
 public:
  explicit VariableGroup(
      std::vector<tensorflow::core::RefCountPtr<Var>> variables)
      : variables_(std::move(variables)) {}
  std::string DebugString() const override {
    return absl::StrCat("KerasAdamwVariableGroup of ", variables_.size(),
                        " variables");
  }
  const std::vector<tensorflow::core::RefCountPtr<Var>>& variables() const {
    return variables_;
  }

 private:
  std::vector<tensorflow::core::RefCountPtr<Var>> variables_;
};

REGISTER_OP("KerasAdamwVariableGroup")
    .Input("variables: M * resource")
    .Output("group: resource")
    .Attr("M: int >= 1")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape)
    .Doc(R"doc(
Groups M resource variables for KerasAdamwApplyAdam: N model variables, then
their momentums, velocities, velocity hats (amsgrad) and compensations
(kahan), N of each. The handle owns the group; the group keeps the
variables alive.
)doc");

class VariableGroupOp : public OpKernel {
 public:
  explicit VariableGroupOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    std::vector<tensorflow::core::RefCountPtr<Var>> variables(
        ctx->num_inputs());
    for (int i = 0; i < ctx->num_inputs(); ++i) {
      OP_REQUIRES_OK(
          ctx, LookupResource(ctx, HandleFromInput(ctx, i), &variables[i]));
    }
    Tensor* handle;
    tensorflow::AllocatorAttributes on_host;
    on_host.set_on_host(true);
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, tensorflow::TensorShape({}),
                                             &handle, on_host));
    handle->scalar<tensorflow::ResourceHandle>()() =
        tensorflow::ResourceHandle::MakeRefCountingHandle<VariableGroup>(
            new VariableGroup(std::move(variables)), ctx->device()->name());
  }
};

REGISTER_KERNEL_BUILDER(Name("KerasAdamwVariableGroup")
                            .Device(tensorflow::DEVICE_CPU),
                        VariableGroupOp);

REGISTER_OP("KerasAdamwApplyAdam")
    .Input("group: resource")
    .Input("gradients: T")
    .Input("learning_rate: double")
    .Input("learning_rate_multiplier: double")
    .Input("beta_1: double")
    .Input("beta_2: double")
    .Input("epsilon: double")
    .Input("weight_decay: double")
    .Input("step: int64")
    .Input("ordered: M * resource")
    .Attr("T: list({half, bfloat16, float, double}) >= 1")
    .Attr("M: int >= 0")
    .Attr("independent_decay: bool = false")
    .Attr("kahan: bool = false")
    .SetIsStateful()
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext*) {
      return absl::OkStatus();
    })
    .Doc(R"doc(
Adam/AdamW update of N variables and their slots, in place.

group: a KerasAdamwVariableGroup of the N variables, then their slots, N of
  each, aligned with the variables: momentums, velocities, velocity hats
  (amsgrad), compensations (kahan).
gradients: N dense gradients (N = the length of T), each in its variable's compute dtype or (half
  precision, read without a float32 copy) its variable's dtype.
learning_rate: the step's learning rate (float64 scalar).
learning_rate_multiplier, beta_1, beta_2, epsilon, weight_decay: float64
  vectors of length N, one entry per variable; weight_decay 0 means no
  decay.
step: the 1-based step t (int64 scalar).
ordered: handles of variables of the group that the op only takes so that
  tf.function orders it with other ops on them (variables a function takes
  as arguments; the kernel does not read them).
independent_decay: decay by weight_decay alone (weight_decay_mode=
  "independent"), not weight_decay * learning_rate.
kahan: the group ends with a compensation per (half-precision) variable.
)doc");

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
    std::vector<DataType> gradient_dtypes;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &gradient_dtypes));
    n_ = static_cast<int>(gradient_dtypes.size());
    OP_REQUIRES_OK(ctx,
                   ctx->GetAttr("independent_decay", &independent_decay_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kahan", &kahan_));
  }

  void Compute(OpKernelContext* ctx) override {
    const int n = n_;
    tensorflow::core::RefCountPtr<VariableGroup> group;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &group));
    const int num_resources = static_cast<int>(group->variables().size());
    const int base = (kahan_ ? 4 : 3) * n;
    OP_REQUIRES(ctx, num_resources == base || num_resources == base + n,
                absl::InvalidArgumentError(absl::StrCat(
                    "the variable group holds ", num_resources,
                    " variables; ", n, " gradients need ", base,
                    " or, with amsgrad, ", base + n)));
    const bool amsgrad = num_resources == base + n;
    // resources[slot * n + i]: slot 0 the variable i, 1 its momentum, 2 its
    // velocity, then its velocity hat (amsgrad), then its compensation
    // (kahan).
    const int compensation_slot = amsgrad ? 4 : 3;
    std::vector<Var*> resources(num_resources);
    std::vector<tensorflow::mutex*> mutexes;
    for (int i = 0; i < num_resources; ++i) {
      resources[i] = group->variables()[i].get();
      mutexes.push_back(resources[i]->mu());
    }
    const int first_gradient = 1;
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
                  (gradient.dtype() == ComputeDtype(dtype) ||
                   gradient.dtype() == dtype) &&
                      gradient.shape() == variable.shape(),
                  absl::InvalidArgumentError(absl::StrCat(
                      "gradient ", i, " is ",
                      tensorflow::DataTypeString(gradient.dtype()),
                      gradient.shape().DebugString(), ", expected ",
                      tensorflow::DataTypeString(ComputeDtype(dtype)), " or ",
                      tensorflow::DataTypeString(dtype),
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
      job.gradient_dtype = ctx->input(first_gradient + i).dtype();
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
