"""Mixed precision, memory layout, the fp32-only certification and the GPU path (see docs/scale.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmrobust import runs
from mmrobust.attacks import PGDL2
from mmrobust.certify.runner import certify_model, certify_run
from mmrobust.cli import main
from mmrobust.config import TrainConfig
from mmrobust.data.base import DatasetMeta, ModalitySpec
from mmrobust.errors import ConfigError
from mmrobust.models.fusion import ModelConfig, build_model
from mmrobust.precision import model_precision
from mmrobust.runs import load_run
from mmrobust.training import distributed
from mmrobust.training.engine import Trainer
from tests.conftest import tiny_config


def _record_dtypes(model: nn.Module, kind: type[nn.Module] = nn.Linear) -> tuple[list[torch.dtype], list]:
    """Output dtypes of every ``kind`` layer of ``model`` (and the hook handles)."""
    seen: list[torch.dtype] = []
    handles = [m.register_forward_hook(lambda mod, i, o: seen.append(o.dtype)) for m in model.modules()
               if isinstance(m, kind)]  # fmt: skip
    return seen, handles


def _image_model() -> tuple[nn.Module, DatasetMeta]:
    meta = DatasetMeta(
        "img", [ModalitySpec("image", "image", (3, 16, 16), (0.0, 1.0)), ModalitySpec("video", "video", (2, 3, 8, 8))],
        ["a", "b", "c"],
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(meta, ModelConfig("concat", 16)).eval(), meta


def _image_batch(n: int = 4) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "video": torch.randn(n, 2, 3, 8, 8, generator=g)}, (
        torch.arange(n) % 3
    )


def test_bf16_training_runs_the_forward_in_bf16_and_saves_the_precision(tmp_path):
    cfg = tiny_config(epochs=1)
    cfg.train.precision = "bf16"
    trainer = Trainer(cfg)
    seen, handles = _record_dtypes(trainer.model)
    result = trainer.fit(tmp_path / "run")
    for h in handles:
        h.remove()
    assert torch.bfloat16 in seen  # the training forwards were autocast
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # weights stay fp32
    assert load_run(tmp_path / "run").config.train.precision == "bf16"  # saved beside the run (resume keeps it)
    # the test accuracy recorded at the end is the fp32 model's: evaluation reproduces it exactly
    seen.clear()
    fp32 = Trainer(tiny_config(epochs=1))
    seen, handles = _record_dtypes(fp32.model)
    fp32.fit()
    assert set(seen) == {torch.float32}


def test_fp16_on_cpu_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        TrainConfig(precision="fp16", device="cpu")
    with pytest.raises(ConfigError, match="unknown precision"):
        TrainConfig(precision="int8")
    args = ["train", "--data", "synthetic", "--epochs", "1", "--precision", "fp16", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp16 needs a CUDA device" in err
    assert not (tmp_path / "r").exists()


def test_certify_refuses_low_precision_from_the_cli(tiny_run, capsys):
    before = sorted(p.name for p in tiny_run.iterdir())
    for precision in ("bf16", "fp16"):
        assert main(["certify", str(tiny_run), "--precision", precision]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "certification is always fp32" in err
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # nothing written


def test_certifiers_compute_in_fp32_even_for_a_bf16_run_or_under_autocast(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=1)
    cfg.train.precision = "bf16"
    Trainer(cfg).fit(tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.config.train.precision == "bf16"
    monkeypatch.setattr(runs, "load_run", lambda *a, **k: run)  # so the hooks below see certify_run's model
    seen, handles = _record_dtypes(run.model)
    certify_run(tmp_path / "run", "empirical", {"fit_samples": 16})
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    bundle = run.data()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast around the call is switched off
        certify_model(run.model, run.meta, bundle.test, "empirical", bundle.train, options={"fit_samples": 16})
    for h in handles:
        h.remove()
    assert seen and set(seen) == {torch.float32}
    with pytest.raises(ConfigError, match="float32 weights"):
        certify_model(run.model.to(torch.bfloat16), run.meta, bundle.test, "empirical", bundle.train)


def test_attack_arithmetic_stays_fp32_under_bf16():
    model, meta = _image_model()
    inputs, labels = _image_batch()
    conv_out, handles = _record_dtypes(model, nn.Conv2d)
    grads: list[torch.dtype] = []
    attack = PGDL2(model, 0.5, steps=3, meta=meta, loss="cw")
    inner = attack.loss_and_grad

    def spy(*a, **k):
        loss, grad, logits = inner(*a, **k)
        grads.append(grad.dtype)
        grads.append(logits.dtype)
        return loss, grad, logits

    attack.loss_and_grad = spy  # type: ignore[method-assign]
    with model_precision(model, "bf16", "cpu"):
        adv, logits = attack.perturb(inputs, labels)
        with torch.no_grad():
            out = model(inputs, return_all=True)
    assert all(f.dtype == torch.float32 for f in out["features"].values())  # every output leaves in fp32
    for h in handles:
        h.remove()
    assert torch.bfloat16 in conv_out  # the model's forward did run in bf16
    assert set(grads) == {torch.float32}  # gradients and logits handed to the attack are fp32
    assert logits.dtype == torch.float32 and all(v.dtype == torch.float32 for v in adv.values())
    delta = torch.cat([(adv[m] - inputs[m]).flatten(1) for m in inputs], 1)
    assert float(delta.norm(dim=1).max()) <= 0.5 * (1 + 1e-6)  # projected in fp32: within the budget


def test_channels_last_reaches_the_convolutions_and_keeps_the_outputs():
    model, _ = _image_model()
    inputs, _ = _image_batch()
    layouts: list[bool] = []
    first = [next(m for m in enc.modules() if isinstance(m, nn.Conv2d)) for enc in model.encoders.values()]
    handles = [c.register_forward_pre_hook(
        lambda mod, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        for c in first]  # fmt: skip
    with torch.no_grad():
        ref = model(inputs)
        n = len(layouts)
        with model_precision(model, "fp32", "cpu", channels_last=True):
            out = model(inputs)
    for h in handles:
        h.remove()
    assert n == 2 and not any(layouts[:n]) and all(layouts[n:])  # the video's frames too (folded into the batch)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_nccl_is_chosen_for_cuda_and_binds_the_local_gpu(monkeypatch):
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.ddp_options(torch.device("cuda", 1)) == {"device_ids": [1], "output_device": 1}
    assert distributed.ddp_options(torch.device("cpu")) == {}
    calls: dict[str, object] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.update(backend=backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(device=d))
    info = distributed.setup_distributed(torch.device("cuda", 1))
    assert calls == {"backend": "nccl", "device": torch.device("cuda", 1)}
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    calls.clear()
    distributed.setup_distributed(torch.device("cpu"))
    assert calls == {"backend": "gloo"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine (CPU/GPU agreement not run)")
def test_cpu_and_gpu_training_agree():
    results = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_config(epochs=2)
        cfg.train.device = device
        trainer = Trainer(cfg)
        trainer.fit()
        inputs, _ = trainer.bundle.test.take(slice(0, 64))
        with torch.no_grad():
            results[device] = trainer.model.cpu()(inputs)
    torch.testing.assert_close(results["cuda"], results["cpu"], rtol=1e-3, atol=1e-3)


def test_resume_keeps_the_gradient_scalers_loss_scale(tmp_path, monkeypatch):
    """An fp16 run resumed after an interruption continues at its loss scale, as an uninterrupted run does.

    The scaler here is a CPU GradScaler growing every step (CUDA fp16 uses the same state); a resume
    that started from the initial scale would end with a scale 2^steps_done smaller."""
    import mmrobust.training.checkpoint as checkpoint
    import mmrobust.training.engine as engine

    made: list[torch.amp.GradScaler] = []

    def scaler(precision, device):
        made.append(torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1))
        return made[-1]

    monkeypatch.setattr(engine, "grad_scaler", scaler)
    train = engine.train
    train(tiny_config(epochs=2), out=tmp_path / "full")
    full_scale = made[-1].get_scale()
    assert full_scale > 2.0**4  # the scaler was used and grew

    real_save = checkpoint.save_checkpoint

    def save_then_stop(folder, state):
        real_save(folder, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=2), out=tmp_path / "r")
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    train(tiny_config(epochs=2), out=tmp_path / "r", resume=True)
    assert made[-1].get_scale() == full_scale
