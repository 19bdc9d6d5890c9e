// psa conform DIR...: checks the engine against golden Hugging Face / timm / torch data.
#include <cstdio>
#include <filesystem>

#include "nn/checkpoint.h"
#include "nn/conform.h"
#include "tensor/device.h"
#include "tools/cli.h"

namespace psa {

static const char* kConformUsage = R"(usage: psa conform [--device cpu|cuda|all] [--tol 1e-4] [--quiet] DIR...

Runs forward and backward of the model described by DIR/config.json, loading DIR/model.safetensors, on the
inputs in DIR/io.safetensors, and compares every stored output, the loss, every parameter gradient
(grad.<name>) and input gradient (grad_input.<name>): relative error ||ours - theirs|| / ||theirs||.
Parameters without a grad.<name> entry must receive no (or an all-zero) gradient.

Kinds (detected from config.json): clip_vision (HF CLIPVisionModel), llama (LlamaForCausalLM),
llava (LlavaForConditionalGeneration), c_abstractor (timm RegStage C-Abstractor, {"kind": "c_abstractor"}),
mha (torch.nn.MultiheadAttention as cross-attention, {"kind": "torch.nn.MultiheadAttention"}).
Every dimension is read from config.json, so other configurations of the same kinds work too.

io.safetensors keys: inputs (pixel_values, input_ids, labels, x, query, key_value, loss_weight), outputs
(hidden_states.<i>, last_hidden_state, pooler_output, logits, y, attn_weights), loss, grad.<param>,
grad_input.<input>. Exit status: 0 when every error is <= --tol, 1 otherwise, 2 on bad input.)";

// The devices --device names. A GPU asked for by name must be there; "all" runs what the machine has and says
// in one line that CUDA was skipped.
static std::vector<Device> conform_devices(const std::string& dev) {
  PSA_CHECK(dev == "cpu" || dev == "cuda" || dev == "all", "--device: expected cpu, cuda or all, got '", dev, "'");
  if (dev == "cpu") return {Device::cpu};
  if (dev == "cuda") {
    PSA_CHECK(gpu::available(), "conform --device cuda: no usable GPU (", gpu::describe(), ")");
    return {Device::cuda};
  }
  if (gpu::available()) return {Device::cpu, Device::cuda};
  std::printf("conform --device all: CUDA skipped, no usable GPU (%s)\n", gpu::describe().c_str());
  return {Device::cpu};
}

// Every folder is checked before the first one runs, so a typo in the last one does not come after minutes of
// output. An empty name would silently mean the current directory.
static void check_fixture_dir(const std::string& dir) {
  PSA_CHECK(!dir.empty(), "conform: empty fixture folder name");
  const bool is_dir = nn::naming_fs_errors([&] { return std::filesystem::is_directory(dir); });
  PSA_CHECK(is_dir, dir, ": not a fixture folder (no such directory)");
}

static void print_report(const std::string& dir, Device d, const nn::ConformReport& r, bool quiet) {
  if (!quiet)
    for (const auto& e : r.entries) {
      if (e.name.rfind("unchecked.", 0) == 0)
        std::printf("  %-70s FAIL: stored, but this model has no such output or parameter\n", e.name.c_str() + 10);
      else
        std::printf("  %-70s %.3e %s\n", e.name.c_str(), e.rel_err, e.ok ? "" : "FAIL");
    }
  size_t unchecked = 0;
  for (const auto& e : r.entries) unchecked += e.name.rfind("unchecked.", 0) == 0;
  std::printf("%s [%s, %s]: %zu tensors, worst relative error %.3e%s: %s\n", dir.c_str(), r.kind.c_str(), device_name(d),
              r.entries.size() - unchecked, r.worst(),
              unchecked ? str_cat(", ", unchecked, unchecked == 1 ? " stored tensor" : " stored tensors", " not compared").c_str() : "", r.ok() ? "PASS" : "FAIL");
}

int cmd_conform(int argc, char** argv) {
  cli::Args args;
  if (!cli::parse(argc, argv, {kConformUsage, {"--device", "--tol"}, {"--quiet"}}, &args)) return 0;
  PSA_CHECK(!args.positional.empty(), "conform: no fixture folder given (see --help)");
  // A relative error bound: 0 or less (or NaN) can never pass, and above 1 it would pass a zero output.
  const double tol = args.get_double("--tol", 1e-4);
  PSA_CHECK(tol > 0 && tol <= 1, "--tol: ", args.get("--tol"), " is out of range (0, 1]");
  for (const std::string& dir : args.positional) check_fixture_dir(dir);
  const std::vector<Device> devices = conform_devices(args.get("--device", "cpu"));
  bool all_ok = true;
  for (const std::string& dir : args.positional)
    for (Device d : devices) {
      // With several folders, an error must say which one: messages that do not name it get it in front.
      nn::ConformReport r = nn::naming_fs_errors([&] {
        try {
          return nn::conform(dir, d, tol);
        } catch (const Error& e) {
          const std::string message = e.what();
          if (message.find(dir) != std::string::npos) throw;
          fail(dir, ": ", message);
        }
      });
      print_report(dir, d, r, args.has("--quiet"));
      all_ok = all_ok && r.ok();
    }
  return all_ok ? 0 : 1;
}

}  // namespace psa
