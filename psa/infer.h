// Inference with dynamic safety control (psa-vlm.md §5): the safety head classifies the image with the plain
// prompt, the policy turns (level, type) into nothing, a Safe Hint in the user turn, or a fixed refusal, and
// the LLM answers greedily with the KV cache. Also the head's attention as a heat map (explanations).
#pragma once
#include <string>
#include <vector>

#include "nn/llama.h"
#include "psa/checkpoint.h"
#include "psa/image.h"
#include "psa/policy.h"

namespace psa {

// The safety head's softmax outputs for one image and its (level, type) by independent argmaxes (§5 step 2).
struct HeadPrediction {
  int level = 0, type = kCleanType;
  std::vector<double> level_probs, type_probs;  // [4], [7]
};

struct InferResult {
  int level = 0, type = kCleanType;
  std::vector<double> level_probs, type_probs;
  std::string action;  // none | hint | refuse
  std::string hint;    // the Safe Hint put in the prompt (action hint) or the refusal sentence (action refuse)
  std::string prompt;  // the prompt text the LLM saw (without BOS); empty when the policy refused
  std::string answer;
  std::vector<int64_t> answer_ids;  // generated ids without the stop token; empty when refused
};

// Only stage1/stage2 checkpoints have a trained head and an LLM that saw the LLM-side safety tokens.
bool has_safety_tokens(const Checkpoint& c);

// The question as the prompt template expects it: "<image>" tags removed (the template adds the one image
// token), surrounding whitespace trimmed.
std::string clean_question(const std::string& question);

// Positions the LLM sees for a prompt: its text tokens with the one image token replaced by the image inserts
// (projected patches, plus the LLM-side safety tokens for stage1/stage2 checkpoints).
int64_t prompt_positions(const Checkpoint& c, const std::string& question, const std::string& hint);
// Refuses a policy whose hint cannot fit the checkpoint's max_position_embeddings even with an empty question,
// naming the policy, level and type (such a hint could never be used). No-op for a base checkpoint.
void check_policy_fits(const Checkpoint& c, const Policy& policy);
// The prompt (plus the hint, when not empty) does not fit: a reason that names `source`, the question and the
// hint; empty when it fits.
std::string prompt_too_long(const Checkpoint& c, const std::string& question, const std::string& hint,
                            const std::string& source);

// Batched classification under NoGrad; pixels[i] is [3, S, S] preprocessed at the model's image size.
// Non-finite head outputs (NaN/Inf weights) are an error naming the checkpoint.
std::vector<HeadPrediction> classify_images(const Checkpoint& c, const std::vector<const std::vector<float>*>& pixels,
                                            const std::vector<std::string>& questions);

// Steps (b) and (c) of infer() for a given head prediction. Thread-safe (no model state is changed), so
// the benchmark runs it for many records at once. The model must already be in eval mode. A prompt (with
// the policy's hint) longer than the LLM's positions is an error naming the policy, level and type.
InferResult respond(const Checkpoint& c, const std::vector<float>& pixels, const std::string& question,
                    const HeadPrediction& head, const Policy& policy, const nn::SamplingOptions& opt, bool control);

// (a) classify with the plain prompt, (b) with control on and a trained head: decide(policy, level, type);
// "refuse" answers with the refusal sentence without generating, "hint" puts the hint in the prompt;
// (c) generate (EOS is added to the stop ids when none are given), decode and trim.
InferResult infer(const Checkpoint& c, const std::vector<float>& pixels, const std::string& question,
                  const Policy& policy, const nn::SamplingOptions& opt, bool control);

// The safety head's attention for the plain prompt, averaged over heads, with the N_s safety-token keys
// dropped, on the patch grid, upsampled bilinearly to `display` px and blended in red over `original`
// (resized on the short side and centre-cropped as the model saw it).
Image explain_heatmap(const Checkpoint& c, const std::vector<float>& pixels, const Image& original,
                      const std::string& question, int display = 256);

}  // namespace psa
