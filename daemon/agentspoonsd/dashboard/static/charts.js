// The dashboard's uPlot charts: options for the price chart (line or candles, with volume) and
// the volatility chart (every estimator and the GARCH forecast, annualised or per bar), the
// legend kept on the latest values, and a chart as PNG. uPlot (vendored, global `uPlot`) draws
// axes and series on a canvas; its legend is DOM.

/* global uPlot */
import {
  MISSING,
  axisTitle,
  formatAxisPrice,
  formatNumber,
  formatPrice,
  formatTimestamp,
  tickLabels,
} from "./format.js";
import { ESTIMATORS } from "./series.js";

export const COLORS = ["#4fc3f7", "#ffb74d", "#81c784", "#ba68c8", "#f06292", "#e6ee9c"];
export const GARCH_COLOR = "#ff5252";
export const BACKGROUND = "#16212c";
const UP = "#3fb950";
const DOWN = "#f85149";
const MUTED = "#8aa0b2";
const GRID = "#263544";
export const AXIS_FONT = "12px system-ui, sans-serif";
const LABEL_FONT = "600 12px system-ui, sans-serif";
// Pixels between time ticks: a "HH:MM:SS" label is ~55 px at 12 px, so labels never touch.
const TIME_SPACE = 90;

function timeAxis(zone) {
  return {
    stroke: MUTED,
    grid: { stroke: GRID },
    ticks: { stroke: GRID },
    font: AXIS_FONT,
    labelFont: LABEL_FONT,
    labelSize: 20,
    label: axisTitle(null, null, zone),
    space: TIME_SPACE,
    values: (u, splits, axisIdx, space, increment) => {
      const labels = tickLabels(splits, increment, zone);
      u.tickLabels = { splits, labels }; // read back after drawing (recordTicks)
      return labels;
    },
  };
}

// The x series: its legend entry reads the time in the page's convention.
function timeSeries(zone) {
  return { label: "bar close", value: (u, v) => (v == null ? MISSING : formatTimestamp(v, zone)) };
}

function valueAxis(label, format, size = 72) {
  return {
    stroke: MUTED,
    grid: { stroke: GRID },
    ticks: { stroke: GRID },
    font: AXIS_FONT,
    labelFont: LABEL_FONT,
    labelSize: 20,
    label,
    size,
    values: (u, ticks) => ticks.map(format),
  };
}

/**
 * The legend shows the latest values whenever the cursor is not over the plot (uPlot's own
 * legend would show "–" until hovered).
 */
export function showLatest(u) {
  if (u.cursor.idx != null) return;
  const n = u.data[0].length;
  if (n) u.setLegend({ idx: n - 1 });
}

// Where the time ticks were drawn and what they say, and the axes' titles, in the chart's
// dataset: the browser test checks that no two labels overlap and that every axis has a title.
function recordTicks(u) {
  u.root.dataset.axes = JSON.stringify(u.axes.map((axis) => axis.label ?? ""));
  const ticks = u.tickLabels;
  if (!ticks) return;
  const at = ticks.splits.map((t, i) => [Math.round(u.valToPos(t, "x")), ticks.labels[i]]);
  u.root.dataset.xticks = JSON.stringify(at);
}

function titleTimeAxis(zone) {
  return (u, key) => {
    if (key !== "x") return;
    const { min, max } = u.scales.x;
    u.axes[0].label = axisTitle(min, max, zone);
  };
}

function commonHooks(zone, extra = {}) {
  return {
    setCursor: [showLatest],
    setScale: [titleTimeAxis(zone)],
    draw: [recordTicks, ...(extra.draw || [])],
    setSeries: extra.setSeries || [],
  };
}

function tzDate(zone) {
  // Ticks on round UTC minutes and hours in UTC (uPlot would round in local time).
  return zone === "local" ? undefined : (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
}

// Candles drawn over the plot from the open, high, low and close series (which draw no line).
function drawCandles(u) {
  const [xs, open, high, low, close] = u.data;
  const n = xs.length;
  if (!n) return;
  const { left, top, width, height } = u.bbox;
  const [first, last] = [u.valToIdx(u.scales.x.min), u.valToIdx(u.scales.x.max)];
  const step = n > 1 ? Math.abs(u.valToPos(xs[n - 1], "x", true) - u.valToPos(xs[0], "x", true)) / (n - 1) : 8;
  const body = Math.max(1, Math.min(12, step * 0.7));
  const ctx = u.ctx;
  ctx.save();
  ctx.beginPath();
  ctx.rect(left, top, width, height);
  ctx.clip();
  for (let i = first; i <= last; i += 1) {
    if (open[i] == null || high[i] == null || low[i] == null || close[i] == null) continue;
    const x = Math.round(u.valToPos(xs[i], "x", true));
    const yo = u.valToPos(open[i], "y", true);
    const yc = u.valToPos(close[i], "y", true);
    const color = close[i] >= open[i] ? UP : DOWN;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(x + 0.5, u.valToPos(high[i], "y", true));
    ctx.lineTo(x + 0.5, u.valToPos(low[i], "y", true));
    ctx.stroke();
    ctx.fillRect(x - body / 2 + 0.5, Math.min(yo, yc), body, Math.max(1, Math.abs(yc - yo)));
  }
  ctx.restore();
}

/**
 * The price chart: data [x, open, high, low, close, volume]. `view`: "line" (close, with high and
 * low dashed) or "candles"; volume as bars in the lowest quarter on its own scale.
 */
export function priceOptions({ width, height, zone, currency, view }) {
  const unit = currency ?? "quote currency";
  const value = (u, v) => (v == null ? MISSING : formatPrice(v));
  const candles = view === "candles";
  const none = () => null;
  const ohlc = (label, stroke, show, dash) => ({
    label,
    stroke,
    width: 1,
    show,
    value,
    ...(dash ? { dash } : {}),
    ...(candles ? { paths: none, points: { show: false } } : {}),
  });
  return {
    width,
    height,
    tzDate: tzDate(zone),
    scales: {
      x: { time: true },
      vol: { range: (u, min, max) => [0, Math.max(max, 1e-12) * 4] },
    },
    axes: [timeAxis(zone), valueAxis(`price (${unit})`, formatAxisPrice)],
    series: [
      timeSeries(zone),
      ohlc("open", MUTED, candles, null),
      { ...ohlc("high", "#5d7284", true, [4, 4]), points: { show: false } },
      { ...ohlc("low", "#5d7284", true, [4, 4]), points: { show: false } },
      { ...ohlc("close", COLORS[0], true, null), width: candles ? 1 : 1.5 },
      {
        label: "volume",
        scale: "vol",
        stroke: "#3d5366",
        fill: "rgba(93, 114, 132, 0.35)",
        paths: uPlot.paths.bars({ size: [0.6, 12] }),
        points: { show: false },
        value: (u, v) => (v == null ? MISSING : formatNumber(v, 4)),
      },
    ],
    hooks: commonHooks(zone, { draw: candles ? [drawCandles] : [] }),
  };
}

/**
 * The volatility chart: data [x, …one column per estimator, GARCH σ next bar], in percent,
 * annualised (`perBar` false) or per bar. `shown[i]`: which estimators are drawn;
 * `onToggle(i, show)` hears the legend's clicks.
 */
export function volatilityOptions({ width, height, zone, perBar, shown, onToggle }) {
  const digits = perBar ? 4 : 2;
  const value = (u, v) => (v == null ? MISSING : `${v.toFixed(digits)} %`);
  const label = perBar ? "σ per bar (%)" : "σ annualised (%)";
  return {
    width,
    height,
    tzDate: tzDate(zone),
    scales: { x: { time: true } },
    axes: [timeAxis(zone), valueAxis(label, (v) => `${+v.toFixed(6)} %`)],
    series: [
      timeSeries(zone),
      ...ESTIMATORS.map(([, name], i) => ({
        label: name,
        show: shown[i],
        stroke: COLORS[i],
        width: 1,
        value,
      })),
      { label: "GARCH σ next bar", stroke: GARCH_COLOR, width: 1.5, dash: [6, 3], value },
    ],
    hooks: commonHooks(zone, {
      setSeries: [(u, i) => i != null && onToggle?.(i - 1, u.series[i].show)],
    }),
  };
}

/**
 * The chart as a PNG: its canvas (plot, axes, titles) on the page's background, under `title` and
 * a line of the legend's latest values. A promise of a Blob.
 */
export function chartPng(u, title) {
  const source = u.ctx.canvas;
  const ratio = source.width / Math.max(1, u.width);
  const header = Math.round(44 * ratio);
  const canvas = document.createElement("canvas");
  canvas.width = source.width;
  canvas.height = source.height + header;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = BACKGROUND;
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#dce6ee";
  ctx.font = `600 ${Math.round(13 * ratio)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  ctx.fillText(title, 8 * ratio, 6 * ratio);
  const last = u.data[0].length - 1;
  const legend = u.series
    .map((series, i) => {
      if (i === 0 || !series.show || last < 0) return null;
      return `${series.label} ${series.value(u, u.data[i][last])}`;
    })
    .filter(Boolean)
    .join("   ");
  ctx.font = `${Math.round(11 * ratio)}px system-ui, sans-serif`;
  ctx.fillStyle = MUTED;
  ctx.fillText(legend, 8 * ratio, 25 * ratio);
  ctx.drawImage(source, 0, header);
  return new Promise((resolve, reject) =>
    canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("no PNG"))), "image/png"),
  );
}
