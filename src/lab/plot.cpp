// cairo rendering of the report's figures (see plot.hpp). Layout is computed from the text
// extents so long run names fit; the y range ignores the first warm-up steps (step 0 includes
// one-time setup and would flatten every other point), and lines are clipped to the plot area.
#include "lab/plot.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/error.hpp"

// MOELAB_PLOTS is the build's switch; cairo.h being on the include path (it is only when the
// library links PkgConfig::CAIRO) is taken as the same answer, so a build whose definition does
// not reach this library's own sources still draws.
#if !defined(MOELAB_PLOTS) && defined(__has_include)
#if __has_include(<cairo.h>)
#define MOELAB_PLOTS 1
#endif
#endif
#ifdef MOELAB_PLOTS
#include <cairo.h>
#endif

namespace moelab::lab {

std::vector<double> nice_ticks(double lo, double hi, int target) {
  std::vector<double> ticks;
  if (!std::isfinite(lo) || !std::isfinite(hi) || hi <= lo || target < 2) return ticks;
  double raw = (hi - lo) / target;
  double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9 && ticks.size() < 100; t += step)
    ticks.push_back(std::abs(t) < step * 1e-9 ? 0.0 : t);
  return ticks;
}

#ifndef MOELAB_PLOTS

bool plots_available() { return false; }
void render_line_chart(const LineChart&, const std::filesystem::path& png, int, int) {
  throw Error("cannot render " + png.string() + ": this build has no cairo (rebuild with -DMOELAB_PLOTS=ON)");
}
void render_expert_heatmap(const ExpertHeatmap&, const std::filesystem::path& png) {
  throw Error("cannot render " + png.string() + ": this build has no cairo (rebuild with -DMOELAB_PLOTS=ON)");
}

#else

bool plots_available() { return true; }

namespace {

struct Rgb {
  double r, g, b;
};

// Tableau 10: distinct at a glance and still told apart by most colour-blind readers.
const Rgb kPalette[] = {{0.122, 0.467, 0.706}, {1.000, 0.498, 0.055}, {0.173, 0.627, 0.173}, {0.839, 0.153, 0.157},
                        {0.580, 0.404, 0.741}, {0.549, 0.337, 0.294}, {0.890, 0.467, 0.761}, {0.498, 0.498, 0.498},
                        {0.737, 0.741, 0.133}, {0.090, 0.745, 0.812}};

// Owns a cairo surface and context; writes the PNG on save().
class Canvas {
 public:
  Canvas(int w, int h) : surface_(cairo_image_surface_create(CAIRO_FORMAT_RGB24, w, h)), cr_(cairo_create(surface_)) {
    cairo_set_source_rgb(cr_, 1, 1, 1);
    cairo_paint(cr_);
    cairo_select_font_face(cr_, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  }
  ~Canvas() {
    cairo_destroy(cr_);
    cairo_surface_destroy(surface_);
  }
  Canvas(const Canvas&) = delete;
  Canvas& operator=(const Canvas&) = delete;
  cairo_t* cr() { return cr_; }
  void save(const std::filesystem::path& png) {
    cairo_surface_flush(surface_);
    if (cairo_surface_write_to_png(surface_, png.string().c_str()) != CAIRO_STATUS_SUCCESS)
      throw Error("cannot write " + png.string() + ": check that the folder exists and is writable");
  }

 private:
  cairo_surface_t* surface_;
  cairo_t* cr_;
};

void font(cairo_t* cr, double size, bool bold = false) {
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, size);
}

double text_width(cairo_t* cr, const std::string& s) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  return e.x_advance;
}

// Draw text with its anchor at (x, y): ax/ay in {0, 0.5, 1} pick left/centre/right, top/middle/bottom.
void text_at(cairo_t* cr, const std::string& s, double x, double y, double ax, double ay) {
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  cairo_font_extents_t fe;
  cairo_font_extents(cr, &fe);
  double h = fe.ascent - fe.descent * 0.2;
  cairo_move_to(cr, x - e.x_advance * ax, y + h * (1 - ay) - 1);
  cairo_show_text(cr, s.c_str());
}

// Axis tick text: compact for big numbers (982070 -> 982k), enough decimals for the tick step.
std::string tick_text(double v, double step) {
  char buf[32];
  double a = std::abs(v);
  if (a >= 1e6 && step >= 1e5) std::snprintf(buf, sizeof buf, "%gM", std::round(v / 1e5) / 10);
  else if (a >= 1e4 && step >= 1e3) std::snprintf(buf, sizeof buf, "%gk", std::round(v / 1e2) / 10);
  else {
    int decimals = step >= 1 ? 0 : int(std::ceil(-std::log10(step) - 1e-9));
    std::snprintf(buf, sizeof buf, "%.*f", std::min(decimals, 6), v);
  }
  return buf;
}

std::string shorten(cairo_t* cr, std::string s, double max_w) {
  if (text_width(cr, s) <= max_w) return s;
  while (s.size() > 4 && text_width(cr, s + "...") > max_w) s.pop_back();
  return s + "...";
}

}  // namespace

void render_line_chart(const LineChart& chart, const std::filesystem::path& png, int width, int height) {
  Canvas canvas(width, height);
  cairo_t* cr = canvas.cr();

  // Data range: x over every point; y over points past the warm-up, unless that leaves none.
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  bool left_out = false;
  for (double warm : {chart.warmup_steps, -double(INFINITY)}) {
    for (const auto& s : chart.series) {
      size_t n = std::min(s.x.size(), s.y.size());
      for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(s.x[i])) continue;
        x0 = std::min(x0, s.x[i]);
        x1 = std::max(x1, s.x[i]);
        if (!std::isfinite(s.y[i])) continue;
        if (s.x[i] < warm) {
          left_out = true;
          continue;
        }
        y0 = std::min(y0, s.y[i]);
        y1 = std::max(y1, s.y[i]);
      }
    }
    if (y0 <= y1) break;
    left_out = false;
  }
  bool empty = !(x0 <= x1 && y0 <= y1);
  if (empty) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 == x0) x0 -= 1, x1 += 1;
  if (y1 == y0) {
    double pad = std::abs(y0) > 0 ? std::abs(y0) * 0.1 : 1;
    y0 -= pad, y1 += pad;
  } else {
    double pad = (y1 - y0) * 0.06;
    // Rates and times are never negative: keep a zero baseline when the data is near it.
    y0 = (y0 >= 0 && y0 - pad < 0) ? 0 : y0 - pad;
    y1 += pad;
  }

  // Layout: legend on the right, sized to the longest name.
  font(cr, 13);
  double legend_w = 0;
  for (const auto& s : chart.series) legend_w = std::max(legend_w, text_width(cr, s.label));
  legend_w = std::min(legend_w, 330.0) + 44;
  double left = 90, right = width - legend_w - 40, top = 62, bottom = height - 70;

  // Title and axis labels.
  cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
  font(cr, 20, true);
  text_at(cr, chart.title, width / 2.0, 22, 0.5, 0.5);
  font(cr, 15);
  text_at(cr, chart.x_label, (left + right) / 2, height - 22, 0.5, 0.5);
  cairo_save(cr);
  cairo_translate(cr, 22, (top + bottom) / 2);
  cairo_rotate(cr, -M_PI / 2);
  text_at(cr, chart.y_label, 0, 0, 0.5, 0.5);
  cairo_restore(cr);

  auto px = [&](double x) { return left + (x - x0) / (x1 - x0) * (right - left); };
  auto py = [&](double y) { return bottom - (y - y0) / (y1 - y0) * (bottom - top); };

  // Grid and ticks.
  font(cr, 12);
  cairo_set_line_width(cr, 1);
  auto xt = nice_ticks(x0, x1, 8), yt = nice_ticks(y0, y1, 7);
  double xstep = xt.size() > 1 ? xt[1] - xt[0] : 1, ystep = yt.size() > 1 ? yt[1] - yt[0] : 1;
  for (double t : yt) {
    cairo_set_source_rgb(cr, 0.88, 0.88, 0.88);
    cairo_move_to(cr, left, std::round(py(t)) + 0.5);
    cairo_line_to(cr, right, std::round(py(t)) + 0.5);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.25, 0.25, 0.25);
    text_at(cr, tick_text(t, ystep), left - 8, py(t), 1, 0.5);
  }
  for (double t : xt) {
    cairo_set_source_rgb(cr, 0.88, 0.88, 0.88);
    cairo_move_to(cr, std::round(px(t)) + 0.5, top);
    cairo_line_to(cr, std::round(px(t)) + 0.5, bottom);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.25, 0.25, 0.25);
    text_at(cr, tick_text(t, xstep), px(t), bottom + 8, 0.5, 0);
  }
  cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
  cairo_rectangle(cr, left + 0.5, top + 0.5, right - left, bottom - top);
  cairo_stroke(cr);

  // Lines, clipped to the plot area. Series past the palette's ten colours are dashed.
  cairo_save(cr);
  cairo_rectangle(cr, left, top, right - left, bottom - top);
  cairo_clip(cr);
  cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
  for (size_t k = 0; k < chart.series.size(); ++k) {
    const auto& s = chart.series[k];
    const Rgb& c = kPalette[k % 10];
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    cairo_set_line_width(cr, 2);
    double dash[] = {7, 4};
    cairo_set_dash(cr, dash, k >= 10 ? 2 : 0, 0);
    size_t n = std::min(s.x.size(), s.y.size());
    bool pen = false;
    size_t points = 0;
    for (size_t i = 0; i < n; ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
        pen = false;
        continue;
      }
      if (pen) cairo_line_to(cr, px(s.x[i]), py(s.y[i]));
      else cairo_move_to(cr, px(s.x[i]), py(s.y[i]));
      pen = true;
      ++points;
    }
    cairo_stroke(cr);
    if (points == 1) {  // a run with one step still shows up
      for (size_t i = 0; i < n; ++i)
        if (std::isfinite(s.x[i]) && std::isfinite(s.y[i])) cairo_arc(cr, px(s.x[i]), py(s.y[i]), 4, 0, 2 * M_PI);
      cairo_fill(cr);
    }
  }
  cairo_restore(cr);
  if (left_out) {
    font(cr, 12);
    cairo_set_source_rgb(cr, 0.45, 0.45, 0.45);
    char note[96];
    std::snprintf(note, sizeof note, "y range leaves out steps < %g (warm-up)", chart.warmup_steps);
    text_at(cr, note, right - 8, top + 8, 1, 0);
  }
  if (empty) {
    font(cr, 16);
    cairo_set_source_rgb(cr, 0.5, 0.5, 0.5);
    text_at(cr, "no run has reported this value yet", (left + right) / 2, (top + bottom) / 2, 0.5, 0.5);
  }

  // Legend.
  font(cr, 13);
  double lx = right + 18, ly = top + 4;
  for (size_t k = 0; k < chart.series.size() && ly < height - 20; ++k, ly += 22) {
    const Rgb& c = kPalette[k % 10];
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    cairo_set_line_width(cr, 3);
    double dash[] = {7, 4};
    cairo_set_dash(cr, dash, k >= 10 ? 2 : 0, 0);
    cairo_move_to(cr, lx, ly + 8);
    cairo_line_to(cr, lx + 26, ly + 8);
    cairo_stroke(cr);
    cairo_set_dash(cr, dash, 0, 0);
    cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
    text_at(cr, shorten(cr, chart.series[k].label, legend_w - 44), lx + 34, ly + 8, 0, 0.5);
  }
  canvas.save(png);
}

namespace {

// Diverging map over load relative to uniform: blue (starved) - white (balanced) - red (hot).
Rgb load_colour(double ratio) {
  if (!std::isfinite(ratio)) return {0.85, 0.85, 0.85};
  Rgb cold{0.19, 0.36, 0.70}, mid{0.97, 0.97, 0.97}, hot{0.75, 0.12, 0.12};
  if (ratio <= 1) {
    double t = std::clamp(ratio, 0.0, 1.0);
    return {cold.r + (mid.r - cold.r) * t, cold.g + (mid.g - cold.g) * t, cold.b + (mid.b - cold.b) * t};
  }
  double t = std::clamp(ratio - 1, 0.0, 1.0);
  return {mid.r + (hot.r - mid.r) * t, mid.g + (hot.g - mid.g) * t, mid.b + (hot.b - mid.b) * t};
}

}  // namespace

void render_expert_heatmap(const ExpertHeatmap& map, const std::filesystem::path& png) {
  size_t layers = 0, experts = 0;
  for (const auto& step : map.load) {
    layers = std::max(layers, step.size());
    for (const auto& l : step) experts = std::max(experts, l.size());
  }
  layers = std::max<size_t>(layers, 1);
  experts = std::max<size_t>(experts, 1);
  const int width = 1200;
  const double cell_h = std::clamp(120.0 / double(experts), 4.0, 18.0);
  const double panel_h = cell_h * double(experts), gap = 16, top = 64, left = 110, right = width - 130;
  const int height = int(top + double(layers) * (panel_h + gap) + 60);
  Canvas canvas(width, std::min(height, 16000));
  cairo_t* cr = canvas.cr();

  cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
  font(cr, 20, true);
  text_at(cr, map.title, width / 2.0, 22, 0.5, 0.5);
  font(cr, 13);
  text_at(cr, "colour: expert load / uniform load (1 = balanced); one band per MoE layer, one row per expert (numbered)",
          width / 2.0, 46, 0.5, 0.5);

  size_t n = map.load.size();
  double s0 = n ? map.steps.front() : 0, s1 = n ? map.steps.back() : 1;
  if (s1 <= s0) s1 = s0 + 1;
  double col_w = (right - left) / double(std::max<size_t>(n, 1));
  for (size_t l = 0; l < layers; ++l) {
    double y = top + double(l) * (panel_h + gap);
    for (size_t i = 0; i < n; ++i) {
      const auto& step = map.load[i];
      for (size_t e = 0; e < experts; ++e) {
        double v = (l < step.size() && e < step[l].size()) ? step[l][e] * double(experts) : NAN;
        Rgb c = load_colour(v);
        cairo_set_source_rgb(cr, c.r, c.g, c.b);
        cairo_rectangle(cr, left + double(i) * col_w, y + double(e) * cell_h, col_w + 0.6, cell_h + 0.6);
        cairo_fill(cr);
      }
    }
    cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
    cairo_set_line_width(cr, 1);
    cairo_rectangle(cr, left + 0.5, y + 0.5, right - left, panel_h);
    cairo_stroke(cr);
    // Expert rows labelled where they are tall enough to read (every k-th row otherwise).
    const size_t every = size_t(std::ceil(9.0 / cell_h));
    font(cr, std::min(11.0, cell_h));
    cairo_set_source_rgb(cr, 0.35, 0.35, 0.35);
    for (size_t e = 0; e < experts; e += every)
      text_at(cr, std::to_string(e), left - 5, y + (double(e) + 0.5) * cell_h, 1, 0.5);
    font(cr, 13);
    cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
    text_at(cr, "layer " + std::to_string(l), left - 26, y + panel_h / 2, 1, 0.5);
  }

  // Step axis under the last band.
  double axis_y = top + double(layers) * (panel_h + gap) - gap + 6;
  font(cr, 12);
  cairo_set_source_rgb(cr, 0.25, 0.25, 0.25);
  auto ticks = nice_ticks(s0, s1, 8);
  for (double t : ticks) {
    double x = left + (t - s0) / (s1 - s0) * (right - left);
    text_at(cr, tick_text(t, ticks.size() > 1 ? ticks[1] - ticks[0] : 1), x, axis_y, 0.5, 0);
  }
  font(cr, 15);
  text_at(cr, "step", (left + right) / 2, axis_y + 30, 0.5, 0.5);

  // Colour bar: 0 .. 2x uniform.
  double bx = right + 40, by = top, bh = std::min(220.0, double(layers) * (panel_h + gap) - gap), bw = 18;
  for (int i = 0; i < 100; ++i) {
    Rgb c = load_colour(2.0 * (1.0 - i / 99.0));
    cairo_set_source_rgb(cr, c.r, c.g, c.b);
    cairo_rectangle(cr, bx, by + bh * i / 100.0, bw, bh / 100.0 + 0.6);
    cairo_fill(cr);
  }
  cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
  cairo_rectangle(cr, bx + 0.5, by + 0.5, bw, bh);
  cairo_stroke(cr);
  font(cr, 12);
  text_at(cr, ">=2", bx + bw + 6, by, 0, 0.5);
  text_at(cr, "1", bx + bw + 6, by + bh / 2, 0, 0.5);
  text_at(cr, "0", bx + bw + 6, by + bh, 0, 0.5);
  canvas.save(png);
}

#endif

}  // namespace moelab::lab
