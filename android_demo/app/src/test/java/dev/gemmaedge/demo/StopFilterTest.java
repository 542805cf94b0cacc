package dev.gemmaedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import java.util.Arrays;
import java.util.Collections;
import org.junit.Test;

public class StopFilterTest {
  private static String run(StopFilter filter, String... pieces) {
    StringBuilder out = new StringBuilder();
    for (String piece : pieces) {
      out.append(filter.push(piece));
    }
    return out.append(filter.finish()).toString();
  }

  @Test
  public void withoutStopsEverythingPassesAtOnce() {
    StopFilter filter = new StopFilter(Collections.<String>emptyList());
    assertEquals("Hello", filter.push("Hello"));
    assertEquals(" world", filter.push(" world"));
    assertEquals("", filter.finish());
  }

  @Test
  public void aStopStringSplitAcrossPiecesIsHeldBackThenCut() {
    StopFilter filter = new StopFilter(StopFilter.GEMMA_STOPS);
    assertEquals("Paris.", filter.push("Paris."));
    assertEquals("", filter.push("<end_"));  // may be the start of <end_of_turn>: held
    assertFalse(filter.stopped());
    assertEquals("", filter.push("of_turn>"));
    assertTrue(filter.stopped());
    assertEquals("", filter.push(" more text"));  // nothing after the stop
    assertEquals("", filter.finish());
  }

  @Test
  public void textBeforeAStopInTheSamePieceIsReleased() {
    StopFilter filter = new StopFilter(StopFilter.GEMMA_STOPS);
    assertEquals("Rome.", filter.push("Rome.<end_of_turn>\n"));
    assertTrue(filter.stopped());
  }

  @Test
  public void aStartThatDoesNotCompleteIsReleased() {
    StopFilter filter = new StopFilter(StopFilter.GEMMA_STOPS);
    assertEquals("a ", filter.push("a <"));
    assertEquals("<b> c", filter.push("b> c"));
    assertEquals("x", run(new StopFilter(StopFilter.GEMMA_STOPS), "x"));
    StopFilter atEnd = new StopFilter(StopFilter.GEMMA_STOPS);
    assertEquals("1 ", atEnd.push("1 <end"));
    assertEquals("<end", atEnd.finish());  // the reply ended: what was held back is shown
  }

  @Test
  public void theEarliestOfSeveralStopsWins() {
    assertEquals("ab", run(new StopFilter(Arrays.asList("STOP", "cd")), "abcdSTOP"));
    assertEquals("a", run(new StopFilter(Arrays.asList("cd", "b")), "abcd"));
    assertEquals("a", run(new StopFilter(Arrays.asList("cd", "b")), "a", "bc", "d"));
  }

  @Test
  public void aSurrogatePairIsNeverSplit() {
    StopFilter filter = new StopFilter(Collections.singletonList("<end_of_turn>"));
    String grin = "\uD83D\uDE00";  // one emoji, two UTF-16 chars
    assertEquals("x", filter.push("x\uD83D"));  // half an emoji: held
    assertEquals(grin + "y", filter.push("\uDE00y"));
    assertEquals(grin + "!", run(new StopFilter(StopFilter.GEMMA_STOPS), grin, "!"));
  }
}
