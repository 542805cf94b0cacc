package dev.gemmaedge.demo;

import android.app.Activity;
import android.app.AlertDialog;
import android.os.Bundle;
import android.view.View;
import android.widget.Button;
import android.widget.EditText;
import android.widget.ScrollView;
import android.widget.TextView;
import java.io.File;
import java.util.Arrays;
import java.util.List;

/** The thin UI: pick a folder, chat, stop, settings. Every model call goes through ModelRunner. */
public final class MainActivity extends Activity implements ModelCallback {
  private ModelRunner runner;
  private EditText folder, input, temperature, topK, topP, maxTokens;
  private TextView chat, status, stats;
  private ScrollView scroll;
  private Button load, send, stop;
  private boolean busy;

  @Override
  protected void onCreate(Bundle state) {
    super.onCreate(state);
    setContentView(R.layout.activity_main);
    folder = (EditText) findViewById(R.id.folder);
    input = (EditText) findViewById(R.id.input);
    temperature = (EditText) findViewById(R.id.temperature);
    topK = (EditText) findViewById(R.id.top_k);
    topP = (EditText) findViewById(R.id.top_p);
    maxTokens = (EditText) findViewById(R.id.max_tokens);
    chat = (TextView) findViewById(R.id.chat);
    status = (TextView) findViewById(R.id.status);
    stats = (TextView) findViewById(R.id.stats);
    scroll = (ScrollView) findViewById(R.id.scroll);
    load = (Button) findViewById(R.id.load);
    send = (Button) findViewById(R.id.send);
    stop = (Button) findViewById(R.id.stop);
    runner = new ModelRunner(this);
    folder.setText(new File(pushRoots().get(0), "gemma3-int4-pte").getPath());
    load.setOnClickListener(v -> loadModel(new File(folder.getText().toString().trim())));
    findViewById(R.id.pick).setOnClickListener(v -> pickFolder());
    findViewById(R.id.new_chat).setOnClickListener(v -> {
      runner.newChat();
      chat.setText("");
    });
    send.setOnClickListener(v -> sendPrompt());
    stop.setOnClickListener(v -> runner.stop());
    setBusy(false);
  }

  // Where `adb push` can put an export without root: this app's external files folder, and the
  // shell's /data/local/tmp (as ExecuTorch's own demo uses).
  private List<File> pushRoots() {
    return Arrays.asList(getExternalFilesDir(null), new File("/data/local/tmp/gemma_edge"));
  }

  private void pickFolder() {
    final List<File> found = ModelFolders.find(pushRoots());
    if (found.isEmpty()) {
      status.setText(getString(R.string.no_models, pushRoots().get(0).getPath()));
      return;
    }
    String[] names = new String[found.size()];
    for (int i = 0; i < names.length; i++) {
      names[i] = found.get(i).getPath();
    }
    new AlertDialog.Builder(this).setTitle(R.string.pick).setItems(names, (d, which) -> {
      folder.setText(names[which]);
      loadModel(found.get(which));
    }).show();
  }

  private void loadModel(File dir) {
    status.setText(getString(R.string.loading, dir.getPath()));
    setBusy(true);
    runner.load(dir);
  }

  private void sendPrompt() {
    String text = input.getText().toString().trim();
    if (text.isEmpty()) {
      return;
    }
    GenerationSettings settings;
    try {
      settings = GenerationSettings.parse(temperature.getText().toString(), topK.getText().toString(),
          topP.getText().toString(), maxTokens.getText().toString());
    } catch (IllegalArgumentException e) {
      status.setText(e.getMessage());
      return;
    }
    input.setText("");
    chat.append((chat.length() == 0 ? "" : "\n\n") + "You: " + text + "\n\nGemma: ");
    setBusy(true);
    runner.send(text, settings);
  }

  private void setBusy(boolean value) {
    busy = value;
    load.setEnabled(!busy);
    send.setEnabled(!busy);
    stop.setEnabled(busy);
  }

  @Override
  public void onModelLoaded(ExportManifest manifest, long loadMs, boolean topKTopP) {
    status.setText(getString(R.string.loaded, manifest.summary(), loadMs));
    topK.setEnabled(topKTopP);
    topP.setEnabled(topKTopP);
  }

  @Override
  public void onToken(String piece) {
    chat.append(piece);
    scroll.post(() -> scroll.fullScroll(View.FOCUS_DOWN));
  }

  @Override
  public void onStats(GenerationStats s) {
    stats.setText(s.summary());
  }

  @Override
  public void onError(String message) {
    status.setText(message);
  }

  @Override
  public void onDone() {
    setBusy(false);
  }

  @Override
  protected void onDestroy() {
    runner.close();
    super.onDestroy();
  }
}
