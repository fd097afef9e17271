"""tierserve eval svg: hostile SVGs are rejected (or rendered safely within the time limit) without leaking file
contents; valid SVGs give the right counts; extraction, prompt set, contact sheet and --svgs mode."""
import json
import time

import pytest

from tierserve.eval import svg as S
from tierserve.eval.svg_safety import UnsafeSvg, check_svg

NS = 'xmlns="http://www.w3.org/2000/svg"'
XLINK = 'xmlns:xlink="http://www.w3.org/1999/xlink"'
SECRET = "TOPSECRET-SVG-0042"

VALID = f"""<svg {NS} viewBox="0 0 100 100" width="100" height="100">
  <g fill="black">
    <rect x="0" y="0" width="100" height="50"/>
  </g>
  <circle cx="50" cy="75" r="1" fill="red"/>
  <path d="M 0 0 L 1 1" stroke="blue"/>
</svg>"""


@pytest.fixture()
def secret_file(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text(SECRET)
    return p


def hostile(secret_file):
    laughs = "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    return {
        "xxe": f'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY xxe SYSTEM "file://{secret_file}">]>'
               f'<svg {NS}><text x="0" y="10">&xxe;</text></svg>',
        "billion-laughs": f'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY l0 "ha">{laughs}]>'
                          f'<svg {NS}><text>&l9;</text></svg>',
        "external-href-file": f'<svg {NS} {XLINK}><image xlink:href="file://{secret_file}" width="9" height="9"/>'
                              '</svg>',
        "external-href-http": f'<svg {NS}><image href="http://127.0.0.1:9/x.png" width="10" height="10"/></svg>',
        "use-external": f'<svg {NS}><use href="{secret_file}#frag"/></svg>',
        "data-uri": f'<svg {NS}><image href="data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=" width="9" height="9"/></svg>',
        "script": f'<svg {NS}><script>alert(1)</script><rect width="5" height="5"/></svg>',
        "onload": f'<svg {NS} onload="alert(1)"><rect width="5" height="5"/></svg>',
        "onclick-nested": f'<svg {NS}><g><rect width="5" height="5" onclick="x()"/></g></svg>',
        "foreign-object": f'<svg {NS}><foreignObject width="9" height="9"><p>hi</p></foreignObject></svg>',
        "css-import": f'<svg {NS}><style>@import url(file://{secret_file});</style></svg>',
        "css-url": f'<svg {NS}><rect width="9" height="9" style="fill: url(http://127.0.0.1:9/p)"/></svg>',
        "xml-stylesheet": f'<?xml-stylesheet href="file://{secret_file}"?><svg {NS}/>',
        "javascript-href": f'<svg {NS}><a href="javascript:alert(1)"><rect width="5" height="5"/></a></svg>',
        "absurd-size": f'<svg {NS} width="100000" height="100000"><rect width="10" height="10"/></svg>',
        "absurd-viewbox": f'<svg {NS} viewBox="0 0 1e9 1e9"><rect width="10" height="10"/></svg>',
        "absurd-aspect": f'<svg {NS} width="5000" height="1"><rect width="10" height="10"/></svg>',
        "huge-path": f'<svg {NS}><path d="M0 0{" L1 1" * 40000}"/></svg>',
        "deep-nesting": f'<svg {NS}>' + "<g>" * 200 + "</g>" * 200 + "</svg>",
    }


@pytest.mark.parametrize("name", list(hostile(__import__("pathlib").Path("/x"))))
def test_hostile_svgs_are_rejected_without_leaking(name, secret_file):
    text = hostile(secret_file)[name]
    t0 = time.perf_counter()
    with pytest.raises(UnsafeSvg):
        check_svg(text)
    row, png = S.score_svg(name, text)
    assert time.perf_counter() - t0 < 5
    assert row["valid"] is False and row["renderable"] is False and png is None
    assert SECRET not in json.dumps(row)


def test_xml_layer_refuses_dtds_by_itself(secret_file, monkeypatch):
    """With the text-level pre-check switched off, defusedxml still refuses DTDs and entities."""
    import tierserve.eval.svg_safety as safety

    monkeypatch.setattr(safety, "_check_text_level", lambda text: None)
    for name in ("xxe", "billion-laughs"):
        with pytest.raises(UnsafeSvg, match="forbidden XML construct"):
            check_svg(hostile(secret_file)[name])


def test_tens_of_megabytes_of_path_data_rejected_fast(tmp_path):
    d = tmp_path / "svgs"
    d.mkdir()
    big = f'<svg {NS}><path d="M0 0' + " L1 1" * 4_000_000 + '"/></svg>'     # 20 MB
    (d / "big.svg").write_text(big)
    t0 = time.perf_counter()
    with pytest.raises(UnsafeSvg, match="too large"):
        check_svg(big)
    items = S.read_dir(d)
    rows, _, _ = S.score_all(items)
    assert rows[0]["valid"] is False and "too large" in rows[0]["reason"]
    assert time.perf_counter() - t0 < 10


def test_renderer_process_is_limited():
    """A render that bypasses the checks runs in a separate, limited process: a canvas too large for the memory
    limit, and a time limit, fail there without touching this process."""
    if S.renderer() is None:
        pytest.skip("no SVG renderer installed")
    big = f'<svg {NS} width="100000" height="100000"><rect width="10" height="10"/></svg>'
    png, why = S.render(big, fit="width", size=100000, timeout=20, memory_mb=512)
    assert png is None and "render failed" in why
    png, why = S.render(VALID, timeout=0.01)
    assert png is None and "timed out" in why


def test_valid_svg_counts_and_render():
    _, info = check_svg(VALID)
    assert info.elements == 5 and info.tags["rect"] == 1 and (info.width, info.height) == (100, 100)
    row, png = S.score_svg("v", VALID)
    assert row["valid"] and row["lines"] == VALID.count("\n") + 1 and row["bytes"] == len(VALID.encode())
    assert row["elements"] == 5
    if S.renderer() is None:
        pytest.skip("no SVG renderer installed")
    assert row["renderable"] and png.startswith(b"\x89PNG")
    assert row["nonblank"] == pytest.approx(0.5, abs=0.02)        # the black upper half


def test_benign_attributes_with_urls_are_fine():
    ok = (f'<svg {NS} {XLINK} viewBox="0 0 10 10"><defs><linearGradient id="g"><stop offset="0"/></linearGradient>'
          f'</defs><rect width="10" height="10" fill="url(#g)" style="stroke: url(#g)"/>'
          f'<use xlink:href="#g"/><metadata about="http://example.com/x"/></svg>')
    assert check_svg(ok)[1].elements == 7


@pytest.mark.parametrize("text, want", [
    ("Sure! <svg a='1'><rect/></svg> done", "<svg a='1'><rect/></svg>"),
    ("<SVG><svg><g/></svg></SVG> tail </svg>", "<SVG><svg><g/></svg></SVG>"),
    ("no svg here", None),
    ("<svg><rect/>", None),
])
def test_extract_svg(text, want):
    assert S.extract_svg(text) == want


def test_invalid_xml_is_invalid_not_unsafe():
    row, _ = S.score_svg("bad", f"<svg {NS}><rect></svg>")
    assert not row["valid"] and row["reason"].startswith("invalid")
    row, _ = S.score_svg("html", "<html><body/></html>")
    assert not row["valid"] and "not <svg>" in row["reason"]


def test_prompt_set():
    instruction, prompts = S.load_prompts()
    assert len(prompts) >= 30 and "{subject}" in instruction
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert any("game controller" in p["subject"] for p in prompts)
    assert {"icon", "diagram", "scene"} <= {p["category"] for p in prompts}


def test_generate_with_fake_model_and_contact_sheet(tmp_path):
    from tierserve.eval.client import Completion, Generator, GenParams

    class Fake(Generator):
        def complete(self, prompts, params, chat=False, advance=lambda n: None):
            assert params.stop == ["</svg>"] and prompts[0].endswith(S.SVG_OPEN + "\n")
            return [[Completion('<circle cx="128" cy="128" r="100"/>\n', "stop")],
                    [Completion("<rect", "length")]]

        def score(self, prompts, advance=lambda n: None):
            raise NotImplementedError

    _, prompts = S.load_prompts(limit=2)
    items = S.generate(Fake(), prompts, "Draw {subject}.", GenParams())
    rows, pngs, summary = S.score_all(items)
    assert rows[0]["valid"] and rows[0]["elements"] == 2 and not rows[1]["valid"]
    assert summary["valid_rate"] == 0.5
    sheet = S.contact_sheet(rows, pngs, tmp_path / "sheet.png")
    assert sheet.read_bytes().startswith(b"\x89PNG")


def test_svgs_dir_mode_cli(tmp_path, secret_file):
    from typer.testing import CliRunner

    from tierserve.cli import app

    d = tmp_path / "svgs"
    d.mkdir()
    (d / "good.svg").write_text(VALID)
    (d / "xxe.svg").write_text(hostile(secret_file)["xxe"])
    out = tmp_path / "svg.json"
    res = CliRunner().invoke(app, ["eval", "svg", "--svgs", str(d), "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert SECRET not in text
    rep = json.loads(text)
    assert {r["id"]: r["valid"] for r in rep["rows"]} == {"good.svg": True, "xxe.svg": False}
    assert rep["summary"]["valid_rate"] == 0.5
    assert (tmp_path / "svg-contact.png").is_file()
