package dev.gemmaedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;

import org.junit.Test;

public class GenerationStatsTest {
  // The fields ExecuTorch's runner writes (extension/llm/runner/stats.h stats_to_json_string).
  static final String EXECUTORCH = "{\"prompt_tokens\":20,\"generated_tokens\":48,\"model_load_start_ms\":1000,"
      + "\"model_load_end_ms\":1500,\"inference_start_ms\":2000,\"inference_end_ms\":3100,"
      + "\"model_execution_start_ms\":2000,\"model_execution_end_ms\":3100,\"prompt_eval_end_ms\":2080,"
      + "\"first_token_ms\":2100,\"aggregate_sampling_time_ms\":12,\"SCALING_FACTOR_UNITS_PER_SECOND\":1000}";

  @Test
  public void executorchStatsGiveThePrefillAndDecodeRates() {
    GenerationStats s = GenerationStats.fromExecuTorchJson(EXECUTORCH);
    assertEquals(20, s.promptTokens);
    assertEquals(48, s.generatedTokens);
    assertEquals(80, s.prefillMs);
    assertEquals(100, s.firstTokenMs);
    assertEquals(1000, s.decodeMs);
    assertEquals(250.0, s.prefillTokensPerSecond(), 1e-9);  // 20 tokens in 80 ms
    assertEquals(47.0, s.decodeTokensPerSecond(), 1e-9);  // 47 tokens after the first in 1 s
    assertEquals("20 prompt tokens, 48 generated, first token 100 ms, prefill 250.0 tok/s, decode 47.0 tok/s", s.summary());
  }

  @Test
  public void zeroTimesGiveZeroRatesNotInfinity() {
    GenerationStats s = new GenerationStats(5, 1, 0, 0, 0);
    assertEquals(0.0, s.prefillTokensPerSecond(), 0);
    assertEquals(0.0, s.decodeTokensPerSecond(), 0);
  }

  @Test
  public void otherJsonIsRefusedWithTheReason() {
    IllegalArgumentException e = assertThrows(IllegalArgumentException.class,
        () -> GenerationStats.fromExecuTorchJson("{\"prompt_tokens\":1}"));
    assertEquals(true, e.getMessage().startsWith("not ExecuTorch runner stats"));
  }
}
