"""Bad input fails before any work, with a clear error that names the file or key (issue 16, the "inputs" probes).

Each test reproduces one probe of the reliability review (its number in the test name's docstring):
params files and ``--set``, weights files, token shards and ``corpus.json``, run and method names,
MLflow redaction, ``dograph evaluate`` and ``dograph report``. Everything is built in ``tmp_path``.
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from dograph_core.config import ConfigError, load_params
from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


# -- params files and --set ------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_params_file(tmp_path, capsys):
    """Probe 1: a YAML syntax error is a config error (rc 2) naming the file, not `<unicode string>`."""
    p = tmp_path / "syntax.yaml"
    p.write_text("train:\n  seq_len: [128\n  steps: 3\n")
    rc, err = _cli(capsys, "scales", "--params", str(p))
    assert rc == 2 and str(p) in err and "<unicode string>" not in err


def test_yaml_syntax_error_in_set_names_the_item(capsys):
    """Probe 2: `--set 'train.steps=[1'` names the --set item."""
    rc, err = _cli(capsys, "scales", "--set", "train.steps=[1")
    assert rc == 2 and "train.steps=[1" in err and "--set" in err


@pytest.mark.parametrize("value", ["true", "yes", "1.0"])
def test_a_bool_or_float_is_not_a_step_count(value):
    """Probe 10: `train.steps=true` used to become 1."""
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_params(PARAMS, overrides=[f"train.steps={value}"])


def test_non_utf8_params_file_is_named(tmp_path, capsys):
    """Probe 11."""
    p = tmp_path / "latin1.yaml"
    p.write_bytes(PARAMS.read_bytes() + b"# caf\xe9 \xff\n")
    rc, err = _cli(capsys, "scales", "--params", str(p))
    assert rc == 2 and str(p) in err


def test_python_tag_is_refused_with_a_message(tmp_path, capsys):
    """Probe 13: safe_load refuses the tag; the CLI says so (rc 2) instead of a ConstructorError traceback."""
    p = tmp_path / "tag.yaml"
    p.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    rc, err = _cli(capsys, "scales", "--params", str(p))
    assert rc == 2 and str(p) in err and "python/object/apply" in err


@pytest.mark.parametrize("override, key", [("train.betas=[2,-1]", "train.betas"), ("train.lr=.inf", "train.lr"),
                                           ("train.betas=[0.9,1.0]", "train.betas")])
def test_betas_and_lr_are_checked_at_validation(override, key):
    """Probe 22 (and 21): bad betas or an infinite lr are config errors naming the key, not a training failure."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(PARAMS, overrides=[override])


def _bomb(depth: int, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ",".join(['"lol"'] * width) + "]"]
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * width) + "]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_fails_fast_with_a_short_message(tmp_path):
    """Probe 23: 9**7 strings behind aliases; the old error message alone was 39 MB (a 9**9 bomb: 52 s, MemoryError)."""
    p = tmp_path / "bomb.yaml"
    p.write_text(_bomb(7))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_params(p)
    assert time.perf_counter() - t0 < 3
    assert len(str(e.value)) < 5000 and str(p) in str(e.value) and "alias" in str(e.value)
    flow = "[" + ", ".join(line.split(": ", 1)[1] for line in _bomb(7).splitlines()) + "]"
    with pytest.raises(ConfigError) as e:  # the same through --set
        load_params(PARAMS, overrides=[f"train.betas={flow}"])
    assert len(str(e.value)) < 5000 and "--set" in str(e.value)


def test_error_values_are_shown_short():
    """Probe 23, the formatter: a long value is cut in the message."""
    with pytest.raises(ConfigError) as e:
        load_params(PARAMS, overrides=["train.betas=[" + ",".join(["0.5"] * 50_000) + "]"])
    assert "train.betas" in str(e.value) and len(str(e.value)) < 5000


# -- run ids and method names ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["my__m", "/tmp/absm", "../up", "a/b", ".", "x..y", ""])
def test_method_names_are_checked_at_config_time(name):
    """Probes 83, 84: a method name becomes a path component and is split on `__` by the report."""
    with pytest.raises(ConfigError, match="methods"):
        _methods(name)


def _methods(name: str):
    import yaml

    raw = yaml.safe_load(PARAMS.read_text())
    raw["methods"][name] = {"type": "uniform"}
    raw["pipeline"]["methods"] = [name]
    from dograph_core.config import validate

    return validate(raw)


def test_good_method_names_pass():
    assert "my-method.v2_b" in _methods("my-method.v2_b").methods


@pytest.mark.parametrize("run_id", ["../escaped", "/tmp/abs_run", "a/b", "..", "."])
def test_run_id_cannot_leave_the_run_directory(tmp_path, capsys, run_id):
    """Probes 81, 82: checked before the Prefect server starts and before anything is written."""
    runs = tmp_path / "runs" / "inner"
    rc, err = _cli(capsys, "run", "--run-id", run_id, "--skip-data", "--no-track", "--quiet",
                   "--set", f"pipeline.out_dir={runs}", "--set", f"tokenize.out_dir={tmp_path / 'none'}",
                   "--set", "pipeline.methods=[uniform]")
    assert rc == 2 and "--run-id" in err and run_id in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_skip_data_without_a_corpus_is_a_message_before_the_server_starts(tmp_path, capsys):
    rc, err = _cli(capsys, "run", "--skip-data", "--no-track", "--quiet", "--set", "pipeline.methods=[uniform]",
                   "--set", f"pipeline.out_dir={tmp_path / 'runs'}", "--set", f"tokenize.out_dir={tmp_path / 'none'}")
    assert rc == 1 and "--skip-data: no tokenized corpus at" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))  # no run was started


def test_the_flow_checks_the_run_id_too(tmp_path):
    """Probe 81 via a Prefect deployment, whose parameters go straight to the flow function."""
    from flows.pipeline import pipeline

    with pytest.raises(ConfigError, match="run id"):
        pipeline.fn(params=str(PARAMS), run_id="../escaped", overrides=[f"pipeline.out_dir={tmp_path / 'runs'}"])
    assert not (tmp_path / "escaped").exists()


# -- weights files ---------------------------------------------------------------------------------

DOMAINS = ["a", "b", "c"]


def _weights(tmp_path: Path, doc, name: str = "w.json") -> Path:
    from dograph_core.mixers.base import weights_document

    base = weights_document("x", DOMAINS, np.array([0.2, 0.3, 0.5]), [(0, [0.2, 0.3, 0.5]), (5, [0.1, 0.1, 0.8])], 10)
    p = tmp_path / name
    p.write_text(json.dumps(doc(base) if callable(doc) else doc))
    return p


def _drop(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _set(path, value):
    def f(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return d
    return f


@pytest.mark.parametrize("change, words", [
    (_drop("domains"), ["domains"]),                                         # probe 32
    (_drop("weights"), ["weights"]),                                         # probe 33
    (_set(["weights"], ["a", "b", "c"]), ["weights"]),                       # probe 34
    (_set(["weights"], {"a": 1, "b": 2, "c": 3}), ["weights"]),              # probe 35
    (_set(["schedule", 1, "weights"], [0.5, 0.5]), ["schedule", "1"]),       # probe 42
    (lambda d: _set(["schedule", 1], _drop("fraction")(d["schedule"][1]))(d), ["schedule", "1", "fraction"]),  # 43
    (_set(["schedule", 1, "weights"], [0.5, float("nan"), 0.5]), ["schedule", "1", "NaN"]),  # probe 44
    (_set(["schedule"], {"x": 1}), ["schedule"]),
])
def test_bad_weights_files_name_the_file_and_the_entry(tmp_path, change, words):
    from dograph_core.mixers.base import MixerError, read_weights

    p = _weights(tmp_path, change)
    with pytest.raises(MixerError) as e:
        read_weights(p, ["c", "b", "a"])
    msg = str(e.value)
    assert str(p) in msg and all(w in msg for w in words), msg


def test_a_good_weights_file_is_reordered_with_its_schedule(tmp_path):
    from dograph_core.mixers.base import read_weights

    doc = read_weights(_weights(tmp_path, lambda d: d), ["c", "b", "a"])
    assert doc["weights"] == [0.5, 0.3, 0.2] and doc["schedule"][1]["weights"] == [0.8, 0.1, 0.1]


def test_a_bad_later_schedule_entry_fails_before_the_first_step(tmp_path):
    """Probe 44: the NaN in entry 1 used to stop the run at step 5 of 10, naming no file."""
    from dograph_core.mixers import build_mixer
    from dograph_core.mixers.base import MixerContext, MixerError

    p = _weights(tmp_path, _set(["schedule", 1, "weights"], [0.5, float("nan"), 0.5]))
    ctx = MixerContext(domains=DOMAINS, natural=np.ones(3) / 3, total_steps=10, seq_len=8, vocab_size=300)
    with pytest.raises(MixerError, match=r"schedule\[1\]"):
        build_mixer("static", {"path": str(p), "use_schedule": True}, ctx)


def test_huge_weights_are_normalised_not_zero():
    """Probe 39: [1e308]*k overflowed the sum and became 'all weights are zero' with a RuntimeWarning."""
    from dograph_core.mixers.base import check_weights

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(check_weights([1e308] * 3, DOMAINS), [1 / 3] * 3)


def test_a_directory_as_weights_file_is_named(tmp_path):
    """Probe 45: `--weights some/dir` gave a raw IsADirectoryError."""
    from dograph_core.mixers.base import MixerError, read_weights

    with pytest.raises(MixerError, match=str(tmp_path)):
        read_weights(tmp_path, DOMAINS)


# -- shards and corpus.json ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory) -> Path:
    from _dograph_fixture import make_corpus

    return make_corpus(tmp_path_factory.mktemp("bytes"), chars=8000)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "corpus"))


def _tiny_cfg():
    from _engine_fixture import tiny_train_cfg

    return tiny_train_cfg(steps=4, seq_len=16, batch_size=4)


def test_a_non_ascii_tokenizer_hash_names_the_shard(tmp_path, byte_corpus):
    """Probe 51."""
    from dograph_core.data.shards import ShardError, read_header

    root = _copy(byte_corpus, tmp_path)
    shard = root / "train" / "code.bin"
    raw = bytearray(shard.read_bytes())
    raw[34] = 0xCF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=str(shard)):
        read_header(shard)


def _assert_nothing_trained(out: Path) -> None:
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert not (out / "summary.json").exists()


def test_out_of_vocabulary_ids_fail_before_the_first_step(tmp_path, byte_corpus):
    """Probe 53: ids >= vocab_size gave a raw IndexError from the embedding (a device assert on CUDA)."""
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.data.shards import ShardError, read_shard, write_shard
    from dograph_core.train import train

    root = _copy(byte_corpus, tmp_path)
    shard = root / "train" / "prose.bin"
    ids = np.array(read_shard(shard), dtype=np.int64)
    ids[::5] = 60000
    write_shard(shard, [ids[:-1]], 256, "fixture")
    with pytest.raises(ShardError) as e:
        train(_tiny_cfg(), TokenCorpus(root), "uniform", None, tmp_path / "out")
    assert str(shard) in str(e.value) and "60000" in str(e.value)
    _assert_nothing_trained(tmp_path / "out")


def test_a_truncated_test_shard_fails_before_training(tmp_path, byte_corpus):
    """Probe 54: found only at the final evaluation, after every step."""
    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.data.shards import ShardError
    from dograph_core.train import train

    root = _copy(byte_corpus, tmp_path)
    shard = root / "test" / "numbers.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match=str(shard)):
        train(_tiny_cfg(), TokenCorpus(root), "uniform", None, tmp_path / "out")
    _assert_nothing_trained(tmp_path / "out")


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_text("{\n"), ["not JSON"]),                                                      # probe 56
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                        if k != "train_domains"})), ["train_domains"]),                  # probe 57
    (lambda p: p.write_text("[]"), []),
])
def test_a_bad_corpus_json_names_the_file(tmp_path, byte_corpus, damage, words):
    from dograph_core.data.corpus import CorpusError, TokenCorpus

    root = _copy(byte_corpus, tmp_path)
    damage(root / "corpus.json")
    with pytest.raises(CorpusError) as e:
        TokenCorpus(root)
    assert str(root / "corpus.json") in str(e.value) and all(w in str(e.value) for w in words)


# -- MLflow redaction ------------------------------------------------------------------------------

def test_redaction_keeps_tokenizer_settings_and_hides_credentials_everywhere():
    """Probe 88."""
    from tasks.tracking import flatten

    flat = flatten({
        "tokenize": {"tokenizer": "train", "min_tokens": 256, "out_dir": "data/tokenized"},
        "prepare": {"hf": {"data_files": ["https://user:pa55@host/x.json",
                                          "s3://b/k.parquet?X-Amz-Signature=abc123&X-Amz-Credential=cred9",
                                          "https://h/d.json?token=tok777&page=2", "plain.json"],
                           "name": "https://h/ds?sig=sss111&key=kkk222&access_token=at333"}},
        "hf_token": "hf_secret", "nested": [["https://u:deep@h/p"]],
    })
    assert flat["tokenize.tokenizer"] == "train" and flat["tokenize.min_tokens"] == 256
    assert flat["hf_token"] == "***"
    text = json.dumps(flat)
    for secret in ("pa55", "abc123", "cred9", "tok777", "sss111", "kkk222", "at333", "deep", "hf_secret"):
        assert secret not in text, secret
    assert "plain.json" in text and "page=2" in text and "host/x.json" in text


# -- evaluate and report ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tokenized corpus with a real tokenizer and a model trained on it for two steps."""
    from _engine_fixture import make_corpus, tiny_train_cfg

    from dograph_core.data.corpus import TokenCorpus
    from dograph_core.train import train

    base = tmp_path_factory.mktemp("trained")
    corpus = make_corpus(base / "corpus")
    train(tiny_train_cfg(steps=2), TokenCorpus(corpus), "uniform", None, base / "run")
    return corpus, base / "run"


def _evaluate(capsys, model: Path, corpus: Path, *extra: str) -> tuple[int, str]:
    return _cli(capsys, "evaluate", str(model), "--quiet", "--set", f"tokenize.out_dir={corpus}",
                "--set", "train.seq_len=32", "--set", "train.eval_windows=2", *extra)


def test_evaluate_refuses_a_model_of_another_tokenizer(tmp_path, capsys, trained):
    """Probe 91: it used to score the model and print a plausible number."""
    corpus, run = trained
    model = Path(shutil.copytree(run / "final", tmp_path / "final"))
    tj = json.loads((model / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, another tokenizer
    (model / "tokenizer.json").write_text(json.dumps(tj))
    rc, err = _evaluate(capsys, model, corpus, "--out", str(tmp_path / "ev.json"))
    assert rc == 1 and "tokenizer" in err and str(model) in err
    assert not (tmp_path / "ev.json").exists()
    rc, err = _evaluate(capsys, run, corpus)  # the right one still evaluates
    assert rc == 0, err


def test_evaluate_names_a_truncated_safetensors_file(tmp_path, capsys, trained):
    """Probe 92."""
    corpus, run = trained
    model = Path(shutil.copytree(run / "final", tmp_path / "final"))
    st = model / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    rc, err = _evaluate(capsys, model, corpus)
    assert rc == 1 and str(model) in err


def test_report_names_a_corrupt_eval_json(tmp_path, capsys, trained):
    """Probe 95: `dograph report` printed `Expecting value…` without the file."""
    corpus, run = trained
    unit = tmp_path / "rid" / "train" / "uniform__nano__s0"
    shutil.copytree(run, unit)
    unit.with_name(unit.name + ".done.json").write_text(json.dumps({"format": "x", "key": "k", "info": {}}))
    (unit / "eval.json").write_text('{"val": ')
    rc, err = _cli(capsys, "report", "--run-dir", str(tmp_path / "rid"), "--set", f"tokenize.out_dir={corpus}")
    assert rc == 1 and str(unit / "eval.json") in err
