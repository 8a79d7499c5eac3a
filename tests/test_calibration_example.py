"""The real avdigits-bind example at a tiny size (needs the optional ``calibration`` extra)."""

from __future__ import annotations

import pytest

from mmrobust.calibration import CalibrationOptions, EvalOptions, calibrate, evaluate
from mmrobust.calibration.examples import missing_extra

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing_extra()),
        reason=f"needs the calibration extra (pip install -e '.[calibration]'); missing: {', '.join(missing_extra())}",
    ),
]


def test_avdigits_bind_builds_an_aligned_bind_model_and_calibrates_it():
    from mmrobust.calibration.examples import avdigits_bind

    setup = avdigits_bind(n_train=32, n_val=16, n_test=40, n_align=400, audio_epochs=4, align_epochs=20)
    assert setup.model.dim("image") == setup.model.dim("audio") == 384  # MiniLM space
    assert setup.meta.spec("audio").valid_range == setup.meta.spec("image").valid_range == (0.0, 1.0)
    opts = EvalOptions(eps=(8 / 255,), steps=3, attacks=("apgd-ce",))
    frozen = evaluate(setup.model, setup.meta, setup.data.test, opts)
    for m in ("audio", "image"):  # the aligned frozen encoders classify zero-shot well above chance (0.1)
        assert frozen.modalities[m].clean.accuracy > 0.3, m
    result = calibrate(
        setup, CalibrationOptions(loss="ce", epochs=1, stage1_epochs=5, attack_steps=2), modalities=["audio"]
    )
    head = result.heads["audio"]
    assert head.trainable_fraction is not None and 0 < head.trainable_fraction < 0.5 and len(head.history) == 2
    after = evaluate(result.model, setup.meta, setup.data.test, opts)
    assert after.modalities["audio"].clean.accuracy > 0.2
