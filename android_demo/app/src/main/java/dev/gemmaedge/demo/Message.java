package dev.gemmaedge.demo;

/** One turn of a conversation: role "system", "user" or "assistant" (or "model"), its text, and an
 * optional context block (the instruction format's "Context:"). */
public final class Message {
  public final String role;
  public final String content;
  public final String context;  // may be null

  public Message(String role, String content, String context) {
    if (!"system".equals(role) && !"user".equals(role) && !"assistant".equals(role) && !"model".equals(role)) {
      throw new IllegalArgumentException("a message's role is system, user or assistant, got " + role);
    }
    if (content == null) {
      throw new IllegalArgumentException("a message needs content");
    }
    this.role = role;
    this.content = content;
    this.context = context;
  }

  public static Message user(String content) {
    return new Message("user", content, null);
  }

  public static Message assistant(String content) {
    return new Message("assistant", content, null);
  }
}
