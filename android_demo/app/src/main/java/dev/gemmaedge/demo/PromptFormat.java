package dev.gemmaedge.demo;

import java.util.Arrays;
import java.util.List;

/**
 * A conversation -> the text segments a model was trained to continue, ending where its reply
 * starts. One class per format, each the same as gemma_edge/runtime/templates.py: the JVM tests
 * read the Python runtime's cases (tests/data/prompt_formats.json), so the two cannot drift apart.
 */
public interface PromptFormat {
  String name();

  List<String> segments(List<Message> messages);

  /** The whole prompt: the segments one after the other. */
  default String prompt(List<Message> messages) {
    StringBuilder text = new StringBuilder();
    for (String segment : segments(messages)) {
      text.append(segment);
    }
    return text.toString();
  }

  List<PromptFormat> ALL = Arrays.asList(new GemmaFormat(), new InstructionFormat(), new PlainFormat());

  static PromptFormat forName(String name) {
    StringBuilder valid = new StringBuilder();
    for (PromptFormat format : ALL) {
      if (format.name().equals(name)) {
        return format;
      }
      valid.append(valid.length() == 0 ? "" : ", ").append(format.name());
    }
    throw new IllegalArgumentException("unknown prompt format " + name + "; valid: " + valid);
  }

  static List<Message> checked(List<Message> messages) {
    if (messages == null || messages.isEmpty()) {
      throw new IllegalArgumentException("the conversation is empty: give at least one user message");
    }
    return messages;
  }
}
