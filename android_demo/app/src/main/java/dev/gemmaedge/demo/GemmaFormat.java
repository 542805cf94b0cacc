package dev.gemmaedge.demo;

import java.util.ArrayList;
import java.util.List;

/** Gemma's instruction-tuned turns. Gemma has no system role: a system message is prepended to the
 * first user turn, as its Hugging Face chat template does. */
public final class GemmaFormat implements PromptFormat {
  @Override
  public String name() {
    return "gemma";
  }

  @Override
  public List<String> segments(List<Message> messages) {
    List<String> segments = new ArrayList<>();
    String system = null;
    for (Message m : PromptFormat.checked(messages)) {
      String content = m.content;
      if (m.role.equals("system")) {
        system = content;
        continue;
      }
      boolean user = m.role.equals("user");
      if (user && system != null) {
        content = system + "\n\n" + content;
        system = null;
      }
      segments.add("<start_of_turn>" + (user ? "user" : "model") + "\n" + content + "<end_of_turn>\n");
    }
    segments.add("<start_of_turn>model\n");
    return segments;
  }
}
