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
            "--cert-opt", "empirical:fit_samples=20", "--cert-opt", "smoothing:n=20", "--cert-opt", "smoothing:n0=5",
            "--cert-opt", "smoothing:unimodal=false"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "GUARANTEE" in printed and "ESTIMATE" in printed and "PROBABILISTIC" in printed
    doc = json.loads((out / "certify.json").read_text())
    est = doc["certifiers"]
    assert set(est) == {"sound", "empirical", "smoothing"}
    assert est["empirical"]["options"]["fit_samples"] == 20 and est["smoothing"]["options"]["n"] == 20
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    # an option no chosen certifier has is still a one-line error, before any work
    assert main(["certify", str(out), "--lipschitz", "sound,crown", "--cert-opt", "crown:stepz=3"]) == 2
    assert "certifier 'crown': unknown option(s) ['stepz']" in capsys.readouterr().err


def test_legend_names_curves_drawn_only_in_the_joint_panel(tmp_path, monkeypatch):
    import matplotlib.axes

    from mmrobust.report.certify_plots import plot_certified_accuracy

    with_unimodal = _entry("sound", "sound", guarantee=True)
    with_unimodal["certified_accuracy"]["unimodal"] = {"a": [1, 0], "b": [1, 0]}
    results = {"m (sound)": with_unimodal, "m (smoothing)": _entry("smoothing", "probabilistic", alpha=0.001)}
    seen: list[list[str]] = []
    real = matplotlib.axes.Axes.legend

    def legend(self, *args, **kwargs):
        leg = real(self, *args, **kwargs)
        seen.append([t.get_text() for t in leg.get_texts()])
        return leg

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    plot_certified_accuracy(results, tmp_path / "p.png")
    assert len(seen) == 1 and any("smoothing" in t for t in seen[0]) and any("sound" in t for t in seen[0])
