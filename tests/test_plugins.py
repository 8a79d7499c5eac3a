"""Plug-ins: user modules named with --plugin, installed packages found through entry points."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import mmrobust.plugins as plugins
from mmrobust.cli import main
from mmrobust.errors import ConfigError
from mmrobust.registry import Registry

ENCODER_PLUGIN = '''
import math
from torch import nn
from mmrobust.models.encoders import ENCODERS

@ENCODERS.register("{name}")
class GeluMLP(nn.Module):
    """A GELU MLP with its own forward."""

    def __init__(self, spec, feature_dim=128):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(math.prod(spec.shape), 32), nn.Linear(32, feature_dim)
        self.out_dim = feature_dim

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x.flatten(1))))
'''


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for plug-in modules; imported modules are forgotten afterwards."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        if name.startswith("mmr_test_"):
            del sys.modules[name]


def test_plugin_flag_registers_an_encoder_for_every_command(plugin_dir: Path, capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:  # fmt: skip
    (plugin_dir / "mmr_test_enc.py").write_text(ENCODER_PLUGIN.format(name="mmr-test-gelu"))
    assert main(["list", "encoders"]) == 0
    assert "mmr-test-gelu" not in capsys.readouterr().out
    assert main(["list", "encoders", "--plugin", "mmr_test_enc"]) == 0
    assert "  mmr-test-gelu: A GELU MLP with its own forward." in capsys.readouterr().out
    out = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--data-opt", "n_train=64", "--data-opt", "n_val=32", "--data-opt",
            "n_test=32", "--epochs", "1", "--no-progress", "--set", "model.encoders.strong=mmr-test-gelu",
            "--plugin", "mmr_test_enc", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["plugins"] == ["mmr_test_enc"]


def test_bad_plugins_are_one_line_errors(plugin_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (plugin_dir / "mmr_test_broken.py").write_text("raise RuntimeError('boom')\n")
    for module, message in (
        ("mmr_test_nosuch", "--plugin 'mmr_test_nosuch': cannot import it (No module named 'mmr_test_nosuch')"),
        ("mmr_test_broken", "--plugin 'mmr_test_broken': importing it raised RuntimeError: boom"),
        ("not a module", "--plugin: 'not a module' is not a module name like 'mypkg.plugin'"),
    ):
        assert main(["list", "methods", "--plugin", module]) == 2
        err = capsys.readouterr().err
        assert err == f"mmrobust: error: {message}\n"


def test_python_callers_read_python_words(plugin_dir: Path) -> None:
    with pytest.raises(ConfigError, match="^plugin 'mmr_test_nosuch': cannot import it") as info:
        plugins.import_plugin("mmr_test_nosuch")
    assert info.value.param == "plugin"


def test_registering_the_same_definition_twice_is_a_no_op() -> None:
    reg: Registry[type] = Registry("thing")

    class A:
        pass

    reg.register("a")(A)
    reg.register("a")(A)  # the same object
    A2 = type("A", (), {"__module__": A.__module__, "__qualname__": A.__qualname__})
    reg.register("a")(A2)  # the same definition from a module imported again
    assert reg.get("a") is A2 and A2.name == "a"  # type: ignore[attr-defined]

    class B:
        pass

    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        reg.register("a")(B)


def _install_fake_distribution(site: Path, entry_points: dict[str, str]) -> None:
    info = site / "mmr_test_dist-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mmr-test-dist\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[mmrobust.plugins]\n{lines}\n")


def test_installed_plugins_load_on_a_registry_miss_and_a_broken_one_only_warns(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmrobust.models.encoders import ENCODERS

    (plugin_dir / "mmr_test_installed.py").write_text(ENCODER_PLUGIN.format(name="mmr-test-installed"))
    _install_fake_distribution(plugin_dir, {"good": "mmr_test_installed", "bad": "mmr_test_missing_module"})
    monkeypatch.setattr(plugins, "_installed_loaded", False)
    assert "mmr_test_installed" not in sys.modules
    with pytest.warns(UserWarning, match="plug-in 'bad' .* failed to import and is skipped"):
        cls = ENCODERS.get("mmr-test-installed")  # a miss: installed plug-ins are imported, then found
    assert cls.__module__ == "mmr_test_installed"
    with pytest.raises(ConfigError, match="unknown encoder 'nope'"):
        ENCODERS.get("nope")  # loaded once: a second miss does not import again


def test_load_object_is_the_one_module_colon_name_importer(plugin_dir: Path) -> None:
    (plugin_dir / "mmr_test_obj.py").write_text(
        textwrap.dedent("""
        class Box:
            @staticmethod
            def make():
                return 42
    """)
    )
    assert plugins.load_object("mmr_test_obj:Box.make")() == 42
    with pytest.raises(ConfigError, match="has no 'nothing'"):
        plugins.load_object("mmr_test_obj:nothing", "factory")
    with pytest.raises(ConfigError, match="must look like MODULE:NAME"):
        plugins.load_object("mmr_test_obj", "factory")
