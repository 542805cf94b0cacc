package dev.gemmaedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import org.json.JSONArray;
import org.json.JSONObject;
import org.junit.Test;

/** The app's prompt formats against the Python runtime's cases (tests/data/prompt_formats.json). */
public class PromptFormatTest {
  static JSONArray cases() throws Exception {
    String path = System.getProperty("gemmaEdge.promptFormats");
    assertTrue("run with -DgemmaEdge.promptFormats=<repo>/tests/data/prompt_formats.json", path != null);
    return new JSONObject(new String(Files.readAllBytes(new File(path).toPath()), StandardCharsets.UTF_8)).getJSONArray("cases");
  }

  @Test
  public void everyCaseOfThePythonRuntimeGivesTheSameSegments() throws Exception {
    JSONArray cases = cases();
    List<String> templates = new ArrayList<>();
    for (int i = 0; i < cases.length(); i++) {
      JSONObject c = cases.getJSONObject(i);
      List<Message> messages = new ArrayList<>();
      JSONArray ms = c.getJSONArray("messages");
      for (int j = 0; j < ms.length(); j++) {
        JSONObject m = ms.getJSONObject(j);
        messages.add(new Message(m.getString("role"), m.getString("content"), m.optString("context", null)));
      }
      List<String> expected = new ArrayList<>();
      JSONArray segments = c.getJSONArray("segments");
      for (int j = 0; j < segments.length(); j++) {
        expected.add(segments.getString(j));
      }
      PromptFormat format = PromptFormat.forName(c.getString("template"));
      assertEquals("case " + i, expected, format.segments(messages));
      assertEquals(String.join("", expected), format.prompt(messages));
      templates.add(format.name());
    }
    for (PromptFormat format : PromptFormat.ALL) {  // no format of the app goes untested
      assertTrue(format.name() + " has no case", templates.contains(format.name()));
    }
  }

  @Test
  public void anUnknownFormatNamesTheValidOnes() {
    IllegalArgumentException e = assertThrows(IllegalArgumentException.class, () -> PromptFormat.forName("chatml"));
    assertEquals("unknown prompt format chatml; valid: gemma, instruction, plain", e.getMessage());
  }

  @Test
  public void conversationsTheFormatsCannotTakeAreRefused() {
    assertThrows(IllegalArgumentException.class, () -> new GemmaFormat().segments(Collections.<Message>emptyList()));
    assertThrows(IllegalArgumentException.class,
        () -> new InstructionFormat().segments(Collections.singletonList(new Message("system", "Be brief.", null))));
    assertThrows(IllegalArgumentException.class,
        () -> new InstructionFormat().segments(java.util.Arrays.asList(Message.user("Hi"), Message.assistant("Hello."))));
    assertThrows(IllegalArgumentException.class, () -> new Message("tool", "x", null));
  }
}
