"""A mixer from another package (entry-point group ``dograph.mixers``): found, validated, keyed by its code."""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dograph_core.config import ConfigError, load_params, validate
from dograph_core.mixers import REGISTRY, MixerContext, MixerError, build_mixer, plugin_source_hash, plugins, registry
from tasks.params import check_params

MODULE = '''
"""A plug-in mixer: a fixed share on the first domain, the rest spread evenly."""
import numpy as np
from pydantic import Field

from dograph_core.mixers.base import Mixer, MixerConfig


class FirstShareConfig(MixerConfig):
    share: float = Field(0.5, gt=0, lt=1)


class FirstShare(Mixer):
    name = "first_share"
    Config = FirstShareConfig

    def initial_weights(self):
        n = len(self.ctx.domains)
        return np.r_[self.cfg.share, np.full(n - 1, (1 - self.cfg.share) / (n - 1))]
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed distribution (a module and its dist-info with entry points) on sys.path."""
    (tmp_path / "dg_plugin_mod.py").write_text(textwrap.dedent(MODULE))
    info = tmp_path / "dg_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dg-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dograph.mixers]\nfirst_share = dg_plugin_mod:FirstShare\n"
                                           "uniform = dg_plugin_mod:FirstShare\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    plugins.cache_clear()  # installed while this process runs: read the entry points again
    yield tmp_path
    sys.modules.pop("dg_plugin_mod", None)
    plugins.cache_clear()


def _ctx() -> MixerContext:
    return MixerContext(domains=["a", "b", "c"], natural=np.array([0.5, 0.3, 0.2]), total_steps=10, seq_len=8,
                        vocab_size=10)


def test_an_installed_plugin_is_a_mixer_type_with_its_own_validated_params(plugin, caplog):
    assert "first_share" not in REGISTRY and registry()["first_share"] == "dg_plugin_mod:FirstShare"
    m = build_mixer("first_share", {"share": 0.6}, _ctx())
    assert np.allclose(m.weights, [0.6, 0.2, 0.2])
    with pytest.raises(MixerError, match="share"):
        build_mixer("first_share", {"share": 1.5}, _ctx())
    # a plug-in cannot take a built-in's name: the built-in stays, and the log says why
    assert registry()["uniform"] == REGISTRY["uniform"] and "is a built-in mixer type" in caplog.text
    assert type(build_mixer("uniform", {}, _ctx())).__name__ == "UniformMixer"


def test_params_naming_a_plugin_pass_the_check_and_an_absent_one_is_named(plugin):
    raw = load_params(Path(__file__).resolve().parent.parent / "params.yaml").model_dump()
    raw["methods"]["mine"] = {"type": "first_share", "share": 0.4}
    raw["pipeline"]["methods"] = ["uniform", "mine"]
    check_params(validate(raw), methods=["mine"])
    raw["methods"]["mine"] = {"type": "first_shaer"}
    with pytest.raises(ConfigError, match=r"'first_shaer': unknown mixer type; expected one of \[.*'first_share'"):
        check_params(validate(raw), methods=["mine"])


def test_a_plugins_source_is_part_of_its_units_key(plugin):
    from tasks.steps import _plugin

    assert plugin_source_hash("uniform") is None and _plugin("uniform") == {}  # built-in keys unchanged
    before = _plugin("first_share")["plugin"]
    (plugin / "dg_plugin_mod.py").write_text(textwrap.dedent(MODULE) + "\n# a comment changes nothing\n")
    assert _plugin("first_share")["plugin"] == before
    (plugin / "dg_plugin_mod.py").write_text(textwrap.dedent(MODULE).replace("(0.5, gt=0", "(0.4, gt=0"))
    assert _plugin("first_share")["plugin"] != before  # a changed plug-in re-runs what it trained
