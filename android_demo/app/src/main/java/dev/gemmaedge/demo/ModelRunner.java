package dev.gemmaedge.demo;

import android.os.Handler;
import android.os.HandlerThread;
import android.os.Looper;
import java.io.File;
import java.util.ArrayList;
import java.util.List;

/**
 * Owns the model and the one worker thread every model call runs on; the UI thread only posts
 * requests and receives ModelCallback calls. Keeps the conversation and formats it with the
 * model's prompt format for each reply.
 */
public final class ModelRunner {
  private final ModelCallback callback;
  private final HandlerThread thread = new HandlerThread("gemma-edge-model");
  private final Handler worker;
  private final Handler main = new Handler(Looper.getMainLooper());
  private final List<Message> conversation = new ArrayList<>();  // worker thread only
  private volatile LlmBackend backend;
  private ExportManifest manifest;  // worker thread only

  public ModelRunner(ModelCallback callback) {
    this.callback = callback;
    thread.start();
    worker = new Handler(thread.getLooper());
  }

  public void load(final File folder) {
    worker.post(() -> {
      try {
        long start = System.currentTimeMillis();
        closeBackend();
        ExportManifest m = ExportManifest.read(folder);
        LlmBackend b = LlmBackend.forManifest(m);
        b.load();
        manifest = m;
        backend = b;
        conversation.clear();
        long ms = System.currentTimeMillis() - start;
        main.post(() -> callback.onModelLoaded(m, ms, b.supportsTopKTopP()));
      } catch (Exception | UnsatisfiedLinkError e) {
        fail("could not load " + folder + ": " + e.getMessage());
      }
      main.post(callback::onDone);
    });
  }

  public void send(final String text, final GenerationSettings settings) {
    worker.post(() -> {
      LlmBackend b = backend;
      if (b == null) {
        fail("load a model folder first");
      } else {
        reply(b, text, settings);
      }
      main.post(callback::onDone);
    });
  }

  /** Ends the reply being generated after its current token (any thread). */
  public void stop() {
    LlmBackend b = backend;
    if (b != null) {
      b.stop();
    }
  }

  /** Forgets the conversation (the model stays loaded). */
  public void newChat() {
    worker.post(conversation::clear);
  }

  public void close() {
    worker.post(() -> {
      closeBackend();
      thread.quitSafely();
    });
  }

  private void reply(LlmBackend b, String text, GenerationSettings settings) {
    conversation.add(Message.user(text));
    final StringBuilder reply = new StringBuilder();
    final StopFilter filter = new StopFilter(StopFilter.GEMMA_STOPS);
    try {
      GenerationStats stats = b.generate(manifest.defaultFormat().prompt(conversation), settings, piece -> {
        String shown = filter.push(piece);
        if (filter.stopped()) {
          b.stop();
        }
        emit(reply, shown);
      });
      emit(reply, filter.finish());
      conversation.add(Message.assistant(reply.toString()));
      if (stats != null) {
        main.post(() -> callback.onStats(stats));
      }
    } catch (Exception e) {
      conversation.remove(conversation.size() - 1);
      fail(e.getMessage());
    }
  }

  private void emit(StringBuilder reply, String piece) {
    if (!piece.isEmpty()) {
      reply.append(piece);
      main.post(() -> callback.onToken(piece));
    }
  }

  private void fail(String message) {
    main.post(() -> callback.onError(message));
  }

  private void closeBackend() {
    LlmBackend b = backend;
    backend = null;
    if (b != null) {
      try {
        b.close();
      } catch (Exception e) {
        fail("closing the model: " + e.getMessage());
      }
    }
  }
}
