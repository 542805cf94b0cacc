package dev.gemmaedge.demo;

/** What ModelRunner reports, always on the main (UI) thread. */
public interface ModelCallback {
  /** topKTopP: whether the backend applies top-k and top-p (else temperature only). */
  void onModelLoaded(ExportManifest manifest, long loadMs, boolean topKTopP);

  /** A piece of the reply's text (stop strings and special tokens already removed). */
  void onToken(String piece);

  void onStats(GenerationStats stats);

  /** A message that says what went wrong and what to do. */
  void onError(String message);

  /** The reply (or the load) ended; the runner takes the next request. */
  void onDone();
}
