"""params.yaml is read in one place; a bad value fails with the key, the value and what was expected."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dograph_core.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parent.parent


def _params(tmp_path: Path, **sections) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in sections.items():
        node = raw
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_shipped_params_and_every_preset_are_valid():
    load_params(ROOT / "params.yaml")
    for preset in sorted(p.stem for p in (ROOT / "configs" / "presets").glob("*.yaml")):
        load_params(ROOT / "params.yaml", preset)


def test_unknown_key_names_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(_params(tmp_path, train__stpes=10))
    assert "train.stpes" in str(e.value) and "10" in str(e.value) and "not permitted" in str(e.value)


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(_params(tmp_path, train__batch_size="many"))
    msg = str(e.value)
    assert "train.batch_size" in msg and "'many'" in msg and "integer" in msg


def test_negative_size_names_key_value_and_bound(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(_params(tmp_path, prepare__total_mb=-3))
    msg = str(e.value)
    assert "prepare.total_mb" in msg and "-3" in msg and "greater than 0" in msg


def test_a_misspelt_device_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_params(_params(tmp_path, train__device="gpu"))
    assert "train.device" in str(e.value) and "'gpu' is not a device" in str(e.value)
    for ok in ("auto", "cpu", "cuda", "cuda:3", "mps", "xpu:0"):
        assert load_params(_params(tmp_path, train__device=ok)).train.device == ok


def test_method_listed_but_not_defined(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline names methods \['doremix'\]"):
        load_params(_params(tmp_path, pipeline__methods=["uniform", "doremix"]))


def test_unknown_scale_and_mixer_type_are_named(tmp_path):
    from tasks.params import check_params

    p = load_params(ROOT / "params.yaml", overrides=["pipeline.target_scales=[nano,huge]"])
    with pytest.raises(ConfigError) as e:
        check_params(p)
    assert "pipeline.target_scales[1] = 'huge'" in str(e.value) and "nano" in str(e.value)

    p = load_params(ROOT / "params.yaml", overrides=["methods.odd={type: oddmix}", "pipeline.methods=[odd]"])
    with pytest.raises(ConfigError, match=r"methods.odd.type = 'oddmix': unknown mixer type"):
        check_params(p)

    p = load_params(ROOT / "params.yaml", overrides=["methods.odm={type: odm, nonsense: 1}", "pipeline.methods=[odm]"])
    with pytest.raises(ConfigError, match=r"methods.odm: .*nonsense"):
        check_params(p)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*quick"):
        load_params(ROOT / "params.yaml", "huge")


def test_overrides_are_parsed_as_yaml_and_checked():
    p = load_params(ROOT / "params.yaml", "nano", ["train.steps=7", "pipeline.methods=[uniform]"])
    assert p.train.steps == 7 and p.pipeline.methods == ["uniform"] and p.train.seq_len == 32
    with pytest.raises(ConfigError, match="expected key=value"):
        load_params(ROOT / "params.yaml", overrides=["train.steps"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_params(ROOT / "params.yaml", overrides=["train.steps=-1"])


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
