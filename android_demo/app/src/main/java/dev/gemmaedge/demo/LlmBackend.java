package dev.gemmaedge.demo;

import java.io.Closeable;

/** One exported model behind one interface; ModelRunner calls it on its worker thread only
 * (stop() excepted: any thread). */
public interface LlmBackend extends Closeable {
  /** Text pieces of the reply as the model produces them. */
  interface TextSink {
    void onText(String piece);
  }

  /** Loads the program and tokenizer: seconds for large models. */
  void load() throws Exception;

  /** Whether top-k and top-p apply (ExecuTorch's stock runner samples with temperature only). */
  boolean supportsTopKTopP();

  /** Generates a reply to prompt (the whole conversation, formatted), blocking until it ends. */
  GenerationStats generate(String prompt, GenerationSettings settings, TextSink sink) throws Exception;

  /** Asks a running generate() to end after the current token. */
  void stop();

  /**
   * The backend of an export's format. The ONNX one is looked up by name: it is the one class that
   * needs ONNX Runtime GenAI's library, which an app shipping only .pte exports can leave out
   * (and whose Java API is not reachable from the machines that type-check the rest).
   */
  static LlmBackend forManifest(ExportManifest manifest) throws Exception {
    if (manifest.format.equals("pte")) {
      return new PteBackend(manifest);
    }
    Class<?> genai;
    try {
      genai = Class.forName("dev.gemmaedge.demo.GenAiBackend");
    } catch (ClassNotFoundException e) {
      throw new IllegalStateException("this build has no ONNX backend: keep GenAiBackend.java and the "
          + "onnxruntime-genai-android dependency in app/build.gradle, or export to .pte", e);
    }
    return (LlmBackend) genai.getDeclaredConstructor(ExportManifest.class).newInstance(manifest);
  }
}
