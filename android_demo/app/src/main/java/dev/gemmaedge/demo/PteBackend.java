package dev.gemmaedge.demo;

import java.io.File;
import org.pytorch.executorch.extension.llm.LlmCallback;
import org.pytorch.executorch.extension.llm.LlmGenerationConfig;
import org.pytorch.executorch.extension.llm.LlmModule;

/**
 * A .pte through ExecuTorch's Android library (org.pytorch:executorch-android): LlmModule runs the
 * program in ExecuTorch's stock LLM runner, which reads the constant methods the exporter writes
 * (get_max_seq_len, get_eos_ids with <end_of_turn>, get_bos_id, ...), and the folder's tokenizer.json.
 */
final class PteBackend implements LlmBackend {
  private final ExportManifest manifest;
  private LlmModule module;

  PteBackend(ExportManifest manifest) {
    this.manifest = manifest;
  }

  @Override
  public void load() {
    String program = new File(manifest.folder, manifest.program).getPath();
    String tokenizer = new File(manifest.folder, manifest.tokenizer).getPath();
    float temperature = GenerationSettings.defaults().temperature;
    if (manifest.data == null) {  // exports before model.ptd held their weights in the program
      module = new LlmModule(program, tokenizer, temperature);
    } else {  // the weights' data file, the tied table stored once
      module = new LlmModule(program, tokenizer, temperature, new File(manifest.folder, manifest.data).getPath());
    }
    module.load();
  }

  @Override
  public boolean supportsTopKTopP() {
    return false;
  }

  @Override
  public GenerationStats generate(String prompt, GenerationSettings settings, final TextSink sink) {
    final GenerationStats[] stats = new GenerationStats[1];
    final String[] error = new String[1];
    // The whole conversation from position 0 each turn: the stock runner's cache position only moves on.
    module.resetContext();
    LlmGenerationConfig config = LlmGenerationConfig.create()
        .seqLen(manifest.maxSeqLen)
        .maxNewTokens(settings.maxNewTokens)
        .temperature(settings.temperature)
        .numBos(1)  // the prompt starts with <bos>, as the Python runtime's does
        .echo(false)
        .build();
    module.generate(prompt, config, new LlmCallback() {
      @Override
      public void onResult(String piece) {
        sink.onText(piece);
      }

      @Override
      public void onStats(String json) {
        stats[0] = GenerationStats.fromExecuTorchJson(json);
      }

      @Override
      public void onError(int code, String message) {
        error[0] = "ExecuTorch error " + code + ": " + message;
      }
    });
    if (error[0] != null) {
      throw new IllegalStateException(error[0]);
    }
    return stats[0];
  }

  @Override
  public void stop() {
    LlmModule m = module;
    if (m != null) {
      m.stop();
    }
  }

  @Override
  public void close() {
    if (module != null) {
      module.close();
      module = null;
    }
  }
}
