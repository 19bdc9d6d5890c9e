// psa conform DIR...: checks the engine against golden Hugging Face / timm / torch data.
#include <cstdio>

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

int cmd_conform(int argc, char** argv) {
  cli::Args args;
  if (!cli::parse(argc, argv, {kConformUsage, {"--device", "--tol"}, {"--quiet"}}, &args)) return 0;
  PSA_CHECK(!args.positional.empty(), "conform: no fixture folder given (see --help)");
  double tol = args.get_double("--tol", 1e-4);
  std::string dev = args.get("--device", "cpu");
  PSA_CHECK(dev == "cpu" || dev == "cuda" || dev == "all", "--device: expected cpu, cuda or all, got '", dev, "'");
  std::vector<Device> devices;
  if (dev != "cuda") devices.push_back(Device::cpu);
  if (dev == "cuda" || (dev == "all" && gpu::available())) devices.push_back(Device::cuda);
  if (dev == "all" && !gpu::available()) std::printf("cuda: skipped (%s)\n", gpu::describe().c_str());
  bool all_ok = true;
  for (const std::string& dir : args.positional)
    for (Device d : devices) {
      nn::ConformReport r = nn::conform(dir, d, tol);
      if (!args.has("--quiet"))
        for (const auto& e : r.entries) std::printf("  %-70s %.3e %s\n", e.name.c_str(), e.rel_err, e.ok ? "" : "FAIL");
      std::printf("%s [%s, %s]: %zu tensors, worst relative error %.3e: %s\n", dir.c_str(), r.kind.c_str(),
                  device_name(d), r.entries.size(), r.worst(), r.ok() ? "PASS" : "FAIL");
      all_ok = all_ok && r.ok();
    }
  return all_ok ? 0 : 1;
}

}  // namespace psa
