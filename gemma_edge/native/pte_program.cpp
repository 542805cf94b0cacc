#include "pte_program.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

namespace gemma_edge {

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::module::Module;
using executorch::runtime::Error;

namespace {

void check(Error error, const std::string& what) {
  if (error != Error::Ok) {
    throw std::runtime_error(what + " failed: " + executorch::runtime::to_string(error));
  }
}

// A constant method the exporter writes (get_max_seq_len, get_vocab_size, ...).
int64_t constant(Module& module, const char* name) {
  auto result = module.execute(name);
  check(result.error(), std::string("reading ") + name + " (was the .pte exported by gemma-edge?)");
  return result->at(0).toInt();
}

}  // namespace

PteProgram::PteProgram(const std::string& path) : module_(std::make_unique<Module>(path, Module::LoadMode::Mmap)) {
  check(module_->load(), "loading " + path);
  check(module_->load_method("forward"), "loading the forward method of " + path);
  vocab_size_ = constant(*module_, "get_vocab_size");
  max_seq_len_ = constant(*module_, "get_max_context_len");  // positions the cache holds
  max_tokens_per_call_ = constant(*module_, "get_max_seq_len");  // the longest call: prompts go in chunks
  logits_.resize(vocab_size_);
}

PteProgram::~PteProgram() = default;

const std::vector<float>& PteProgram::forward_last(const std::vector<int64_t>& tokens, int64_t start_pos) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < 1 || start_pos < 0 || start_pos + n > max_seq_len_) {
    throw std::runtime_error("positions " + std::to_string(start_pos) + ".." + std::to_string(start_pos + n - 1) +
                             " are outside the cache's 0.." + std::to_string(max_seq_len_ - 1));
  }
  positions_.resize(n);
  std::iota(positions_.begin(), positions_.end(), start_pos);
  for (int64_t start = 0; start < n; start += max_tokens_per_call_) {
    const int64_t count = std::min(max_tokens_per_call_, n - start);
    // The tensors borrow the vectors' memory for the call: [1, T] and [T], int64 as exported.
    auto ids = from_blob(const_cast<int64_t*>(tokens.data() + start), {1, static_cast<int32_t>(count)}, ScalarType::Long);
    auto pos = from_blob(positions_.data() + start, {static_cast<int32_t>(count)}, ScalarType::Long);
    auto outputs = module_->forward({*ids, *pos});
    check(outputs.error(), "forward");
    const auto& logits = outputs->at(0).toTensor();  // [1, vocab], float32
    if (logits.scalar_type() != ScalarType::Float || logits.numel() != vocab_size_) {
      throw std::runtime_error("forward returned " + std::to_string(logits.numel()) + " values, expected [1, " +
                               std::to_string(vocab_size_) + "] float32");
    }
    std::memcpy(logits_.data(), logits.const_data_ptr<float>(), vocab_size_ * sizeof(float));
  }
  return logits_;
}

}  // namespace gemma_edge
