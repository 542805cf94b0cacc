package dev.gemmaedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import org.junit.Test;

public class GenerationSettingsTest {
  @Test
  public void emptyFieldsKeepTheDefaults() {
    GenerationSettings s = GenerationSettings.parse("", " ", "", "");
    GenerationSettings d = GenerationSettings.defaults();
    assertEquals(d.temperature, s.temperature, 0);
    assertEquals(d.topK, s.topK);
    assertEquals(d.topP, s.topP, 0);
    assertEquals(d.maxNewTokens, s.maxNewTokens);
    GenerationSettings greedy = GenerationSettings.parse("0", "1", "1", "32");
    assertEquals(0f, greedy.temperature, 0);
    assertEquals(32, greedy.maxNewTokens);
  }

  @Test
  public void badValuesSayWhatIsValid() {
    assertTrue(assertThrows(IllegalArgumentException.class, () -> GenerationSettings.parse("-1", "", "", ""))
        .getMessage().contains("temperature must be between 0"));
    assertTrue(assertThrows(IllegalArgumentException.class, () -> GenerationSettings.parse("", "", "1.5", ""))
        .getMessage().contains("top-p must be in (0, 1]"));
    assertTrue(assertThrows(IllegalArgumentException.class, () -> GenerationSettings.parse("", "", "", "0"))
        .getMessage().contains("max tokens must be at least 1"));
    assertTrue(assertThrows(IllegalArgumentException.class, () -> GenerationSettings.parse("hot", "", "", ""))
        .getMessage().startsWith("settings must be numbers"));
    assertThrows(IllegalArgumentException.class, () -> GenerationSettings.parse("NaN", "", "", ""));
  }

  @Test
  public void theBudgetStopsAtTheCachesEnd() {
    GenerationSettings s = new GenerationSettings(0, 0, 1, 256);
    assertEquals(256, s.budget(100, 1024));
    assertEquals(24, s.budget(1000, 1024));
    assertEquals(0, s.budget(1024, 1024));
    assertEquals(0, s.budget(2000, 1024));
  }
}
