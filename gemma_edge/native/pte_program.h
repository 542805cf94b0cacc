// An exported gemma-edge .pte program: load it, then call it with tokens at cache positions.
//
// The one native piece of gemma-edge: the emulated-arm64 parity check drives it through
// runner_main.cpp, and an app or board links it as it is (no libtorch; ExecuTorch's runtime,
// its optimized and quantized kernels and the XNNPACK delegate only).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace executorch::extension::module {
class Module;
}

namespace gemma_edge {

class PteProgram {
 public:
  // Loads model.pte and the data file holding its weights (model.ptd; none for programs that hold
  // their own), both memory-mapped, its "forward" method and, where the program has one, its
  // "prefill" method (calls at position 0: attention over the call's own keys, the cache shared with
  // forward); throws std::runtime_error saying why not.
  // threads > 0: the size of ExecuTorch's thread pool (XNNPACK's and the kernels'), set before the
  // program loads; 0: ExecuTorch's default (the performance cores it finds).
  explicit PteProgram(const std::string& path, const std::string& data_path = "", uint32_t threads = 0);
  ~PteProgram();

  // Places tokens at positions start_pos.. of the static KV cache and returns the logits of the
  // last one: the exporter's contract, forward(tokens [1, T], input_pos [T]) -> [1, vocab], one
  // call per chunk of at most get_max_seq_len tokens (the program's memory plan holds that many).
  // Throws std::runtime_error when the call fails (e.g. past the cache's end).
  const std::vector<float>& forward_last(const std::vector<int64_t>& tokens, int64_t start_pos);

  int64_t vocab_size() const { return vocab_size_; }
  int64_t max_seq_len() const { return max_seq_len_; }  // positions the cache holds
  bool has_prefill_method() const { return has_prefill_; }

 private:
  static constexpr const char* kForward = "forward";
  static constexpr const char* kPrefill = "prefill";  // calls at position 0, where the program has it
  std::unique_ptr<executorch::extension::module::Module> module_;
  bool has_prefill_ = false;
  int64_t vocab_size_ = 0;
  int64_t max_seq_len_ = 0;
  int64_t max_tokens_per_call_ = 1;
  std::vector<int64_t> positions_;  // [T], rebuilt per call
  std::vector<float> logits_;  // [vocab], the last call's
};

}  // namespace gemma_edge
