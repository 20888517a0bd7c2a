#!/usr/bin/env python3
"""Regenerate kernelspec/logo-{32x32,64x64}.png and logo-svg.svg (stdlib only).

The mark: a deep-blue rounded square holding a light-blue shield with a "K".
Geometry lives in a 64x64 design space; the PNGs are rendered from the same
shapes as the SVG (the shield's Bezier curves are flattened to a polygon),
with 8x8 supersampling for anti-aliasing.
"""
import math
import pathlib
import struct
import zlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "kernelspec"
DEEP = (0x1E, 0x3A, 0x8A)  # background square and the K
LIGHT = (0x93, 0xC5, 0xFD)  # shield
RADIUS = 13  # corner radius of the square
SHIELD = "M 15 12 L 49 12 L 49 31 C 49 43 41 50 32 55 C 23 50 15 43 15 31 Z"
STROKE = 5.5  # width of the K's strokes (round caps)
K = [((25.5, 20), (25.5, 45)), ((39, 20), (26.5, 33.5)), ((29.5, 30.5), (40, 45))]


def bezier(p0, p1, p2, p3, n=48):
    for i in range(1, n + 1):
        t = i / n
        u = 1 - t
        yield tuple(u**3 * a + 3 * u * u * t * b + 3 * u * t * t * c + t**3 * d
                    for a, b, c, d in zip(p0, p1, p2, p3))


def shield_polygon():
    tok = SHIELD.replace("Z", "").split()
    pts, i = [], 0
    while i < len(tok):
        cmd = tok[i]
        if cmd in "ML":
            pts.append((float(tok[i + 1]), float(tok[i + 2])))
            i += 3
        elif cmd == "C":
            c = [(float(tok[i + 1 + 2 * k]), float(tok[i + 2 + 2 * k])) for k in range(3)]
            pts.extend(bezier(pts[-1], *c))
            i += 7
    return pts


POLY = shield_polygon()


def in_poly(x, y):
    inside = False
    for (x1, y1), (x2, y2) in zip(POLY, POLY[1:] + POLY[:1]):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def in_rounded_square(x, y):
    dx = max(RADIUS - x, 0, x - (64 - RADIUS))
    dy = max(RADIUS - y, 0, y - (64 - RADIUS))
    return dx * dx + dy * dy <= RADIUS * RADIUS


def seg_dist(px, py, a, b):
    (ax, ay), (bx, by) = a, b
    vx, vy = bx - ax, by - ay
    t = max(0.0, min(1.0, ((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy)))
    return math.hypot(px - ax - t * vx, py - ay - t * vy)


def color_at(x, y):
    """Colour of the design at (x, y), or None where transparent."""
    if not in_rounded_square(x, y):
        return None
    if in_poly(x, y) and all(seg_dist(x, y, a, b) > STROKE / 2 for a, b in K):
        return LIGHT
    return DEEP


def render(size, ss=8):
    scale = 64 / size
    rows = []
    for j in range(size):
        row = bytearray([0])  # PNG filter type 0
        for i in range(size):
            acc, hits = [0, 0, 0], 0
            for sj in range(ss):
                for si in range(ss):
                    c = color_at((i + (si + 0.5) / ss) * scale, (j + (sj + 0.5) / ss) * scale)
                    if c:
                        hits += 1
                        acc = [a + v for a, v in zip(acc, c)]
            if hits:
                row += bytes(round(a / hits) for a in acc) + bytes([round(255 * hits / ss**2)])
            else:
                row += bytes(4)
        rows.append(bytes(row))
    return png(size, size, b"".join(rows))


def png(w, h, raw):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def svg():
    hexc = lambda c: "#%02x%02x%02x" % c  # noqa: E731
    k = " ".join(f"M {a[0]} {a[1]} L {b[0]} {b[1]}" for a, b in K)
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">
  <title>kernelvisor</title>
  <rect width="64" height="64" rx="{RADIUS}" fill="{hexc(DEEP)}"/>
  <path d="{SHIELD}" fill="{hexc(LIGHT)}"/>
  <path d="{k}" fill="none" stroke="{hexc(DEEP)}" stroke-width="{STROKE}" stroke-linecap="round"/>
</svg>
"""


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for size in (32, 64):
        (OUT / f"logo-{size}x{size}.png").write_bytes(render(size))
    (OUT / "logo-svg.svg").write_text(svg())
