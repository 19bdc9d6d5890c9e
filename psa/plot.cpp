#include "psa/plot.h"

#include <stb/stb_easy_font.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "nn/json.h"
#include "psa/image.h"
#include "tensor/error.h"

namespace psa {
namespace {

struct Canvas {
  int w, h;
  std::vector<uint8_t> px;
  void set(int x, int y, const uint8_t* c) {
    if (x < 0 || y < 0 || x >= w || y >= h) return;
    std::copy(c, c + 3, px.begin() + 3 * (y * w + x));
  }
  void rect(int x0, int y0, int x1, int y1, const uint8_t* c) {
    for (int y = y0; y < y1; ++y)
      for (int x = x0; x < x1; ++x) set(x, y, c);
  }
  void line(double x0, double y0, double x1, double y1, const uint8_t* c) {  // 2 px wide, DDA
    int n = (int)std::max(std::fabs(x1 - x0), std::fabs(y1 - y0)) + 1;
    for (int i = 0; i <= n; ++i) {
      double t = (double)i / n;
      int x = (int)std::lround(x0 + t * (x1 - x0)), y = (int)std::lround(y0 + t * (y1 - y0));
      set(x, y, c);
      set(x + 1, y, c);
      set(x, y + 1, c);
    }
  }
  // stb_easy_font emits quads (4 vertices of 16 bytes); they are axis-aligned, so fill their bounding boxes.
  void text(int x, int y, const std::string& s, const uint8_t* c, int scale = 1) {
    static char buf[200000];
    int quads = stb_easy_font_print(0, 0, const_cast<char*>(s.c_str()), nullptr, buf, sizeof buf);
    for (int q = 0; q < quads; ++q) {
      float* v = reinterpret_cast<float*>(buf + q * 64);
      int qx0 = (int)v[0], qy0 = (int)v[1], qx1 = (int)v[8], qy1 = (int)v[9];
      rect(x + qx0 * scale, y + qy0 * scale, x + qx1 * scale, y + qy1 * scale, c);
    }
  }
  int text_width(const std::string& s) { return stb_easy_font_width(const_cast<char*>(s.c_str())); }
};

const uint8_t kColors[][3] = {{31, 119, 180}, {214, 39, 40}, {44, 160, 44}, {255, 127, 14}, {148, 103, 189}, {140, 86, 75}, {227, 119, 194}, {23, 190, 207}, {127, 127, 127}};
constexpr size_t kNumColors = sizeof(kColors) / sizeof(kColors[0]);
const uint8_t kBlack[3] = {0, 0, 0}, kGrey[3] = {220, 220, 220};

std::vector<double> smoothed(const std::vector<double>& y, int window) {
  if (window <= 1) return y;
  std::vector<double> out(y.size());
  double acc = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    acc += y[i];
    if (i >= (size_t)window) acc -= y[i - window];
    out[i] = acc / std::min<size_t>(i + 1, window);
  }
  return out;
}

std::string fmt(double v) {
  char b[32];
  snprintf(b, sizeof b, std::fabs(v) >= 1000 || (std::fabs(v) < 0.01 && v != 0) ? "%.1e" : "%.3g", v);
  return b;
}

}  // namespace

void plot_lines(const std::string& path, const std::vector<Series>& series, const PlotOptions& o) {
  Canvas c{o.width, o.height, std::vector<uint8_t>(3 * o.width * o.height, 255)};
  const int left = 70, right = 20, top = 40, bottom = 50;
  int pw = o.width - left - right, ph = o.height - top - bottom;
  double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
  std::vector<std::vector<double>> ys;
  for (const Series& s : series) {
    ys.push_back(smoothed(s.y, o.smooth));
    for (size_t i = 0; i < s.y.size(); ++i) {
      double x = s.x.empty() ? i + 1 : s.x[i], y = ys.back()[i];
      if (o.log_y && y <= 0) continue;
      xmin = std::min(xmin, x), xmax = std::max(xmax, x);
      double ty = o.log_y ? std::log10(y) : y;
      ymin = std::min(ymin, ty), ymax = std::max(ymax, ty);
    }
  }
  PSA_CHECK(std::isfinite(xmin), "plot ", path, ": no data");
  if (xmax == xmin) xmax = xmin + 1;
  if (ymax == ymin) ymax = ymin + 1;
  auto X = [&](double x) { return left + (x - xmin) / (xmax - xmin) * pw; };
  auto Y = [&](double y) { return top + ph - ((o.log_y ? std::log10(y) : y) - ymin) / (ymax - ymin) * ph; };
  for (int i = 0; i <= 5; ++i) {  // grid and tick labels
    double fy = ymin + (ymax - ymin) * i / 5, yv = o.log_y ? std::pow(10, fy) : fy;
    int py = (int)(top + ph - (double)i / 5 * ph);
    c.rect(left, py, left + pw, py + 1, kGrey);
    c.text(left - 8 - c.text_width(fmt(yv)), py - 4, fmt(yv), kBlack);
    double xv = xmin + (xmax - xmin) * i / 5;
    int px = (int)(left + (double)i / 5 * pw);
    c.rect(px, top, px + 1, top + ph, kGrey);
    c.text(px - c.text_width(fmt(xv)) / 2, top + ph + 8, fmt(xv), kBlack);
  }
  c.rect(left, top + ph, left + pw, top + ph + 2, kBlack);
  c.rect(left - 2, top, left, top + ph, kBlack);
  for (size_t k = 0; k < series.size(); ++k) {
    const uint8_t* col = kColors[k % kNumColors];
    const Series& s = series[k];
    for (size_t i = 1; i < s.y.size(); ++i) {
      double x0 = s.x.empty() ? i : s.x[i - 1], x1 = s.x.empty() ? i + 1 : s.x[i];
      if (o.log_y && (ys[k][i - 1] <= 0 || ys[k][i] <= 0)) continue;
      c.line(X(x0), Y(ys[k][i - 1]), X(x1), Y(ys[k][i]), col);
    }
    int ly = top + 10 + 16 * (int)k;
    c.rect(left + pw - 150, ly + 2, left + pw - 135, ly + 6, col);
    c.text(left + pw - 130, ly, s.name, kBlack);
  }
  c.text(left, 12, o.title, kBlack, 2);
  c.text(left + pw / 2 - c.text_width(o.x_label) / 2, o.height - 18, o.x_label, kBlack);
  c.text(8, top - 14, o.y_label, kBlack);
  Image img(o.width, o.height);
  img.rgb = std::move(c.px);
  json::write_file(path, encode_png(img, kPlotSoftware));  // atomic: a chart rewritten during training is never half a file
}

}  // namespace psa
