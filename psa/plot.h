// A small line chart rendered to PNG (loss curves, scaling plots): axes with tick labels, one colour per
// series, a legend, optional log-scale y. Text is drawn with stb_easy_font's bitmap glyphs.
#pragma once
#include <string>
#include <vector>

namespace psa {

struct Series {
  std::string name;
  std::vector<double> x, y;  // x empty = 1, 2, 3, ...
};

// What every chart's PNG says in its Software chunk (image.h encode_png): how a command tells an earlier chart
// of its own, which it may replace, from anyone's picture.
constexpr const char* kPlotSoftware = "psa plot";

struct PlotOptions {
  std::string title, x_label, y_label;
  bool log_y = false;
  int width = 900, height = 500;
  int smooth = 1;  // moving-average window over y (noisy per-step losses)
};

// Written atomically (temp file, fsync, rename), like every report.
void plot_lines(const std::string& path, const std::vector<Series>& series, const PlotOptions& o);

}  // namespace psa
