package dev.gemmaedge.demo;

import java.util.Locale;
import org.json.JSONException;
import org.json.JSONObject;

/** One reply's counts and timings, and the speeds shown under it. */
public final class GenerationStats {
  public final int promptTokens;
  public final int generatedTokens;
  public final long prefillMs;  // the prompt through the model, up to the first token's logits
  public final long firstTokenMs;  // from the start to the first generated token
  public final long decodeMs;  // the first generated token to the last

  public GenerationStats(int promptTokens, int generatedTokens, long prefillMs, long firstTokenMs, long decodeMs) {
    this.promptTokens = promptTokens;
    this.generatedTokens = generatedTokens;
    this.prefillMs = prefillMs;
    this.firstTokenMs = firstTokenMs;
    this.decodeMs = decodeMs;
  }

  /** From the JSON ExecuTorch's LLM runner hands LlmCallback.onStats (extension/llm/runner/stats.h). */
  public static GenerationStats fromExecuTorchJson(String json) {
    try {
      JSONObject s = new JSONObject(json);
      long start = s.getLong("inference_start_ms");
      long firstToken = s.getLong("first_token_ms");
      return new GenerationStats(s.getInt("prompt_tokens"), s.getInt("generated_tokens"),
          s.getLong("prompt_eval_end_ms") - start, firstToken - start, s.getLong("inference_end_ms") - firstToken);
    } catch (JSONException e) {
      throw new IllegalArgumentException("not ExecuTorch runner stats: " + e.getMessage(), e);
    }
  }

  public double prefillTokensPerSecond() {
    return prefillMs > 0 ? promptTokens * 1000.0 / prefillMs : 0;
  }

  /** Tokens after the first over the time after the first: the steady decode rate. */
  public double decodeTokensPerSecond() {
    return decodeMs > 0 && generatedTokens > 1 ? (generatedTokens - 1) * 1000.0 / decodeMs : 0;
  }

  /** The line the Python runtime prints, without the parts the backends do not report. */
  public String summary() {
    return String.format(Locale.ROOT, "%d prompt tokens, %d generated, first token %d ms, prefill %.1f tok/s, decode %.1f tok/s",
        promptTokens, generatedTokens, firstTokenMs, prefillTokensPerSecond(), decodeTokensPerSecond());
  }
}
