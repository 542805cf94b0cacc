package dev.gemmaedge.demo;

import java.util.ArrayList;
import java.util.List;

/** The Instruction / Context / Response format of models fine-tuned on databricks-dolly-style data. */
public final class InstructionFormat implements PromptFormat {
  @Override
  public String name() {
    return "instruction";
  }

  @Override
  public List<String> segments(List<Message> messages) {
    List<String> segments = new ArrayList<>();
    for (Message m : PromptFormat.checked(messages)) {
      if (m.role.equals("system")) {
        throw new IllegalArgumentException("the instruction format has no system role; put it in the instruction");
      }
      if (m.role.equals("user")) {
        boolean context = m.context != null && !m.context.isEmpty();
        segments.add("Instruction:\n" + m.content + "\n\n" + (context ? "Context:\n" + m.context + "\n\n" : "") + "Response:\n");
      } else {
        segments.add(m.content + "\n\n");
      }
    }
    if (!messages.get(messages.size() - 1).role.equals("user")) {
      throw new IllegalArgumentException("the instruction format continues a user message: end the conversation with one");
    }
    return segments;
  }
}
