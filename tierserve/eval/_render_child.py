"""Render one SVG (stdin) to PNG (stdout), inside the sandbox started by ``svg.py``; argv: SIZE width|height.

Standard library plus the renderer only (resvg-py, else cairosvg). The SVG has passed ``svg_safety`` already;
the process boundary (time and memory limits, no network, read-only file system) guards against renderer bugs.
"""
import sys


def main():
    size, fit = int(sys.argv[1]), sys.argv[2]
    svg = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    try:
        import resvg_py
        png = resvg_py.svg_to_bytes(svg_string=svg, **{fit: size})
    except ImportError:
        import cairosvg
        png = cairosvg.svg2png(bytestring=svg.encode("utf-8"), unsafe=False,
                               **{"output_" + fit: size})
    sys.stdout.buffer.write(bytes(png))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
