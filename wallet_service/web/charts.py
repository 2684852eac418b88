"""Bar charts as inline SVG, drawn on the server: no JavaScript, no front-end build, and a
page reads the same in any browser (and in the headless one the tests use)."""

from __future__ import annotations

from html import escape

from markupsafe import Markup

chart_width_px = 640
chart_height_px = 220
bars_max = 48
bar_width_px_max = 56


def bar_chart(points: list[tuple[str, float]], title: str, color: str = "#2a7ab8") -> Markup:
    points = points[:bars_max]
    if not points:
        return Markup(
            f'<figure class="chart"><figcaption>{escape(title)}</figcaption>'
            '<p class="empty">—</p></figure>'
        )
    top = max(value for _, value in points) or 1
    slot = chart_width_px / len(points)
    bar = min(max(slot * 0.7, 2), bar_width_px_max)
    plot_height = chart_height_px - 40
    parts = []
    for index, (label, value) in enumerate(points):
        height = plot_height * value / top
        x = index * slot + (slot - bar) / 2
        y = 10 + plot_height - height
        parts.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{height:.1f}" '
            f'fill="{color}"><title>{escape(label)}: {value:g}</title></rect>'
            f'<text x="{x + bar / 2:.1f}" y="{chart_height_px - 12}" font-size="11" '
            f'text-anchor="middle">{escape(label)}</text>'
            f'<text x="{x + bar / 2:.1f}" y="{max(y - 3, 10):.1f}" font-size="10" '
            f'text-anchor="middle">{value:g}</text>'
        )
    svg = (
        f'<svg viewBox="0 0 {chart_width_px} {chart_height_px}" width="{chart_width_px}" '
        f'height="{chart_height_px}" role="img" aria-label="{escape(title)}">'
        + "".join(parts)
        + "</svg>"
    )
    return Markup(f'<figure class="chart"><figcaption>{escape(title)}</figcaption>{svg}</figure>')
