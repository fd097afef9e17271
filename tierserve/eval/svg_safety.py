"""Safe parsing of untrusted SVG (model output or ``--svgs`` files) before anything renders it.

Rejected: documents over the byte limit, DTDs and entities (XXE, billion laughs), processing instructions
(xml-stylesheet) and XInclude, ``<script>``, ``<foreignObject>`` and other embedders, event-handler (``on*``)
attributes, any reference that leaves the document (``href``/``src`` not starting with ``#``, CSS ``url()``
to anything but ``#id``, ``@import``), ``data:`` and ``javascript:`` URIs, absurd canvas sizes or aspect
ratios, huge path data, too many or too deeply nested elements. Parsing uses defusedxml with DTDs, entities
and external references forbidden, so the XML layer refuses them too.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SVG_NS = "http://www.w3.org/2000/svg"
MAX_BYTES = 1_000_000
MAX_ELEMENTS = 20_000
MAX_DEPTH = 64
MAX_ATTR_CHARS = 100_000            # one attribute value (path data, points)
MAX_DIM_PX = 10_000.0               # width / height of the canvas
MAX_ASPECT = 50.0
BANNED_TAGS = {"script", "foreignobject", "iframe", "embed", "object", "handler", "listener", "audio", "video",
               "canvas", "html", "body", "include"}
URL_ATTRS = {"href", "src", "action", "formaction", "background", "lowsrc", "ping"}
_UNITS = {"": 1.0, "px": 1.0, "pt": 4 / 3, "pc": 16.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0,
          "em": 16.0, "ex": 8.0}
_LENGTH = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Z%]*)\s*$")
_CSS_URL = re.compile(r"url\s*\(\s*['\"]?\s*([^'\")\s]*)", re.IGNORECASE)
_BAD_SCHEME = re.compile(r"^\s*(?:javascript|vbscript|data)\s*:", re.IGNORECASE)


class UnsafeSvg(ValueError):
    pass


@dataclass
class SvgInfo:
    elements: int
    depth: int
    tags: Counter = field(default_factory=Counter)
    width: float | None = None       # canvas size in px, from width/height or the viewBox
    height: float | None = None


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1].rsplit(":", 1)[-1].lower()


def _length(value: str | None) -> float | None:
    """A CSS length in px; None for percentages, missing or unparsable values."""
    if value is None:
        return None
    m = _LENGTH.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        return None
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _check_text_level(text: str) -> None:
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise UnsafeSvg(f"too large: more than {MAX_BYTES:,} bytes")
    low = text.lower()
    if "<!doctype" in low or "<!entity" in low:
        raise UnsafeSvg("DTD or entity declaration")
    for m in re.finditer(r"<\?([a-zA-Z0-9_:.-]*)", text):
        if m.group(1).lower() != "xml" or text[:m.start()].strip("\ufeff \t\r\n"):   # only a leading <?xml ...?>
            raise UnsafeSvg(f"processing instruction <?{m.group(1)}")
    if "xinclude" in low:
        raise UnsafeSvg("XInclude")


def _check_css(css: str, where: str) -> None:
    low = css.lower()
    if "@import" in low or "expression(" in low or "javascript:" in low or "behavior:" in low:
        raise UnsafeSvg(f"unsafe CSS in {where}")
    for target in _CSS_URL.findall(css):
        if target and not target.startswith("#"):
            raise UnsafeSvg(f"external url() in {where}: {target[:60]!r}")


def _check_element(el: Any, tag: str) -> None:
    if tag in BANNED_TAGS:
        raise UnsafeSvg(f"<{tag}> element")
    if tag == "style" and el.text:
        _check_css(el.text, "<style>")
    for name, value in el.attrib.items():
        attr = _local(name)
        if attr.startswith("on"):
            raise UnsafeSvg(f"event handler attribute {attr}=")
        if len(value) > MAX_ATTR_CHARS:
            raise UnsafeSvg(f"attribute {attr} of <{tag}> has {len(value):,} characters (limit {MAX_ATTR_CHARS:,})")
        if attr in URL_ATTRS and not value.strip().startswith("#"):
            raise UnsafeSvg(f"external reference {attr}={value[:60]!r}")
        if _BAD_SCHEME.match(value) and attr not in ("d", "points"):
            raise UnsafeSvg(f"URI scheme in {attr}={value[:60]!r}")
        if attr == "style" or "url(" in value.lower():
            _check_css(value, f"{attr}= of <{tag}>")


def _canvas(root: Any) -> tuple[float | None, float | None]:
    w, h = _length(root.get("width")), _length(root.get("height"))
    vb = root.get("viewBox")
    if vb:
        try:
            _, _, vw, vh = (float(x) for x in re.split(r"[\s,]+", vb.strip()))
        except ValueError:
            raise UnsafeSvg(f"bad viewBox {vb[:60]!r}") from None
        if vw <= 0 or vh <= 0:
            raise UnsafeSvg(f"bad viewBox {vb[:60]!r}")
        w = w if w is not None else (h * vw / vh if h is not None else vw)
        h = h if h is not None else w * vh / vw
    return w, h


def check_svg(text: str) -> tuple[Any, SvgInfo]:
    """Parse ``text`` safely; returns ``(root element, info)`` or raises ``UnsafeSvg`` / ``ValueError``."""
    from xml.etree.ElementTree import ParseError

    import defusedxml.ElementTree as DET
    from defusedxml import DefusedXmlException

    _check_text_level(text)
    try:
        root = DET.fromstring(text, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as e:
        raise UnsafeSvg(f"forbidden XML construct ({type(e).__name__})") from None
    except (ParseError, ValueError, TypeError) as e:      # not well-formed XML
        raise ValueError(f"not well-formed XML: {str(e)[:120]}") from None
    if _local(root.tag) != "svg":
        raise ValueError(f"root element is <{_local(root.tag)}>, not <svg>")
    if "}" in root.tag and root.tag[1:].split("}")[0] != SVG_NS:
        raise ValueError(f"root element is not in the SVG namespace: {root.tag[:80]}")
    info = SvgInfo(0, 0)
    stack = [(root, 1)]
    while stack:
        el, depth = stack.pop()
        if not isinstance(el.tag, str):
            continue                     # comments
        tag = _local(el.tag)
        info.elements += 1
        info.depth = max(info.depth, depth)
        info.tags[tag] += 1
        if info.elements > MAX_ELEMENTS:
            raise UnsafeSvg(f"more than {MAX_ELEMENTS:,} elements")
        if depth > MAX_DEPTH:
            raise UnsafeSvg(f"elements nested deeper than {MAX_DEPTH}")
        _check_element(el, tag)
        stack.extend((child, depth + 1) for child in el)
    w, h = _canvas(root)
    for name, v in (("width", w), ("height", h)):
        if v is not None and not (0 < v <= MAX_DIM_PX):
            raise UnsafeSvg(f"absurd {name}: {v:g} px (allowed (0, {MAX_DIM_PX:g}])")
    if w and h and max(w / h, h / w) > MAX_ASPECT:
        raise UnsafeSvg(f"absurd aspect ratio {w:g}x{h:g}")
    info.width, info.height = w, h
    return root, info
