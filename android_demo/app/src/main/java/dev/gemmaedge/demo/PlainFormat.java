package dev.gemmaedge.demo;

import java.util.ArrayList;
import java.util.List;

/** The messages' contents one after the other: for base (not instruction-tuned) models. */
public final class PlainFormat implements PromptFormat {
  @Override
  public String name() {
    return "plain";
  }

  @Override
  public List<String> segments(List<Message> messages) {
    List<String> segments = new ArrayList<>();
    for (Message m : PromptFormat.checked(messages)) {
      segments.add(m.content);
    }
    return segments;
  }
}
