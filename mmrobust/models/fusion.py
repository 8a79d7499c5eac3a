"""The late-fusion model: one encoder per modality, an additive fusion head."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from mmrobust.data.base import Batch, DatasetMeta
from mmrobust.errors import ConfigError, DataError
from mmrobust.models.encoders import build_encoder
from mmrobust.models.heads import HEADS, ConcatHead, FusionHead
from mmrobust.models.lipschitz import lipschitz_encoder
from mmrobust.models.memory import SparseCodingMemory
from mmrobust.models.transform import build_transforms, encoder_spec
from mmrobust.options import check_range, check_types
from mmrobust.plugins import load_object

#: ``model.factory``: ``MODULE:NAME`` (``NAME`` may be dotted)
_FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass
class ModelConfig:
    """How to build a model for a dataset. ``encoders`` overrides the default per modality;
    ``lipschitz_encoders`` picks the 1-Lipschitz encoder of each modality's kind as the default."""

    head: str = "concat"
    feature_dim: int = 128
    encoders: dict[str, str] = field(default_factory=dict)
    # set by training methods that deploy extra modules (saved with the weights, rebuilt by load_run)
    aux_heads: bool = False  # one linear classifier per modality on its features (Gradient Blending)
    feature_memory: int = 0  # clean features per modality in a sparse-coding memory (MSEFM); 0 = none
    #: 1-Lipschitz encoders by construction (mmrobust.models.lipschitz) for modalities without an override
    lipschitz_encoders: bool = False
    #: ``MODULE:NAME`` of a function that builds the whole model (``NAME(meta)`` or ``NAME()``): a
    #: :class:`LateFusionModel` or any ``dict -> logits`` module; ``""``: built from the fields above.
    #: Written by ``mmrobust wrap``; its module is recorded as a plug-in of the run (docs/your-model.md)
    factory: str = ""

    def __post_init__(self) -> None:
        check_types(self, "model")
        check_range(self.feature_dim, 1, 65_536, "model.feature_dim")
        check_range(self.feature_memory, 0, 10**7, "model.feature_memory")
        for name, enc in self.encoders.items():
            if not isinstance(enc, str):
                raise ConfigError(f"option 'model.encoders.{name}' must be an encoder name, got {enc!r}")
        if self.factory:
            if not _FACTORY.fullmatch(self.factory.strip()):
                raise ConfigError(
                    f"option 'model.factory' must look like MODULE:NAME (e.g. mypkg.models:build), got {self.factory!r}",
                    param="model.factory",
                )
            built_in = [
                k for k in ("encoders", "lipschitz_encoders", "aux_heads", "feature_memory") if getattr(self, k)
            ]
            if built_in:
                raise ConfigError(
                    f"option 'model.factory' builds the whole model; 'model.{built_in[0]}' does not apply to it",
                    param="model.factory",
                )


class LateFusionModel(nn.Module):
    """``logits = head({m: encoder_m(t_m(x_m))})`` for any number of modalities.

    ``t_m`` is the modality's input transform (``transforms[m]``: standardisation or a waveform front
    end, see :mod:`mmrobust.models.transform`), the identity for modalities without one: inputs are
    the data as stored, in their natural units.

    ``forward(inputs)`` returns logits. ``forward(inputs, return_all=True)`` returns a dict with
    ``logits``, ``features`` and per-modality ``scores`` in one pass (plus ``aux_logits``, one
    uni-modal classifier per modality, when the model has auxiliary heads); training strategies use
    it so that everything goes through ``forward`` (and therefore through a DDP wrapper). Auxiliary
    heads never enter ``logits``: the deployed prediction is the fusion head's.
    """

    def __init__(
        self,
        encoders: dict[str, nn.Module],
        head: FusionHead,
        num_classes: int,
        aux: dict[str, nn.Module] | None = None,
        transforms: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.num_classes = num_classes
        self.aux = nn.ModuleDict(aux) if aux else None
        self.transforms: nn.ModuleDict | None = None
        self.set_transforms(transforms)

    def set_transforms(self, transforms: dict[str, nn.Module] | None) -> None:
        """Install (or with ``None``/``{}`` remove) the input transforms; ``load_run`` uses it for legacy runs."""
        unknown = set(transforms or {}) - set(self.encoders)
        if unknown:
            raise ConfigError(
                f"input transform for unknown modality {sorted(unknown)}; the model has {self.modalities}"
            )
        # only modalities that have one: a model without transforms keeps its old state_dict
        self.transforms = nn.ModuleDict(transforms) if transforms else None

    def transform(self, inputs: Batch) -> Batch:
        """The encoders' inputs: each stored modality through its input transform (if any)."""
        if self.transforms is None:
            return inputs
        return {m: self.transforms[m](x) if m in self.transforms else x for m, x in inputs.items()}

    def input_encoder(self, name: str) -> nn.Module:
        """``encoders[name]`` preceded by its input transform: the map from stored values to features.

        What a certifier must bound (it shares the model's modules); the bare encoder when the
        modality has no transform.
        """
        enc = self.encoders[name]
        if self.transforms is None or name not in self.transforms:
            return enc
        return nn.Sequential(self.transforms[name], enc)

    @classmethod
    def from_modules(
        cls,
        encoders: dict[str, nn.Module],
        head: nn.Module,
        meta: DatasetMeta | None = None,
        *,
        feature_dims: dict[str, int] | None = None,
        transforms: dict[str, nn.Module] | None = None,
    ) -> LateFusionModel:
        """A :class:`LateFusionModel` from trained modules: ``logits = head({m: encoders[m](x_m)})``.

        ``encoders``: one module per modality mapping that modality's batch (as stored, or as
        ``transforms[m]`` leaves it) to ``(B, d_m)`` features; they are used as they are (shared, not
        copied). ``head``: an ``nn.Linear(sum_m d_m, K)`` over the features concatenated in the order
        of ``encoders`` (it becomes a :class:`~mmrobust.models.heads.ConcatHead`, weights copied
        exactly) or a :class:`~mmrobust.models.heads.FusionHead`. ``meta`` (optional) checks the
        modalities and classes and finds each ``d_m`` by one forward pass of zeros; without it the
        dimensions come from ``feature_dims``, an encoder's ``out_dim`` or, for one modality, the head.

        The result is additive late fusion, so every attack and certifier applies; the sound ones
        (``sound``, ``crown``) also need encoders made of layers they can bound (docs/your-model.md).
        """
        encoders = dict(encoders)
        if not encoders or not all(isinstance(e, nn.Module) for e in encoders.values()):
            raise ConfigError("from_modules: encoders must map each modality name to an nn.Module", param="encoders")
        if meta is not None and sorted(encoders) != sorted(meta.modality_names):
            raise ConfigError(
                f"from_modules: encoders for {sorted(encoders)}, but the dataset has modalities {meta.modality_names}",
                param="encoders",
            )
        dims = _feature_dims(encoders, head, meta, feature_dims or {}, transforms or {})
        if isinstance(head, FusionHead):
            fusion = head
            num_classes = int(head.bias.shape[0])
        elif isinstance(head, nn.Linear):
            if head.in_features != sum(dims.values()):
                raise ConfigError(
                    f"from_modules: the head takes {head.in_features} features, the encoders give "
                    f"{sum(dims.values())} ({', '.join(f'{m} {d}' for m, d in dims.items())})",
                    param="head",
                )
            num_classes = head.out_features
            concat = ConcatHead(dims, num_classes)
            w = head.weight.detach()
            with torch.no_grad():
                start = 0
                for m, d in dims.items():
                    cast(nn.Linear, concat.linears[m]).weight.copy_(w[:, start : start + d])
                    start += d
                concat.bias.copy_(head.bias.detach() if head.bias is not None else torch.zeros(num_classes))
            fusion = concat.to(device=w.device, dtype=w.dtype)
        else:
            raise ConfigError(
                f"from_modules: head must be an nn.Linear over the concatenated features or a FusionHead, got "
                f"{type(head).__name__}; a model with another head is not additive late fusion: use it as a "
                "dict -> logits module (every attack and the empirical estimate apply)",
                param="head",
            )
        if meta is not None and num_classes != meta.num_classes:
            raise ConfigError(
                f"from_modules: the head has {num_classes} outputs, the dataset {meta.num_classes} classes",
                param="head",
            )
        return cls(encoders, cast(FusionHead, fusion), num_classes, transforms=transforms)

    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    def encode(self, inputs: Batch) -> dict[str, torch.Tensor]:
        missing = [m for m in self.encoders if m not in inputs]
        if missing:
            raise DataError(f"batch lacks modality {missing}; the model expects {self.modalities}")
        if self.transforms is not None:
            inputs = self.transform({m: inputs[m] for m in self.encoders})
        return {m: enc(inputs[m]) for m, enc in self.encoders.items()}

    def forward(self, inputs: Batch, return_all: bool = False) -> torch.Tensor | dict[str, Any]:
        feats = self.encode(inputs)
        if not return_all:
            return self.head(feats)
        scores = self.head.scores(feats)
        out = {"logits": self.head.combine(scores), "features": feats, "scores": scores}
        if self.aux is not None:
            out["aux_logits"] = {m: head(feats[m]) for m, head in self.aux.items()}
        return out


def build_model(meta: DatasetMeta, cfg: ModelConfig | None = None) -> LateFusionModel:
    """Build a :class:`LateFusionModel` for ``meta`` from a :class:`ModelConfig`.

    With ``cfg.factory`` the user's factory builds the model (:func:`model_from_factory`): it may be
    any ``dict -> logits`` module, which callers that need late fusion check with ``isinstance``.
    """
    cfg = cfg or ModelConfig()
    if cfg.factory:
        return cast(LateFusionModel, model_from_factory(cfg.factory, meta))
    unknown = set(cfg.encoders) - set(meta.modality_names)
    if unknown:
        raise ConfigError(f"encoder override for unknown modality {sorted(unknown)}; dataset has {meta.modality_names}")
    if cfg.feature_dim < 1:
        raise ConfigError(f"feature_dim must be >= 1, got {cfg.feature_dim}")
    specs = {s.name: encoder_spec(meta, s.name) for s in meta.modalities}  # a waveform's encoder reads features
    names = {
        m: cfg.encoders.get(m) or (lipschitz_encoder(s) if cfg.lipschitz_encoders else None) for m, s in specs.items()
    }
    encoders = {m: build_encoder(s, names[m], cfg.feature_dim) for m, s in specs.items()}
    dims = {m: int(cast(int, e.out_dim)) for m, e in encoders.items()}
    if cfg.feature_memory:
        encoders = {m: SparseCodingMemory(e, cfg.feature_memory) for m, e in encoders.items()}
    head = cast(FusionHead, HEADS.get(cfg.head)(dims, meta.num_classes))
    aux: dict[str, nn.Module] | None = (
        {m: nn.Linear(d, meta.num_classes) for m, d in dims.items()} if cfg.aux_heads else None
    )
    return LateFusionModel(encoders, head, meta.num_classes, aux, build_transforms(meta))


def _feature_dims(
    encoders: dict[str, nn.Module],
    head: nn.Module,
    meta: DatasetMeta | None,
    given: dict[str, int],
    transforms: dict[str, nn.Module],
) -> dict[str, int]:
    """Each encoder's feature dimension, in the order of ``encoders`` (see :meth:`LateFusionModel.from_modules`)."""
    dims: dict[str, int] = {}
    for m, enc in encoders.items():
        out_dim = getattr(enc, "out_dim", None)
        if m in given:
            dims[m] = int(given[m])
        elif isinstance(out_dim, int) and not isinstance(out_dim, bool):
            dims[m] = out_dim
        elif meta is not None:
            param = next((p for p in enc.parameters()), None)
            x = torch.zeros(1, *meta.spec(m).shape, device=param.device if param is not None else None)
            with torch.no_grad():
                was = enc.training
                enc.eval()
                try:
                    feats = enc(transforms[m](x) if m in transforms else x)
                except Exception as exc:
                    raise ConfigError(
                        f"from_modules: encoder '{m}' fails on a batch of shape {tuple(x.shape)}: "
                        f"{type(exc).__name__}: {exc}",
                        param="encoders",
                    ) from None
                finally:
                    enc.train(was)
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
                raise ConfigError(
                    f"from_modules: encoder '{m}' must return (batch, features), got "
                    f"{tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__}",
                    param="encoders",
                )
            dims[m] = int(feats.shape[1])
        elif len(encoders) == 1 and isinstance(head, nn.Linear):
            dims[m] = head.in_features
        elif isinstance(head, FusionHead):
            dims[m] = int(head.modality_weight(m).shape[1])
        else:
            raise ConfigError(
                f"from_modules: cannot tell the feature dimension of encoder '{m}'; pass meta or feature_dims",
                param="feature_dims",
            )
    return dims


class WrappedModel(nn.Module):
    """A user's ``dict -> logits`` module that is not a :class:`LateFusionModel`, with the attributes
    mmrobust's commands read (``modalities``, ``num_classes``). Its weights are ``net``'s, under the
    prefix ``net.`` in a run's ``model.safetensors``. Not additive late fusion: every attack and the
    model-agnostic ``empirical`` estimate apply, the sound certifiers refuse it."""

    def __init__(self, net: nn.Module, modalities: list[str], num_classes: int) -> None:
        super().__init__()
        self.net = net
        self._modalities = list(modalities)
        self.num_classes = num_classes

    @property
    def modalities(self) -> list[str]:
        return list(self._modalities)

    def forward(self, inputs: Batch) -> torch.Tensor:
        missing = [m for m in self._modalities if m not in inputs]
        if missing:
            raise DataError(f"batch lacks modality {missing}; the model expects {self._modalities}")
        return cast(torch.Tensor, self.net(inputs))


def model_from_factory(spec: str, meta: DatasetMeta) -> nn.Module:
    """The model built by the user's factory ``spec`` (``MODULE:NAME``, imported as a plug-in).

    The factory is called as ``NAME(meta)`` if it takes an argument, else ``NAME()``; it returns a
    :class:`LateFusionModel` (checked against ``meta``) or any module mapping ``{modality: batch}``
    to ``(B, K)`` logits (returned inside a :class:`WrappedModel`). Its weights come from the run
    (``model.safetensors``), not the factory.
    """
    factory = load_object(spec, "model factory", "model.factory")
    if not callable(factory):
        raise ConfigError(f"model factory '{spec}' is not callable", param="model.factory")
    try:
        sig = inspect.signature(factory)
        args: tuple[Any, ...] = (meta,)
        try:
            sig.bind(meta)
        except TypeError:
            sig.bind()
            args = ()
    except (TypeError, ValueError):  # a builtin or a signature that takes neither: try with meta
        args = (meta,)
    try:
        model = factory(*args)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model factory '{spec}' raised {type(exc).__name__}: {exc}", param="model.factory") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory '{spec}' must return an nn.Module (a LateFusionModel or a dict -> logits module), "
            f"got {type(model).__name__}",
            param="model.factory",
        )
    if not isinstance(model, LateFusionModel):
        return WrappedModel(model, meta.modality_names, meta.num_classes)
    if isinstance(model, LateFusionModel):
        if sorted(model.modalities) != sorted(meta.modality_names) or model.num_classes != meta.num_classes:
            raise ConfigError(
                f"model factory '{spec}' built a model for modalities {model.modalities} and {model.num_classes} "
                f"classes; the dataset has {meta.modality_names} and {meta.num_classes}",
                param="model.factory",
            )
    return model
