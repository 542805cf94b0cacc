package dev.gemmaedge.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertThrows;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Arrays;
import org.json.JSONObject;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** The manifests of real exports (tests/data/manifests: the real Gemma 3 270M, int4, both formats;
 * tests/test_android_contract.py checks a fresh export still has every field the app reads). */
public class ExportManifestTest {
  @Rule public TemporaryFolder tmp = new TemporaryFolder();

  static String fixture(String format) throws IOException {
    String dir = System.getProperty("gemmaEdge.manifests");
    assertTrue("run with -DgemmaEdge.manifests=<repo>/tests/data/manifests", dir != null);
    return new String(Files.readAllBytes(new File(dir, "gemma-3-270m-int4-" + format + ".json").toPath()), StandardCharsets.UTF_8);
  }

  @Test
  public void readsWhatTheAppNeedsFromBothFormats() throws Exception {
    for (String format : new String[] {"pte", "onnx"}) {
      ExportManifest m = ExportManifest.parse(new File("/sdcard/model"), fixture(format));
      assertEquals(format, m.format);
      assertEquals("int4", m.quant);
      assertEquals("gemma3_text", m.modelType);
      assertEquals(1024, m.maxSeqLen);
      assertEquals(262144, m.vocabSize);
      assertEquals(2, m.bosTokenId);
      assertEquals(Arrays.asList(1, 106), m.stopTokenIds);  // <eos>, <end_of_turn>
      assertEquals(format.equals("pte") ? "model.pte" : "model.onnx", m.program);
      assertEquals(format.equals("pte") ? "model.ptd" : null, m.data);  // a .pte's weights, the tied table once
      assertEquals("gemma", m.defaultFormat().name());
      assertEquals("gemma3_text int4 " + format + ", context 1024", m.summary());
    }
  }

  @Test
  public void aFineTunesPromptFormatIsTheDefault() throws Exception {
    JSONObject json = new JSONObject(fixture("pte"));
    json.getJSONObject("export").put("template", "instruction");  // gemma-edge export --adapter ... --template instruction
    assertEquals("instruction", ExportManifest.parse(new File("/sdcard/model"), json.toString()).defaultFormat().name());
    json.getJSONObject("export").put("template", JSONObject.NULL);  // exported without --template
    assertEquals("gemma", ExportManifest.parse(new File("/sdcard/model"), json.toString()).defaultFormat().name());
  }

  @Test
  public void readChecksTheFolderHoldsTheFilesItNames() throws Exception {
    File folder = tmp.newFolder("export");
    IOException none = assertThrows(IOException.class, () -> ExportManifest.read(folder));
    assertTrue(none.getMessage(), none.getMessage().contains("has no gemma_edge.json"));
    Files.write(new File(folder, ExportManifest.FILE).toPath(), fixture("pte").getBytes(StandardCharsets.UTF_8));
    IOException missing = assertThrows(IOException.class, () -> ExportManifest.read(folder));
    assertTrue(missing.getMessage(), missing.getMessage().contains("lacks model.pte"));
    Files.write(new File(folder, "model.pte").toPath(), new byte[] {0});
    IOException noData = assertThrows(IOException.class, () -> ExportManifest.read(folder));
    assertTrue(noData.getMessage(), noData.getMessage().contains("lacks model.ptd"));
    Files.write(new File(folder, "model.ptd").toPath(), new byte[] {0});
    Files.write(new File(folder, "tokenizer.json").toPath(), new byte[] {0});
    assertEquals("pte", ExportManifest.read(folder).format);
    // The picker finds it as a root itself and as a child of a root; a missing root is skipped.
    assertEquals(Arrays.asList(folder, folder), ModelFolders.find(Arrays.asList(folder, tmp.getRoot(), new File("/nonexistent"))));
  }

  @Test
  public void filesOutsideTheFolderAreRefused() throws Exception {
    File folder = new File("/sdcard/model");
    for (String name : new String[] {"../outside/model.pte", "/data/local/tmp/model.pte", "..", "a\\b.pte"}) {
      JSONObject bad = new JSONObject(fixture("pte"));
      bad.getJSONObject("io").put("program", name);
      assertTrue(name, assertThrows(IllegalArgumentException.class, () -> ExportManifest.parse(folder, bad.toString()))
          .getMessage().contains("not a plain file name"));
    }
    JSONObject listed = new JSONObject(fixture("pte"));
    listed.getJSONObject("files").put("../../secret", new JSONObject());
    assertThrows(IllegalArgumentException.class, () -> ExportManifest.parse(folder, listed.toString()));
    // A symlink that leaves the folder is refused when the folder is read.
    File export = tmp.newFolder("linked");
    File outside = tmp.newFile("elsewhere.pte");
    Files.write(new File(export, ExportManifest.FILE).toPath(), fixture("pte").getBytes(StandardCharsets.UTF_8));
    Files.createSymbolicLink(new File(export, "model.pte").toPath(), outside.toPath());
    Files.write(new File(export, "tokenizer.json").toPath(), new byte[] {0});
    IOException leaves = assertThrows(IOException.class, () -> ExportManifest.read(export));
    assertTrue(leaves.getMessage(), leaves.getMessage().contains("outside the export folder"));
  }

  @Test
  public void otherFilesAreRefusedWithWhatToDo() throws Exception {
    File folder = new File("/sdcard/model");
    String good = fixture("pte");
    assertTrue(assertThrows(IllegalArgumentException.class, () -> ExportManifest.parse(folder, "[1, 2]"))
        .getMessage().contains("is not a gemma-edge manifest"));
    JSONObject newer = new JSONObject(good).put("gemma_edge_manifest", 2);
    assertTrue(assertThrows(IllegalArgumentException.class, () -> ExportManifest.parse(folder, newer.toString()))
        .getMessage().contains("export again"));
    JSONObject gguf = new JSONObject(good).put("format", "gguf");
    assertTrue(assertThrows(IllegalArgumentException.class, () -> ExportManifest.parse(folder, gguf.toString()))
        .getMessage().contains("unknown export format gguf; valid: pte, onnx"));
  }
}
