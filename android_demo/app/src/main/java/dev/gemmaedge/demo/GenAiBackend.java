package dev.gemmaedge.demo;

import ai.onnxruntime.genai.Generator;
import ai.onnxruntime.genai.GeneratorParams;
import ai.onnxruntime.genai.Model;
import ai.onnxruntime.genai.Sequences;
import ai.onnxruntime.genai.Tokenizer;
import ai.onnxruntime.genai.TokenizerStream;

/**
 * An ONNX export through ONNX Runtime GenAI's Android library (com.microsoft.onnxruntime:
 * onnxruntime-genai-android): it loads the folder as the exporter wrote it (genai_config.json,
 * model.onnx, tokenizer.json) and runs the contrib graph (GroupQueryAttention, MatMulNBits) on
 * ONNX Runtime's ARM kernels. tests/test_real_onnx.py proves GenAI greedy-generates the tokens
 * gemma-edge's own runtime does.
 */
final class GenAiBackend implements LlmBackend {
  private final ExportManifest manifest;
  private Model model;
  private Tokenizer tokenizer;
  private volatile boolean stopRequested;

  GenAiBackend(ExportManifest manifest) {
    this.manifest = manifest;
  }

  @Override
  public void load() throws Exception {
    model = new Model(manifest.folder.getPath());
    tokenizer = new Tokenizer(model);
  }

  @Override
  public boolean supportsTopKTopP() {
    return true;
  }

  @Override
  public GenerationStats generate(String prompt, GenerationSettings settings, TextSink sink) throws Exception {
    stopRequested = false;
    int[] ids = withBos(prompt);
    int budget = settings.budget(ids.length, manifest.maxSeqLen);
    if (budget == 0) {
      throw new IllegalArgumentException("the conversation fills the model's " + manifest.maxSeqLen
          + "-token context: start a new chat");
    }
    long start = System.nanoTime();
    long firstToken = 0;
    int generated = 0;
    try (GeneratorParams params = new GeneratorParams(model);
         TokenizerStream stream = tokenizer.createStream()) {
      params.setSearchOption("max_length", ids.length + budget);
      params.setSearchOption("do_sample", settings.temperature > 0);
      if (settings.temperature > 0) {
        params.setSearchOption("temperature", settings.temperature);
        params.setSearchOption("top_k", settings.topK);
        params.setSearchOption("top_p", settings.topP);
      }
      try (Generator generator = new Generator(model, params)) {
        generator.appendTokens(ids);  // the prompt in one call
        while (!generator.isDone() && !stopRequested) {
          generator.generateNextToken();
          int token = generator.getLastTokenInSequence(0);
          if (generated++ == 0) {
            firstToken = System.nanoTime();
          }
          if (manifest.stopTokenIds.contains(token)) {
            break;
          }
          sink.onText(stream.decode(token));
        }
      }
    }
    long end = System.nanoTime();
    long firstMs = (firstToken - start) / 1_000_000;
    return new GenerationStats(ids.length, generated, firstMs, firstMs, (end - firstToken) / 1_000_000);
  }

  // GenAI's encode() adds no <bos>; Gemma needs it first, as the Python runtime sends it.
  private int[] withBos(String prompt) throws Exception {
    try (Sequences sequences = tokenizer.encode(prompt)) {
      int[] text = sequences.getSequence(0);
      int[] ids = new int[text.length + 1];
      ids[0] = manifest.bosTokenId;
      System.arraycopy(text, 0, ids, 1, text.length);
      return ids;
    }
  }

  @Override
  public void stop() {
    stopRequested = true;
  }

  @Override
  public void close() {
    if (tokenizer != null) {
      tokenizer.close();
    }
    if (model != null) {
      model.close();
    }
    tokenizer = null;
    model = null;
  }
}
