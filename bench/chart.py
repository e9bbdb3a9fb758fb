"""bench/throughput.png: throughput against concurrency, the service against the floor (Pillow)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SERIES = {
    "floor": ("floor: the SDK calls alone", (90, 90, 90)),
    "handler": ("service, handler level", (31, 119, 180)),
    "handler_new_bearer": ("handler level, a new bearer each request", (140, 190, 230)),
    "worker": ("through azure-functions-runtime, in-process", (44, 160, 44)),
    "e2e": ("service, end to end (dev host + worker)", (255, 127, 14)),
}
PANELS = (("refresh", "Refresh: 1 read + 1 ACS call"), ("first_issue", "First issue"))
WIDTH, HEIGHT = 1200, 560
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 30, 70, 125
GAP = 90


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _nice_max(value: float) -> float:
    """A round axis top a little above `value`: 1022 -> 1500, 617 -> 700."""
    half_step = 10 ** max(0, len(str(int(value))) - 1) / 2
    return max(half_step, math.ceil(value * 1.1 / half_step) * half_step)


def draw(results: dict, path: Path) -> Path:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    pen = ImageDraw.Draw(image)
    title, label, small = _font(22), _font(16), _font(14)
    meta = results.get("meta", {})
    pen.text(
        (MARGIN_LEFT, 18),
        f"ACS token service: throughput vs concurrency ({meta.get('machine', '')}, whole stack local)",
        fill="black",
        font=title,
    )
    panel_width = (WIDTH - MARGIN_LEFT - MARGIN_RIGHT - GAP) // 2
    for index, (key, heading) in enumerate(PANELS):
        data = results["throughput"][key]
        levels = list(data)
        left = MARGIN_LEFT + index * (panel_width + GAP)
        top, bottom = MARGIN_TOP + 20, HEIGHT - MARGIN_BOTTOM
        series = [m for m in SERIES if m in data[levels[0]]]
        peak = _nice_max(max(data[c][m]["throughput"] for c in levels for m in series))
        pen.text((left, MARGIN_TOP - 8), heading, fill="black", font=label)
        pen.line([(left, top), (left, bottom), (left + panel_width, bottom)], fill="black", width=2)
        for tick in range(5):
            value = peak * tick / 4
            y = bottom - (bottom - top) * tick / 4
            pen.line([(left - 5, y), (left + panel_width, y)], fill=(225, 225, 225) if tick else "black")
            pen.text((left - 8, y), f"{value:.0f}", fill="black", font=small, anchor="rm")
        pen.text((left - 60, top - 30), "ops/s", fill="black", font=small)

        count = len(levels)

        def x_of(i: int, left=left, count=count) -> float:
            return left + panel_width * (i + 0.5) / count

        for i, c in enumerate(levels):
            pen.text((x_of(i), bottom + 8), str(c), fill="black", font=small, anchor="mt")
        pen.text(
            (left + panel_width / 2, bottom + 30),
            "concurrent requests",
            fill="black",
            font=small,
            anchor="mt",
        )
        labels = []
        for mode in series:
            color = SERIES[mode][1]
            points = [
                (x_of(i), bottom - (bottom - top) * data[c][mode]["throughput"] / peak)
                for i, c in enumerate(levels)
            ]
            if len(points) > 1:
                pen.line(points, fill=color, width=3)
            for x, y in points:
                pen.ellipse([(x - 5, y - 5), (x + 5, y + 5)], fill=color)
            # Ratios of the two service series: handler above its points, end to end below.
            # (The new-bearer series' ratios are in the table: more labels would not be legible.)
            if mode in ("handler", "e2e"):
                for (x, y), c in zip(points, levels, strict=True):
                    above = mode == "handler"
                    where = (x + 8, y - 6) if above else (x + 8, y + 6)
                    labels.append(
                        (where, f"x{data[c][mode]['ratio_to_floor']:.2f}", color, "lb" if above else "lt")
                    )
        for where, text, color, anchor in labels:  # last, so that no line crosses them
            pen.rectangle(pen.textbbox(where, text, font=small, anchor=anchor), fill="white")
            pen.text(where, text, fill=color, font=small, anchor=anchor)
    x, y = MARGIN_LEFT, HEIGHT - 52
    for name, color in SERIES.values():
        width = 38 + int(pen.textlength(name, font=label)) + 30
        if x + width > WIDTH - MARGIN_RIGHT:
            x, y = MARGIN_LEFT, y + 24
        pen.line([(x, y), (x + 30, y)], fill=color, width=4)
        pen.text((x + 38, y), name, fill="black", font=label, anchor="lm")
        x += width
    pen.text(
        (WIDTH - MARGIN_RIGHT, HEIGHT - 14),
        "x = ratio to the floor in the same round; medians of rounds",
        fill=(110, 110, 110),
        font=small,
        anchor="rb",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path
