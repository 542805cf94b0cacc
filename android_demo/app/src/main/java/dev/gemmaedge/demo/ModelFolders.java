package dev.gemmaedge.demo;

import java.io.File;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/** Export folders (with a gemma_edge.json) in the places `adb push` can reach, for the picker. */
public final class ModelFolders {
  private ModelFolders() {}

  public static List<File> find(List<File> roots) {
    List<File> found = new ArrayList<>();
    for (File root : roots) {
      if (root == null) {
        continue;
      }
      if (new File(root, ExportManifest.FILE).isFile()) {
        found.add(root);
      }
      File[] children = root.listFiles();
      if (children == null) {
        continue;
      }
      List<File> sorted = new ArrayList<>();
      Collections.addAll(sorted, children);
      Collections.sort(sorted);
      for (File child : sorted) {
        if (new File(child, ExportManifest.FILE).isFile()) {
          found.add(child);
        }
      }
    }
    return found;
  }
}
