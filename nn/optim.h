// Optimizers, gradient clipping and learning-rate schedules with PyTorch / Hugging Face semantics
// (psa-vlm.md §4.2: AdamW β (0.9, 0.999), ε 1e-8, weight decay 0, clip at norm 1.0, linear warmup then linear
// decay to 0). The arithmetic is in fused kernels (tensor/cpu/optim.cpp, tensor/cuda/optim.cu, picked by the
// parameters' device); this file keeps the bookkeeping:
// which parameters, their state, the step count, and the checks that give errors naming the parameter.
//
// A training step:  lr = lr_at(schedule, opt.step()); opt.set_lr(lr); loss.backward();
//                   clip_grad_norm(opt.params(), 1.0); opt.update(); opt.zero_grad();
// (HF calls the scheduler after the optimizer, so update number k, counted from 0, uses lr_at(schedule, k).)
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nn/module.h"

namespace psa::nn {

struct ParamRef {
  std::string name;  // names the parameter in errors and its optimizer state in checkpoints
  Tensor param;
  double lr_scale = 1.0;  // this parameter's learning rate = lr() * lr_scale (torch: a parameter group's lr)
};

// The parameters of `m` that require a gradient, in named_parameters() order.
std::vector<ParamRef> trainable(const Module& m);

// What every optimizer shares: the parameters, the current learning rate and the number of updates done.
class Optimizer {
 public:
  Optimizer(std::vector<ParamRef> params, double lr, const char* name);
  virtual ~Optimizer() = default;

  // One update from the current gradients (torch's optimizer.step()). Parameters whose grad is undefined are
  // skipped and their state is left as it is.
  virtual void update() = 0;
  void zero_grad();  // drops the gradients, so the next backward() starts from zero instead of accumulating
  void set_lr(double lr);
  double lr() const { return lr_; }
  int64_t step() const { return step_; }  // updates done so far
  const std::vector<ParamRef>& params() const { return params_; }

 protected:
  // Throws, before anything is modified, unless every gradient is on its parameter's device with its shape and dtype.
  void check_grads() const;

  std::vector<ParamRef> params_;
  double lr_;
  int64_t step_ = 0;
  const char* name_;
};

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0;  // decoupled: p -= lr·wd·p before the Adam step
};

// torch.optim.AdamW. One step count for all parameters (torch keeps one per parameter; they differ only for a
// parameter that missed a gradient on some update, where torch would use a smaller bias correction).
class AdamW : public Optimizer {
 public:
  AdamW(std::vector<ParamRef> params, double lr = 1e-3, AdamWOptions options = {});
  void update() override;

  // Copies of the moments, keyed "<param name>.exp_avg" and "<param name>.exp_avg_sq"; with step() this is all a
  // resumed run needs to continue bit-identically.
  std::map<std::string, Tensor> state() const;
  // Every key of state() must be present with the parameter's shape (dtype is converted) and no other key;
  // errors name the key. Nothing is modified unless the whole state fits.
  void load_state(const std::map<std::string, Tensor>& state, int64_t step);
  const AdamWOptions& options() const { return options_; }

 private:
  AdamWOptions options_;
  std::vector<Tensor> exp_avg_, exp_avg_sq_;  // one per parameter, same shape, dtype and device
};

struct SgdOptions {
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;  // coupled, as in torch: g += wd·p
  bool nesterov = false;
};

// torch.optim.SGD. The momentum buffer of a parameter starts as its first gradient (no dampening on that step).
class SGD : public Optimizer {
 public:
  SGD(std::vector<ParamRef> params, double lr, SgdOptions options = {});
  void update() override;
  const SgdOptions& options() const { return options_; }

 private:
  SgdOptions options_;
  std::vector<Tensor> momentum_buffer_;  // undefined until the parameter's first update (or without momentum)
};

// torch.nn.utils.clip_grad_norm_: the L2 norm of all gradients together (accumulated in double, in the order of
// `params`, so the same on any thread count); when max_norm / (norm + 1e-6) < 1 every gradient is multiplied by
// it. Returns the norm before clipping. A non-finite norm leaves the gradients alone (torch would fill them with
// NaN or zeros): the caller sees it in the result and skips the update. The norm is non-finite exactly when some
// gradient holds a NaN or an infinity (a float squared cannot overflow a double), so it doubles as that check.
double clip_grad_norm(const std::vector<ParamRef>& params, double max_norm);

// Learning-rate schedules of transformers.get_{constant,linear,cosine}_schedule_with_warmup: linear warmup
// lr = peak·step/warmup for step < warmup_steps, then
//   constant: peak
//   linear:   peak·(total - step)/(total - warmup), reaching 0 at total_steps (min_lr is not used, as in HF)
//   cosine:   min_lr + (peak - min_lr)·½(1 + cos(π·progress)), progress = (step - warmup)/(total - warmup)
// Past total_steps linear stays at 0 and cosine at min_lr (HF's cosine would rise again).
struct Schedule {
  enum Kind { constant, linear, cosine } kind = linear;
  double peak_lr = 0;
  int64_t warmup_steps = 0, total_steps = 0;
  double min_lr = 0;
};
double lr_at(const Schedule& schedule, int64_t step);

}  // namespace psa::nn
