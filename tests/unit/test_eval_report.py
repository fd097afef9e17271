"""The eval result file: the DESIGN.md shape, JSON-safe values, default path."""
import json
import math

from tierserve.eval.report import Report, default_output, load, sibling


def test_report_shape_and_write(tmp_path):
    rep = Report("ppl", {"context": 64}, [{"id": "default", "ppl": 3.5, "bad": math.nan}], {"ppl": 3.5})
    path = rep.write(tmp_path / "sub" / "r.json")
    data = load(path)
    assert set(data) == {"meta", "rows", "summary"}
    meta = data["meta"]
    assert {"tool", "subcommand", "settings", "versions", "device", "date"} <= set(meta)
    assert meta["tool"] == "tierserve eval" and meta["subcommand"] == "ppl" and meta["settings"] == {"context": 64}
    assert meta["versions"]["tierserve"] and meta["versions"]["python"] and meta["device"]["kind"] == "local"
    assert data["rows"] == [{"id": "default", "ppl": 3.5, "bad": None}]          # NaN -> null: strict JSON
    json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_default_output_and_sibling(tmp_path):
    p = default_output("svg", tmp_path)
    assert p.parent == tmp_path and p.name.startswith("eval-svg-") and p.suffix == ".json"
    assert sibling(tmp_path / "x.json", "-contact.png") == tmp_path / "x-contact.png"
