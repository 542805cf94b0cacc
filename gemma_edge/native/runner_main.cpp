// gemma-edge-runner [--threads N] MODEL.pte [MODEL.ptd]: serves forward_last calls over stdin/stdout for a host process
// (gemma_edge/runtime/native_backend.py; under QEMU for the arm64 parity check).
//
// Binary, native byte order, one request at a time:
//   ready:    "GERN" int32 version=2 int64 vocab_size int64 max_seq_len int64 prefill (1: calls at position 0
//             go to the program's prefill method)
//   request:  int32 count (0 = quit) int64 start_pos int64 tokens[count]
//   response: int32 0 float32 logits[vocab_size]   or   int32 1 int32 length char message[length]
// A program that fails to load prints why on stderr and exits with 1.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "pte_program.h"

namespace {

bool read_exactly(void* data, size_t bytes) { return std::fread(data, 1, bytes, stdin) == bytes; }

void write(const void* data, size_t bytes) { std::fwrite(data, 1, bytes, stdout); }

void write_int32(int32_t value) { write(&value, sizeof value); }

}  // namespace

int main(int argc, char** argv) {
  uint32_t threads = 0;  // ExecuTorch's default
  int first = 1;
  if (argc > 2 && std::string(argv[1]) == "--threads") {
    threads = static_cast<uint32_t>(std::strtoul(argv[2], nullptr, 10));
    first = 3;
  }
  const int files = argc - first;
  if (files < 1 || files > 2 || std::string(argv[first]) == "--help" || (first == 3 && threads == 0)) {
    std::fprintf(stderr, "usage: %s [--threads N] MODEL.pte [MODEL.ptd]   (requests on stdin, logits on stdout: see runner_main.cpp)\n",
                 argv[0]);
    return argc == 2 && std::string(argv[1]) == "--help" ? 0 : 2;
  }
  try {
    gemma_edge::PteProgram program(argv[first], files == 2 ? argv[first + 1] : "", threads);
    const int64_t header[3] = {program.vocab_size(), program.max_seq_len(), program.has_prefill_method()};
    write("GERN", 4);
    write_int32(2);
    write(header, sizeof header);
    std::fflush(stdout);
    std::vector<int64_t> tokens;
    for (int32_t count; read_exactly(&count, sizeof count) && count > 0;) {
      int64_t start_pos;
      tokens.resize(count);
      if (!read_exactly(&start_pos, sizeof start_pos) || !read_exactly(tokens.data(), count * sizeof(int64_t))) {
        std::fprintf(stderr, "gemma-edge-runner: truncated request\n");
        return 1;
      }
      try {
        const auto& logits = program.forward_last(tokens, start_pos);
        write_int32(0);
        write(logits.data(), logits.size() * sizeof(float));
      } catch (const std::exception& e) {
        const std::string message = e.what();
        write_int32(1);
        write_int32(static_cast<int32_t>(message.size()));
        write(message.data(), message.size());
      }
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gemma-edge-runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
