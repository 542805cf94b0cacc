package dev.gemmaedge.demo;

/** What the user sets for one reply: sampling and length. Immutable; checked when made. */
public final class GenerationSettings {
  public final float temperature;  // 0 = greedy
  public final int topK;  // 0 = off
  public final float topP;  // 1 = off
  public final int maxNewTokens;

  public GenerationSettings(float temperature, int topK, float topP, int maxNewTokens) {
    if (!(temperature >= 0f) || temperature > 5f) {
      throw new IllegalArgumentException("temperature must be between 0 (greedy) and 5, got " + temperature);
    }
    if (topK < 0) {
      throw new IllegalArgumentException("top-k must be 0 (off) or more, got " + topK);
    }
    if (!(topP > 0f) || topP > 1f) {
      throw new IllegalArgumentException("top-p must be in (0, 1], got " + topP);
    }
    if (maxNewTokens < 1) {
      throw new IllegalArgumentException("max tokens must be at least 1, got " + maxNewTokens);
    }
    this.temperature = temperature;
    this.topK = topK;
    this.topP = topP;
    this.maxNewTokens = maxNewTokens;
  }

  public static GenerationSettings defaults() {
    return new GenerationSettings(0.7f, 64, 0.95f, 256);
  }

  /** Parses the settings fields of the UI; a field left empty keeps the default. */
  public static GenerationSettings parse(String temperature, String topK, String topP, String maxNewTokens) {
    GenerationSettings d = defaults();
    try {
      return new GenerationSettings(
          temperature.trim().isEmpty() ? d.temperature : Float.parseFloat(temperature.trim()),
          topK.trim().isEmpty() ? d.topK : Integer.parseInt(topK.trim()),
          topP.trim().isEmpty() ? d.topP : Float.parseFloat(topP.trim()),
          maxNewTokens.trim().isEmpty() ? d.maxNewTokens : Integer.parseInt(maxNewTokens.trim()));
    } catch (NumberFormatException e) {
      throw new IllegalArgumentException("settings must be numbers: " + e.getMessage(), e);
    }
  }

  /** Tokens a reply may have when the prompt holds promptTokens of a cache of maxSeqLen. */
  public int budget(int promptTokens, int maxSeqLen) {
    return Math.max(0, Math.min(maxNewTokens, maxSeqLen - promptTokens));
  }
}
