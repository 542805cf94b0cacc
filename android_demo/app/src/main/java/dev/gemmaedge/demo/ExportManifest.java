package dev.gemmaedge.demo;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import org.json.JSONArray;
import org.json.JSONException;
import org.json.JSONObject;

/** An export folder's gemma_edge.json, as gemma_edge/exporters/manifest.py writes it: what the app
 * needs to pick a backend, size the context and stop at the right tokens. */
public final class ExportManifest {
  public static final String FILE = "gemma_edge.json";
  static final int VERSION = 1;

  public final File folder;
  public final String format;  // "pte" or "onnx"
  public final String quant;  // "fp32", "int8", "int4"
  public final String modelType;  // "gemma", "gemma2", "gemma3_text"
  public final int maxSeqLen;  // positions the static KV cache holds: prompt + reply
  public final int vocabSize;
  public final int bosTokenId;
  public final List<Integer> stopTokenIds;  // <eos> and <end_of_turn>
  public final String program;  // model.pte or model.onnx, relative to the folder
  public final String data;  // the program's weights file (model.ptd, model.onnx.data), or null: in the program
  public final String tokenizer;  // tokenizer.json, relative to the folder
  public final String template;  // the prompt format given at export (a fine-tune's: "instruction"), or null

  private ExportManifest(File folder, JSONObject json) throws JSONException {
    this.folder = folder;
    int version = json.getInt("gemma_edge_manifest");
    if (version != VERSION) {
      throw new IllegalArgumentException(folder + ": manifest version " + version + ", this app reads " + VERSION
          + ": export again with the gemma-edge that matches this app");
    }
    format = json.getString("format");
    if (!format.equals("pte") && !format.equals("onnx")) {
      throw new IllegalArgumentException(folder + ": unknown export format " + format + "; valid: pte, onnx");
    }
    JSONObject export = json.getJSONObject("export");
    quant = export.getString("quant");
    template = export.isNull("template") ? null : export.getString("template");  // absent before adapters: null
    JSONObject config = json.getJSONObject("config");
    modelType = config.getString("model_type");
    vocabSize = config.getInt("vocab_size");
    maxSeqLen = json.getInt("max_seq_len");
    JSONObject special = json.getJSONObject("special_tokens");
    bosTokenId = special.getInt("bos_token_id");
    JSONArray stops = special.getJSONArray("stop_token_ids");
    List<Integer> ids = new ArrayList<>();
    for (int i = 0; i < stops.length(); i++) {
      ids.add(stops.getInt(i));
    }
    stopTokenIds = Collections.unmodifiableList(ids);
    JSONObject io = json.getJSONObject("io");
    program = plainName(folder, io.getString("program"));
    String weights = null;
    JSONArray programFiles = io.optJSONArray("files");  // the program and its weights file
    for (int i = 0; programFiles != null && i < programFiles.length(); i++) {
      String name = plainName(folder, programFiles.getString(i));
      if (!name.equals(program)) {
        weights = name;
      }
    }
    data = weights;
    tokenizer = "tokenizer.json";
    JSONObject files = json.optJSONObject("files");
    if (files != null) {
      for (java.util.Iterator<String> names = files.keys(); names.hasNext(); ) {
        plainName(folder, names.next());
      }
    }
  }

  /** A file the manifest names must be a plain name inside the export folder (gemma_edge/manifest.py
   * keeps the same rule): no path, no "..", so a manifest from a stranger cannot point the app at
   * another file on the phone. */
  static String plainName(File folder, String name) {
    if (name.isEmpty() || name.equals(".") || name.equals("..") || name.indexOf('/') >= 0 || name.indexOf('\\') >= 0
        || name.indexOf('\0') >= 0) {
      throw new IllegalArgumentException(folder + "/" + FILE + " names the file \"" + name
          + "\", which is not a plain file name in the export folder; refusing to load it. Export again");
    }
    return name;
  }

  /** The file, if it stays inside the folder once symlinks are resolved. */
  static File inside(File folder, String name) throws IOException {
    File file = new File(folder, name);
    File real = file.getCanonicalFile();
    if (!folder.getCanonicalFile().equals(real.getParentFile())) {
      throw new IOException(file + " leads to " + real + ", outside the export folder; refusing to load it."
          + " Push the real files (adb push copies them) or export again");
    }
    return file;
  }

  public static ExportManifest parse(File folder, String text) {
    try {
      return new ExportManifest(folder, new JSONObject(text));
    } catch (JSONException e) {
      throw new IllegalArgumentException(folder + "/" + FILE + " is not a gemma-edge manifest (" + e.getMessage()
          + "): pick the folder `gemma-edge export` wrote", e);
    }
  }

  public static ExportManifest read(File folder) throws IOException {
    File file = new File(folder, FILE);
    if (!file.isFile()) {
      throw new IOException(folder + " has no " + FILE + ": pick the folder `gemma-edge export` wrote (adb push it whole)");
    }
    ExportManifest manifest = parse(folder, readText(file));
    for (String name : new String[] {manifest.program, manifest.data, manifest.tokenizer}) {
      if (name != null && !inside(folder, name).isFile()) {
        throw new IOException(folder + " lacks " + name + ": push the whole export folder again");
      }
    }
    return manifest;
  }

  // java.nio.file is API 26: the app's code stays within API 23, the android.jar it is checked against.
  private static String readText(File file) throws IOException {
    ByteArrayOutputStream bytes = new ByteArrayOutputStream();
    try (InputStream in = new FileInputStream(file)) {
      byte[] buffer = new byte[8192];
      for (int n; (n = in.read(buffer)) > 0; ) {
        bytes.write(buffer, 0, n);
      }
    }
    return new String(bytes.toByteArray(), StandardCharsets.UTF_8);
  }

  /** The prompt format a chat with this model uses: the one given at export (gemma-edge export
   * --template, as generate and chat take it), else Gemma's turns (every Gemma family). */
  public PromptFormat defaultFormat() {
    return template == null ? new GemmaFormat() : PromptFormat.forName(template);
  }

  public String summary() {
    return modelType + " " + quant + " " + format + ", context " + maxSeqLen;
  }
}
