"""Every certifier side by side: plot styles by kind of certificate, and `certify --lipschitz a,b`."""

import json

from mmrobust.report.certify_plots import certificate_kind, curve_styles
from tests.conftest import tiny_config


def _entry(name: str, kind: str | None, alpha: float | None = None, guarantee: bool = False) -> dict:
    e = {"estimator": name, "guarantee": guarantee, "alpha": alpha,
         "certified_accuracy": {"radii": [0, 1], "joint": [1, 0], "unimodal": {}}}  # fmt: skip
    if kind is not None:
        e["guarantee_kind"] = kind
    return e


def test_line_style_says_what_kind_of_certificate_a_curve_is():
    results = {
        "A crown": _entry("crown", "sound", guarantee=True),
        "A smoothing": _entry("smoothing", "probabilistic", alpha=0.001),
        "A empirical": _entry("empirical", "estimate"),
        "B crown": _entry("crown", "sound", guarantee=True),
        "old sound": _entry("sound", None, guarantee=True),  # an older certify.json: only the flag
        "old empirical": _entry("empirical", None),
    }
    groups = {"A crown": "A", "A smoothing": "A", "A empirical": "A", "B crown": "B"}
    st = curve_styles(results, groups)
    assert [st[k]["ls"] for k in results] == ["-", "--", ":", "-", "-", ":"]
    assert "probabilistic, alpha=0.001" in st["A smoothing"]["label"]
    assert "estimate" in st["A empirical"]["label"] and "estimate" not in st["A crown"]["label"]
    # one colour per model, one marker per certifier
    assert st["A crown"]["color"] == st["A smoothing"]["color"] == st["A empirical"]["color"]
    assert st["A crown"]["color"] != st["B crown"]["color"]
    assert st["A crown"]["marker"] == st["B crown"]["marker"] != st["A smoothing"]["marker"]
    assert certificate_kind(results["old sound"]) == "sound"


def test_cli_certify_several_certifiers_side_by_side(tmp_path, capsys):
    from mmrobust.cli import main
    from mmrobust.training import train

    out = tmp_path / "run"
    train(tiny_config(epochs=2), out=out)
    argv = ["certify", str(out), "--lipschitz", "sound,empirical,smoothing", "--radii", "0,0.1",
            "--cert-opt", "empirical:max_samples=20", "--cert-opt", "smoothing:n=20", "--cert-opt", "smoothing:n0=5",
            "--cert-opt", "smoothing:unimodal=false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "GUARANTEE" in printed and "ESTIMATE" in printed and "PROBABILISTIC" in printed
    doc = json.loads((out / "certify.json").read_text())
    est = doc["estimators"]
    assert set(est) == {"sound", "empirical", "smoothing"}
    assert est["empirical"]["options"]["max_samples"] == 20 and est["smoothing"]["options"]["n"] == 20
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    # an option no chosen certifier has is still a one-line error, before any work
    assert main(["certify", str(out), "--lipschitz", "sound,crown", "--cert-opt", "crown:stepz=3"]) == 2
    assert "certifier 'crown': unknown option(s) ['stepz']" in capsys.readouterr().err
