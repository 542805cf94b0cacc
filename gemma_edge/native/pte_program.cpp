#include "pte_program.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <stdexcept>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>

// ExecuTorch's thread pool (extension/threadpool/threadpool.h, which its wheels do not ship; the
// library, libexecutorch_threadpool, exports these two).
namespace executorch::extension::threadpool {
class ThreadPool final {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

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

namespace {

// Before the program loads: XNNPACK takes the pool's threads when it initializes its delegates.
void set_threads(uint32_t threads) {
  if (threads > 0 && !executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads)) {
    throw std::runtime_error("setting " + std::to_string(threads) + " threads failed");
  }
}

// XNNPACK's weight cache: a method's delegates take the packed weights another method already
// packed from the same data (forward and prefill read one set), instead of each packing its own.
void share_packed_weights() {
  executorch::runtime::BackendOptions<1> options;
  options.set_option("weight_cache_enabled", true);
  check(executorch::runtime::set_option("XnnpackBackend", options.view()), "turning on XNNPACK's weight cache");
}

std::vector<std::string> data_files(const std::string& data_path) {
  return data_path.empty() ? std::vector<std::string>{} : std::vector<std::string>{data_path};
}

}  // namespace

PteProgram::PteProgram(const std::string& path, const std::string& data_path, uint32_t threads) {
  set_threads(threads);
  share_packed_weights();
  // Shared memory arenas: the methods' mutable buffers (the KV cache) are one set.
  module_ = std::make_unique<Module>(path, data_files(data_path), Module::LoadMode::Mmap, nullptr, nullptr, nullptr,
                                     /*share_memory_arenas=*/true);
  check(module_->load(), "loading " + path + (data_path.empty() ? "" : " with " + data_path));
  check(module_->load_method(kForward), std::string("loading the ") + kForward + " method of " + path);
  auto names = module_->method_names();
  check(names.error(), "listing the methods of " + path);
  if (names->count(kPrefill)) {  // exports since the prefill method: calls at position 0
    check(module_->load_method(kPrefill), std::string("loading the ") + kPrefill + " method of " + path);
    has_prefill_ = true;
  }
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
    const std::string method = start_pos + start == 0 && has_prefill_ ? kPrefill : kForward;
    auto outputs = module_->execute(method, {*ids, *pos});
    check(outputs.error(), method);
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
