#!/usr/bin/env python3
"""Draws FineTune's app icon: a rounded square in an indigo-to-teal gradient holding a falling loss
curve, with a sparkle where training ends up.

Writes the 1024x1024 master and the smaller renderings (16-512 px) that the macOS .icns and the
Linux hicolor theme use. Small sizes are drawn, not just shrunk: below 64 px the grid goes and the
strokes get thicker so the curve still reads in a menu or a file list.

    pip install pillow      # the only dependency
    python3 packaging/icon/make_icon.py [OUT_DIR]     # default: assets/icon

Then `python3 packaging/icon/pack_icns.py` rebuilds assets/icon/FineTune.icns from these files.
"""

import math
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter

SIZES = [16, 32, 48, 64, 128, 256, 512, 1024]
SUPERSAMPLE = 4

# Colours: the background gradient runs from the top-left to the bottom-right corner.
TOP_LEFT = (88, 64, 226)  # indigo
BOTTOM_RIGHT = (14, 165, 190)  # teal
SPARKLE = (255, 224, 130)  # warm yellow


def lerp(a, b, t):
    return a + (b - a) * t


def loss_curve(n=160):
    """Points of a falling loss curve in unit coordinates (x right, y down): a fast exponential
    drop that flattens out, with two gentle wiggles so it reads as a measured curve."""
    pts = []
    for i in range(n + 1):
        x = i / n
        y = 0.88 * math.exp(-4.2 * x) + 0.10
        y += 0.012 * math.sin(x * 17.0) * (1.0 - x) * x * 3.0
        pts.append((x, 1.0 - y))
    return pts


def densify(points, step):
    """The polyline resampled so consecutive points are at most `step` apart."""
    out = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        n = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / step))
        out.extend((lerp(x0, x1, i / n), lerp(y0, y1, i / n)) for i in range(1, n + 1))
    return out


def sparkle_polygon(cx, cy, radius, n=96):
    """A four-pointed sparkle (an astroid with slightly fuller sides)."""
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        c, s = math.cos(t), math.sin(t)
        pts.append(
            (
                cx + radius * math.copysign(abs(c) ** 2.6, c),
                cy + radius * math.copysign(abs(s) ** 2.6, s),
            )
        )
    return pts


def render(size):
    """The icon at `size` pixels, drawn at SUPERSAMPLE x and scaled down."""
    small = size <= 48
    medium = size <= 128
    s = size * SUPERSAMPLE
    k = s / 1024.0  # design units are those of the 1024 master

    def p(x, y):
        return (x * k, y * k)

    # Body: Apple's macOS grid puts an 824 px rounded square in the 1024 canvas; tiny sizes use
    # more of the canvas so the shape is not lost.
    inset = 100 if not small else 40
    body = (inset * k, inset * k, (1024 - inset) * k, (1024 - inset) * k)
    radius = (185 if not small else 210) * k

    canvas = Image.new("RGBA", (s, s), (0, 0, 0, 0))

    # Soft shadow under the body (the master only; it would smudge small sizes).
    if not medium:
        shadow = Image.new("L", (s, s), 0)
        ImageDraw.Draw(shadow).rounded_rectangle(
            (body[0], body[1] + 14 * k, body[2], body[3] + 14 * k), radius, fill=120
        )
        shadow = shadow.filter(ImageFilter.GaussianBlur(18 * k))
        canvas.paste((10, 10, 40, 255), (0, 0), shadow)

    # Diagonal gradient: the mean of a horizontal and a vertical ramp.
    ramp = Image.linear_gradient("L").resize((s, s))
    diag = ImageChops.add(ramp, ramp.rotate(90), scale=2.0)
    gradient = Image.composite(
        Image.new("RGBA", (s, s), BOTTOM_RIGHT + (255,)),
        Image.new("RGBA", (s, s), TOP_LEFT + (255,)),
        diag,
    )
    # A faint light from the top, as on Apple's own icons.
    glow = Image.new("L", (s, s), 0)
    ImageDraw.Draw(glow).ellipse(p(-200, -650) + p(1224, 560), fill=46)
    glow = glow.filter(ImageFilter.GaussianBlur(60 * k))
    gradient = Image.composite(Image.new("RGBA", (s, s), (255, 255, 255, 255)), gradient, glow)

    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).rounded_rectangle(body, radius, fill=255)
    canvas.paste(gradient, (0, 0), mask)

    # The chart area inside the body.
    left, top, right, bottom = (232, 250, 800, 760) if not small else (170, 200, 860, 800)

    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if not small:
        # Grid: three faint horizontal lines and the two axes.
        for gy in (0.0, 1 / 3, 2 / 3):
            y = lerp(top, bottom, gy)
            d.line(p(left, y) + p(right + 20, y), fill=(255, 255, 255, 38), width=int(6 * k))
        axis = (255, 255, 255, 110)
        w = int(10 * k)
        d.line(p(left - 36, top - 20) + p(left - 36, bottom + 36), fill=axis, width=w)
        d.line(p(left - 36, bottom + 36) + p(right + 40, bottom + 36), fill=axis, width=w)
    canvas.alpha_composite(layer)

    curve = [p(lerp(left, right, x), lerp(top, bottom, y)) for x, y in loss_curve()]

    # Area under the curve, translucent.
    area = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    ImageDraw.Draw(area).polygon(
        curve + [p(right, bottom + 36), p(left, bottom + 36)], fill=(255, 255, 255, 44)
    )
    canvas.alpha_composite(area)

    # The curve: a blurred glow, then the white stroke with round ends.
    stroke = (46 if not medium else 58 if not small else 96) * k
    for blur, colour, width in (
        (22 * k, (255, 255, 255, 150), stroke * 1.6),
        (0, (255, 255, 255, 255), stroke),
    ):
        line = Image.new("RGBA", (s, s), (0, 0, 0, 0))
        ld = ImageDraw.Draw(line)
        # A round brush stamped along the curve: smooth joins at any size (Pillow's own joins
        # leave hairlines on a dense polyline).
        r = width / 2
        for x, y in densify(curve, r / 4):
            ld.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        if blur:
            line = line.filter(ImageFilter.GaussianBlur(blur))
        canvas.alpha_composite(line)

    # The sparkle above the end of the curve, with a small companion.
    big = (150 if not small else 230) * k
    cx, cy = p(718, 300) if not small else p(690, 330)
    spark = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    sd = ImageDraw.Draw(spark)
    sd.polygon(sparkle_polygon(cx, cy, big * 1.15), fill=SPARKLE + (120,))
    spark = spark.filter(ImageFilter.GaussianBlur(26 * k))
    sd = ImageDraw.Draw(spark)
    sd.polygon(sparkle_polygon(cx, cy, big), fill=SPARKLE + (255,))
    sd.polygon(sparkle_polygon(cx, cy, big * 0.45), fill=(255, 252, 235, 255))
    if not small:
        sd.polygon(sparkle_polygon(cx - 150 * k, cy + 120 * k, big * 0.34), fill=(255, 255, 255, 235))
    canvas.alpha_composite(spark)

    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "assets" / "icon"
    out.mkdir(parents=True, exist_ok=True)
    for size in SIZES:
        path = out / f"finetune-{size}.png"
        # No timestamps or text chunks, so a rerun gives the same bytes.
        render(size).save(path, "PNG", optimize=True)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
