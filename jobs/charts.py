"""Three small charts for run reports, each drawn twice from one description: as inline SVG
for the HTML page and as a PNG (Pillow) for places that only show images.

Why not a charting library: the report has to be one self-contained file that opens
air-gapped and looks the same everywhere. matplotlib would add tens of megabytes of
dependencies for three charts and a PNG-or-path-soup SVG; a JavaScript library would have
to be inlined into every report. Here a chart is a `Scene`: a list of marks (rectangles,
polylines, labels) in a fixed coordinate space, which `to_svg()` and `to_png()` both draw.
SVG marks carry classes (`bar`, `series`, …) so a browser test can find and measure them.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field, replace

# Palette: one accent per meaning, readable on white and by people with red-green deficiency.
INK = "#1f2933"
MUTED = "#616e7c"
GRID = "#e4e7eb"
ACCENT = "#2563eb"
ACCENT_LIGHT = "#93b4f5"
ERROR = "#c2410c"
TAIL = "#f1f3f6"

WIDTH = 720
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"


@dataclass
class Rect:
    x: float
    y: float
    w: float
    h: float
    fill: str
    cls: str = ""
    title: str | None = None  # a tooltip in the browser


@dataclass
class Line:
    points: list[tuple[float, float]]
    stroke: str
    width: float = 1.0
    dash: tuple[float, float] | None = None
    fill: str | None = None  # when set: a closed, filled polygon
    opacity: float = 1.0
    cls: str = ""


@dataclass
class Label:
    x: float
    y: float  # the vertical middle of the text
    text: str
    size: float = 12
    fill: str = INK
    anchor: str = "start"  # start | middle | end
    bold: bool = False
    cls: str = ""


@dataclass
class Scene:
    name: str
    title: str  # what a screen reader says; the page shows its own heading
    height: float
    width: float = WIDTH
    marks: list = field(default_factory=list)

    def add(self, *marks) -> None:
        self.marks.extend(marks)

    def to_svg(self) -> str:
        body = "\n".join(_svg_mark(mark) for mark in self.marks)
        return (
            f'<svg class="chart" data-chart="{self.name}" viewBox="0 0 {self.width:g} {self.height:g}" '
            f'role="img" aria-label="{_esc(self.title)}" xmlns="http://www.w3.org/2000/svg" '
            f'font-family="{_esc(FONT)}">\n<title>{_esc(self.title)}</title>\n{body}\n</svg>'
        )

    def to_png(self, scale: int = 2) -> bytes:
        return _render_png(self, scale)


# -- SVG --------------------------------------------------------------------------------------

_SVG_ANCHOR = {"start": "start", "middle": "middle", "end": "end"}


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _svg_mark(mark) -> str:
    cls = f' class="{mark.cls}"' if mark.cls else ""
    if isinstance(mark, Rect):
        tip = f"<title>{_esc(mark.title)}</title>" if mark.title else ""
        return (
            f'<rect{cls} x="{mark.x:.1f}" y="{mark.y:.1f}" width="{max(mark.w, 0):.1f}" '
            f'height="{max(mark.h, 0):.1f}" fill="{mark.fill}" rx="2">{tip}</rect>'
        )
    if isinstance(mark, Line):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in mark.points)
        dash = f' stroke-dasharray="{mark.dash[0]:g} {mark.dash[1]:g}"' if mark.dash else ""
        if mark.fill:
            return f'<polygon{cls} points="{points}" fill="{mark.fill}" fill-opacity="{mark.opacity:g}" stroke="none"/>'
        return (
            f'<polyline{cls} points="{points}" fill="none" stroke="{mark.stroke}" '
            f'stroke-width="{mark.width:g}" stroke-opacity="{mark.opacity:g}" stroke-linejoin="round"{dash}/>'
        )
    weight = ' font-weight="600"' if mark.bold else ""
    return (
        f'<text{cls} x="{mark.x:.1f}" y="{mark.y:.1f}" font-size="{mark.size:g}" fill="{mark.fill}" '
        f'text-anchor="{_SVG_ANCHOR[mark.anchor]}" dominant-baseline="central"{weight}>{_esc(mark.text)}</text>'
    )


# -- PNG --------------------------------------------------------------------------------------

_PIL_ANCHOR = {"start": "lm", "middle": "mm", "end": "rm"}


def _render_png(scene: Scene, scale: int) -> bytes:
    import io

    from PIL import Image, ImageDraw, ImageFont

    size = (int(scene.width * scale), int(scene.height * scale))
    image = Image.new("RGBA", size, "white")
    fonts: dict[float, ImageFont.ImageFont] = {}
    for mark in scene.marks:
        layer = Image.new("RGBA", size, (0, 0, 0, 0)) if getattr(mark, "opacity", 1.0) < 1 else None
        draw = ImageDraw.Draw(layer or image)
        if isinstance(mark, Rect):
            box = [mark.x * scale, mark.y * scale, (mark.x + max(mark.w, 0)) * scale, (mark.y + max(mark.h, 0)) * scale]
            draw.rounded_rectangle(box, radius=2 * scale, fill=mark.fill)
        elif isinstance(mark, Line):
            points = [(x * scale, y * scale) for x, y in mark.points]
            color = _rgba(mark.fill or mark.stroke, mark.opacity)
            if mark.fill:
                draw.polygon(points, fill=color)
            else:
                for start, end in _dashes(points, mark.dash, scale):
                    draw.line([start, end], fill=color, width=max(1, round(mark.width * scale)))
        else:
            font = fonts.get(mark.size) or fonts.setdefault(mark.size, ImageFont.load_default(size=mark.size * scale))
            draw.text(
                (mark.x * scale, mark.y * scale), mark.text, font=font, fill=mark.fill, anchor=_PIL_ANCHOR[mark.anchor],
                stroke_width=1 if mark.bold else 0, stroke_fill=mark.fill,
            )  # fmt: skip
        if layer is not None:
            image.alpha_composite(layer)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _rgba(color: str, opacity: float) -> tuple[int, int, int, int]:
    color = color.lstrip("#")
    return (int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16), round(255 * opacity))


def _dashes(points, dash, scale):
    """Segments of a polyline; a dashed one is cut into on/off pieces (Pillow draws no dashes)."""
    for start, end in zip(points, points[1:]):
        if not dash:
            yield start, end
            continue
        on, off = dash[0] * scale, dash[1] * scale
        length = math.dist(start, end)
        position = 0.0
        while position < length:
            a = position / length
            b = min(position + on, length) / length
            yield _lerp(start, end, a), _lerp(start, end, b)
            position += on + off


def _lerp(start, end, t):
    return (start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t)


# -- scales and formatting --------------------------------------------------------------------


def text_width(text: str, size: float) -> float:
    """Rough width of sans-serif text: enough to lay out margins without a font engine."""
    return 0.56 * size * len(text)


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 × 10^k) up to at least `high`."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude)
    steps = math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(steps + 1)]


_TIME_STEPS = [1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400]


def time_ticks(high: float, count: int = 6) -> list[float]:
    step = next((s for s in _TIME_STEPS if high / s <= count), _TIME_STEPS[-1] * math.ceil(high / count / 86400))
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        minutes = seconds / 60
        return f"{minutes:.0f} min" if minutes == int(minutes) else f"{minutes:.1f} min"
    return f"{seconds / 3600:.1f} h"


def fmt_number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{value:.3g}"


def fmt_ms(value: float) -> str:
    return f"{fmt_number(value / 1000)} s" if value >= 1000 else f"{fmt_number(value)} ms"


# -- the three charts -------------------------------------------------------------------------


def throughput_series(timeline: list[list[float]], wall_s: float, bins: int = 60) -> list[tuple[float, float, float]]:
    """(start s, end s, rows/s) spans covering the run.

    The timeline has one (seconds, cumulative rows) point per committed file, and a file's
    rows were produced over the time since the previous commit: each span is one such
    interval at its average rate. Past `bins` commits, the spans are spread into `bins`
    equal time bins instead, so a 100-million-row run still draws a readable line."""
    points = sorted((float(t), int(rows)) for t, rows in timeline)
    end = max([wall_s] + [t for t, _ in points]) or 1.0
    spans, last_t, last_rows = [], 0.0, 0
    for t, rows in points:
        if t > last_t:
            spans.append((last_t, t, (rows - last_rows) / (t - last_t)))
            last_t, last_rows = t, rows
    if last_t < end:
        spans.append((last_t, end, 0.0))
    return spans if len(spans) <= bins else _rebin(spans, end, bins)


def _rebin(spans: list[tuple[float, float, float]], end: float, bins: int) -> list[tuple[float, float, float]]:
    width = end / bins
    rows_in_bin = [0.0] * bins
    for start, stop, rate in spans:
        for index in range(int(start / width), min(bins, int(stop / width) + 1)):
            overlap = min(stop, (index + 1) * width) - max(start, index * width)
            if overlap > 0:
                rows_in_bin[index] += rate * overlap
    return [(i * width, (i + 1) * width, count / width) for i, count in enumerate(rows_in_bin)]


def throughput_chart(timeline: list[list[float]], wall_s: float, mean: float | None = None,
                     empty: str = "no rows were committed") -> Scene:
    scene = Scene("throughput", "Throughput over time: rows committed per second", height=300)
    left, right, top, bottom = 64, WIDTH - 24, 30, 300 - 44
    series = throughput_series(timeline, wall_s) if timeline else []
    peak = max((rate for _, _, rate in series), default=0.0)
    end = series[-1][1] if series else max(wall_s, 1.0)
    y_ticks = nice_ticks(peak or 1.0)
    x_ticks = [t for t in time_ticks(end) if t <= end * 1.0001]

    def sx(t: float) -> float:
        return left + (right - left) * t / end

    def sy(rate: float) -> float:
        return bottom - (bottom - top) * rate / y_ticks[-1]

    if timeline:
        _tail_note(scene, timeline, end, sx, top, bottom)  # under the grid lines
    _grid(scene, [(sy(v), fmt_number(v)) for v in y_ticks], left, right)
    for t in x_ticks:
        scene.add(Label(sx(t), bottom + 16, fmt_duration(t), size=11, fill=MUTED, anchor="middle", cls="tick"))
    scene.add(Label(left - 8, 10, "rows/s", size=11, fill=MUTED, anchor="end", cls="axis-title"))
    scene.add(Label(right, bottom + 34, "time since the run started", size=11, fill=MUTED, anchor="end", cls="axis-title"))
    if not series:
        scene.add(Label((left + right) / 2, (top + bottom) / 2, empty, fill=MUTED, anchor="middle"))
        return scene
    steps = [(sx(0), sy(series[0][2]))]
    for start, stop, rate in series:
        steps += [(sx(start), sy(rate)), (sx(stop), sy(rate))]
    scene.add(Line([(sx(0), bottom)] + steps + [(sx(end), bottom)], stroke=ACCENT, fill=ACCENT, opacity=0.16, cls="area"))
    scene.add(Line(steps, stroke=ACCENT, width=2, cls="series"))
    if mean:
        scene.add(Line([(left, sy(mean)), (right, sy(mean))], stroke=INK, width=1, dash=(5, 4), opacity=0.7, cls="mean"))
        # The legend sits above the plot, where no data can hide it.
        legend = f"mean over the run: {fmt_number(mean)} rows/s"
        legend_x = right - text_width(legend, 11)
        scene.add(Line([(legend_x - 30, 10), (legend_x - 6, 10)], stroke=INK, width=1, dash=(5, 4), opacity=0.7))
        scene.add(Label(legend_x, 10, legend, size=11, fill=INK, cls="legend"))
    return scene


def _tail_note(scene: Scene, timeline: list[list[float]], end: float, sx, top: float, bottom: float) -> None:
    """Name the time after the last commit, or a reader takes the drop to zero for a stall."""
    last = max(float(t) for t, _ in timeline)
    if end - last < 0.05 * end:
        return
    scene.add(Rect(sx(last), top, sx(end) - sx(last), bottom - top, TAIL, cls="tail"))
    scene.add(Label((sx(last) + sx(end)) / 2, top + 14, "after the last commit:", size=11, fill=MUTED, anchor="middle"))
    scene.add(Label((sx(last) + sx(end)) / 2, top + 30, "invariant check, summary", size=11, fill=MUTED, anchor="middle"))


def errors_chart(errors_by_code: dict[str, int], rows: int) -> Scene:
    items = sorted(errors_by_code.items(), key=lambda item: (-item[1], item[0]))
    row_h = 28
    height = 40 + row_h * max(1, len(items))
    scene = Scene("errors", "Error rows by error code", height=height)
    if not items:
        scene.add(Label(WIDTH / 2, height / 2, "No error rows: every row came out ok.", fill=MUTED, anchor="middle", cls="empty"))
        return scene
    left = 16 + max(text_width(code, 12) for code, _ in items)
    right = WIDTH - 16 - text_width("000,000 (100 %)", 11)
    ticks = nice_ticks(max(count for _, count in items))

    def sx(value: float) -> float:
        return left + (right - left) * value / ticks[-1]

    for value in ticks:
        scene.add(Line([(sx(value), 8), (sx(value), height - 26)], stroke=GRID, cls="grid"))
        scene.add(Label(sx(value), height - 14, fmt_number(value), size=11, fill=MUTED, anchor="middle", cls="tick"))
    for index, (code, count) in enumerate(items):
        y = 12 + index * row_h
        share = f"{100 * count / rows:.1f} %" if rows else "–"
        scene.add(Label(left - 8, y + 10, code, size=12, anchor="end", cls="category"))
        scene.add(Rect(left, y, sx(count) - left, 20, ERROR, cls="bar", title=f"{code}: {count} rows ({share})"))
        scene.add(Label(sx(count) + 6, y + 10, f"{count:,} ({share})", size=11, fill=MUTED, cls="value"))
    return scene


STAGE_LABELS = {"fetch_ms": "fetch", "decode_ms": "decode + tiling", "infer_ms": "infer (per batch)"}


def latency_chart(latency_ms: dict[str, dict[str, float | None]]) -> Scene:
    stages = [(stage, values) for stage, values in latency_ms.items() if values.get("p50") is not None]
    group_h = 52
    height = 58 + group_h * max(1, len(stages))
    scene = Scene("latency", "Latency per stage, p50 and p95, log scale", height=height)
    if not stages:
        scene.add(Label(WIDTH / 2, height / 2, "No latencies were recorded.", fill=MUTED, anchor="middle", cls="empty"))
        return scene
    values = [v for _, q in stages for v in (q["p50"], q.get("p95")) if v]
    low = 10 ** math.floor(math.log10(max(min(values), 1e-3)))
    high = 10 ** math.ceil(math.log10(max(values) * 1.0001))
    left = 16 + max(text_width(STAGE_LABELS.get(stage, stage), 12) for stage, _ in stages)
    right = WIDTH - 16 - text_width("0000 ms", 11)

    def sx(value: float) -> float:
        return left + (right - left) * math.log10(max(value, low) / low) / math.log10(high / low)

    decade = low
    while decade <= high * 1.0001:
        scene.add(Line([(sx(decade), 8), (sx(decade), height - 46)], stroke=GRID, cls="grid"))
        scene.add(Label(sx(decade), height - 34, fmt_ms(decade), size=11, fill=MUTED, anchor="middle", cls="tick"))
        decade *= 10
    for index, (stage, quantiles) in enumerate(stages):
        y = 12 + index * group_h
        name = STAGE_LABELS.get(stage, stage)
        scene.add(Label(left - 8, y + 19, name, size=12, anchor="end", cls="category"))
        for offset, (q, color) in enumerate((("p50", ACCENT), ("p95", ACCENT_LIGHT))):
            value = quantiles.get(q)
            if value is None:
                continue
            bar_y = y + offset * 19
            scene.add(Rect(left, bar_y, sx(value) - left, 17, color, cls="bar", title=f"{name} {q}: {fmt_ms(value)}"))
            scene.add(Label(sx(value) + 6, bar_y + 8.5, fmt_ms(value), size=11, fill=MUTED, cls="value"))
    legend_y = height - 12
    for offset, (q, color) in enumerate((("p50", ACCENT), ("p95", ACCENT_LIGHT))):
        x = left + offset * 70
        scene.add(Rect(x, legend_y - 6, 12, 12, color, cls="legend"))
        scene.add(Label(x + 18, legend_y, q, size=11, fill=MUTED))
    return scene


def _grid(scene: Scene, rows: list[tuple[float, str]], left: float, right: float) -> None:
    for y, text in rows:
        scene.add(Line([(left, y), (right, y)], stroke=GRID, cls="grid"))
        scene.add(Label(left - 8, y, text, size=11, fill=MUTED, anchor="end", cls="tick"))


def with_heading(scene: Scene, title: str, subtitle: str) -> Scene:
    """The scene moved down under a title and a subtitle, for an image that stands alone."""
    offset = 56
    titled = Scene(scene.name, scene.title, height=scene.height + offset, width=scene.width)
    titled.add(Label(16, 20, title, size=15, bold=True), Label(16, 42, subtitle, size=12, fill=MUTED))
    for mark in scene.marks:
        if isinstance(mark, Line):
            titled.add(replace(mark, points=[(x, y + offset) for x, y in mark.points]))
        else:
            titled.add(replace(mark, y=mark.y + offset))
    return titled
