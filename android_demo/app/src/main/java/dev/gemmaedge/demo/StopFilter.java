package dev.gemmaedge.demo;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;

/**
 * Streams a reply's text while watching for stop strings, like the Python runtime's generator:
 * the reply is cut at the first stop string, which is never shown, and text that may be the start
 * of one is held back until it is known not to be. Never splits a UTF-16 surrogate pair (an emoji
 * arrives whole or not at all). Not thread-safe: one per reply, on the worker thread.
 */
public final class StopFilter {
  /** Gemma's stop tokens as text: ExecuTorch's stock runner hands a stop token's text over before it stops. */
  public static final List<String> GEMMA_STOPS = Collections.unmodifiableList(Arrays.asList("<end_of_turn>", "<eos>"));

  private final List<String> stops = new ArrayList<>();
  private final StringBuilder text = new StringBuilder();  // everything received
  private int released = 0;  // chars of text handed out
  private boolean stopped = false;

  public StopFilter(List<String> stops) {
    for (String s : stops) {
      if (s != null && !s.isEmpty()) {
        this.stops.add(s);
      }
    }
  }

  /** Takes the next piece of decoded text; returns what may be shown now ("" if nothing). */
  public String push(String piece) {
    if (stopped) {
      return "";
    }
    text.append(piece);
    int cut = firstStop();
    if (cut >= 0) {
      stopped = true;
      return release(cut, false);
    }
    return release(text.length() - partialStop(), false);
  }

  /** At the end of the reply: what was held back (a stop string's start that never completed). */
  public String finish() {
    return stopped ? "" : release(text.length(), true);
  }

  /** Whether a stop string ended the reply: the caller stops generating. */
  public boolean stopped() {
    return stopped;
  }

  private int firstStop() {
    int first = -1;
    for (String s : stops) {
      int at = text.indexOf(s, Math.max(0, released - s.length()));
      if (at >= 0 && (first < 0 || at < first)) {
        first = at;
      }
    }
    return first;
  }

  // Length of the longest end of the text that begins some stop string.
  private int partialStop() {
    int longest = 0;
    for (String s : stops) {
      for (int k = Math.min(s.length() - 1, text.length()); k > longest; k--) {
        if (text.substring(text.length() - k).equals(s.substring(0, k))) {
          longest = k;
          break;
        }
      }
    }
    return longest;
  }

  // Hands out text up to end; a pair's first half waits for its second unless the reply is over.
  private String release(int end, boolean last) {
    if (!last && end > released && Character.isHighSurrogate(text.charAt(end - 1))) {
      end--;
    }
    if (end <= released) {
      return "";
    }
    String out = text.substring(released, end);
    released = end;
    return out;
  }
}
