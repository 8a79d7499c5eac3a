import re

from mmrobust.data import DataConfig
from mmrobust.demo import DemoConfig, run_demo
from tests.conftest import TINY


def test_demo_writes_a_complete_report(tmp_path):
    cfg = DemoConfig(
        epochs=1, data=DataConfig("synthetic", 0, dict(TINY)), methods=("jt", "crmt-jt"),
        joint_eps=(0.5,), unimodal_eps=(1.0,), attack_steps=2, curve_eps=(0.0, 1.0),
        lipschitz_samples=40, eval_samples=40, progress=False, lipschitz_model=True, lipschitz_epochs=1,
        cert_samples=20, smoothing_options={"n0": 5, "n": 20, "unimodal": False},
        crown_options={"steps": 3, "unimodal": False},
    )  # fmt: skip
    report = run_demo(tmp_path, cfg=cfg)
    text = report.read_text()
    for section in (
        "Clean and missing-modality accuracy",
        "Paper protocol",
        "Robustness curves",
        "Certified robustness",
    ):
        assert f"## {section}" in text
    # the paper-protocol tables come from the benchmark's comparison tables (one column per method)
    assert "### Multi-modal attacks (all modalities jointly)" in text and "| | jt | crmt-jt |" in text.replace(
        "|  |", "| |"
    )
    assert "### Uni-modal attacks and missing modalities" in text and "| strong missing |" in text
    for png in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (tmp_path / png).stat().st_size > 1000, png
    for method in ("jt", "crmt-jt"):
        assert {"model.safetensors", "metrics.json", "eval.json", "certify.json"} <= {
            p.name for p in (tmp_path / method).iterdir()
        }
    # both estimators are named, and only the sound one is called a guarantee
    assert "| jt (sound) | yes | 120 |" in text and "| jt (empirical) | no (estimate) | 120 |" in text
    # every certifier side by side, each labelled with what kind of statement it makes
    assert "| jt (smoothing, first 20) | probabilistic (alpha=0.001) | 20 |" in text
    assert "| crmt-jt-lip (crown, first 20) | yes | 20 |" in text
    assert (tmp_path / "crmt-jt-lip" / "config.json").read_text().count('"lipschitz_encoders": true') == 1
    assert not list(tmp_path.rglob("*.tmp"))
