"""``ArcConfig`` as dicts, files, environment variables and flat parser dataclasses; the
``metrics_every``/``log_dir``/``chaos`` fields and the ``Arc`` keywords that override them."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from arc_dist import ArcConfig, EarlyWarning, Thresholds
from arc_dist.config import ArcConfigFlat

pytestmark = pytest.mark.timeout(120)

CUSTOM = {
    "max_skips": 3,
    "hang_timeout": 30.0,
    "async_checkpoint": False,
    "log_dir": "/tmp/logs",
    "thresholds": {"window": 50, "loss_ratio_fail": 3.0},
}


def test_dict_round_trip_nested_and_flat():
    c = ArcConfig.from_dict(CUSTOM)
    assert (c.max_skips, c.hang_timeout, c.async_checkpoint, c.log_dir) == (
        3,
        30.0,
        False,
        "/tmp/logs",
    )
    assert c.thresholds == Thresholds(window=50, loss_ratio_fail=3.0)
    assert ArcConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    flat = ArcConfig.from_flat(
        max_skips=3, hang_timeout=30, async_checkpoint=False, log_dir="/tmp/logs",
        thresholds__window=50, thresholds__loss_ratio_fail=3,
    )  # fmt: skip
    assert flat == c and isinstance(flat.hang_timeout, float)
    assert ArcConfig.from_dict({}) == ArcConfig()
    assert "thresholds__zscore_fail" in ArcConfig.flat_fields()


@pytest.mark.parametrize(
    "data, error, words",
    [
        ({"max_skip": 3}, ValueError, ["'max_skip'", "'max_skips'"]),
        ({"thresholds": {"windw": 5}}, ValueError, ["thresholds", "'windw'", "'window'"]),
        ({"thresholds__windw": 5}, ValueError, ["'thresholds__window'"]),
        ({"max_skips": "3"}, TypeError, ["ArcConfig.max_skips='3'", "int"]),
        ({"max_skips": True}, TypeError, ["max_skips"]),
        ({"async_checkpoint": 1}, TypeError, ["async_checkpoint", "bool"]),
        ({"ride_ddp": 1}, TypeError, ["ride_ddp", "bool"]),
        ({"thresholds": {"window": 2.5}}, TypeError, ["thresholds.window"]),
        ({"max_skips": -1}, ValueError, ["max_skips=-1", ">= 0"]),
        ({"metrics_every": -1}, ValueError, ["metrics_every"]),
        ({"chaos": ""}, ValueError, ["chaos"]),
        ({"early_warning": {"threshold": 0}}, ValueError, ["early_warning.threshold=0", "> 0"]),
        ({"early_warning__lr_factor": 1.5}, ValueError, ["early_warning.lr_factor=1.5", "(0, 1]"]),
        ({"early_warning": {"cooldown": -1}}, ValueError, ["early_warning.cooldown=-1"]),
        ({"early_warning": {"min_steps": 0}}, ValueError, ["early_warning.min_steps=0", ">= 1"]),
        ({"early_warning": {"enabled": "yes"}}, TypeError, ["early_warning.enabled", "bool"]),
        ({"early_warning": {"lr_factr": 0.5}}, ValueError, ["'lr_factr'", "'lr_factor'"]),
        (
            {"lr_restore": False, "early_warning": {"enabled": True, "lr_factor": 0.5}},
            ValueError,
            ["early_warning.lr_factor=0.5", "lr_restore=True"],
        ),
    ],
)
def test_bad_keys_and_values_name_the_field(data, error, words):
    with pytest.raises(error) as e:
        ArcConfig.from_dict(data)
    for w in words:
        assert w in str(e.value)


def test_early_warning_in_every_form():
    """The nested ``early_warning`` field: off by default, and the same through a dict, flat
    names, the environment and the flat parser dataclass."""
    assert ArcConfig().early_warning == EarlyWarning() and not EarlyWarning().enabled
    want = ArcConfig(early_warning=EarlyWarning(enabled=True, lr_factor=0.5, cooldown=20))
    nested = {"early_warning": {"enabled": True, "lr_factor": 0.5, "cooldown": 20}}
    assert ArcConfig.from_dict(nested) == want
    assert ArcConfig.from_dict(json.loads(json.dumps(want.to_dict()))) == want
    flat = dict(early_warning__enabled=True, early_warning__lr_factor=0.5,
                early_warning__cooldown=20)  # fmt: skip
    assert ArcConfig.from_flat(**flat) == want
    assert ArcConfigFlat(**flat).to_config() == want
    env = {"ARC_CONFIG_EARLY_WARNING__ENABLED": "true",
           "ARC_CONFIG_EARLY_WARNING__LR_FACTOR": "0.5",
           "ARC_CONFIG_EARLY_WARNING__COOLDOWN": "20"}  # fmt: skip
    assert ArcConfig.from_env(env) == want
    assert ArcConfig.from_env({"ARC_CONFIG_EARLY_WARNING__LR_FACTOR": "none"}) == ArcConfig()
    with pytest.raises(TypeError, match="EarlyWarning"):
        ArcConfig(early_warning=True)


def test_files(tmp_path):
    toml = tmp_path / "arc.toml"
    toml.write_text(
        "[arc]\nmax_skips = 3\nhang_timeout = 30.0\nasync_checkpoint = false\n"
        'log_dir = "/tmp/logs"\n[arc.thresholds]\nwindow = 50\nloss_ratio_fail = 3.0\n'
        "[other]\nx = 1\n"
    )
    want = ArcConfig.from_dict(CUSTOM)
    assert ArcConfig.from_file(toml, section="arc") == want
    yml = tmp_path / "arc.yaml"
    yml.write_text(
        "max_skips: 3\nhang_timeout: 30.0\nasync_checkpoint: false\nlog_dir: /tmp/logs\n"
        "thresholds:\n  window: 50\n  loss_ratio_fail: 3.0\n"
    )
    assert ArcConfig.from_file(str(yml)) == want
    js = tmp_path / "arc.json"
    js.write_text(json.dumps(want.to_dict()))
    assert ArcConfig.from_file(js) == want
    (tmp_path / "bad.yml").write_text("max_skip: 3\n")
    with pytest.raises(ValueError, match="did you mean 'max_skips'"):
        ArcConfig.from_file(tmp_path / "bad.yml")
    with pytest.raises(ValueError, match="no section 'nope'"):
        ArcConfig.from_file(toml, section="nope")
    with pytest.raises(ValueError, match="unknown file type '.ini'"):
        ArcConfig.from_file(tmp_path / "x.ini")


def test_yaml_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    yml = tmp_path / "arc.yaml"
    yml.write_text("max_skips: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail, as when absent
    with pytest.raises(ImportError, match="pip install pyyaml"):
        ArcConfig.from_file(yml)


def test_environment(monkeypatch, tmp_path):
    env = {
        "ARC_CONFIG_MAX_SKIPS": "3",
        "ARC_CONFIG_HANG_TIMEOUT": "30",
        "ARC_CONFIG_ASYNC_CHECKPOINT": "false",
        "ARC_CONFIG_LOG_DIR": "/tmp/logs",
        "ARC_CONFIG_THRESHOLDS__WINDOW": "50",
        "ARC_CONFIG_THRESHOLDS__LOSS_RATIO_FAIL": "3",
        "ARC_LOG_DIR": "/launcher/logs",  # the launcher's flag: not a config field, ignored
        "PATH": "/bin",
    }
    assert ArcConfig.from_env(env) == ArcConfig.from_dict(CUSTOM)
    assert ArcConfig.from_env({"ARC_CONFIG_HANG_TIMEOUT": "none"}).hang_timeout is None
    with pytest.raises(ValueError, match="did you mean 'ARC_CONFIG_MAX_SKIPS'"):
        ArcConfig.from_env({"ARC_CONFIG_MAX_SKIP": "3"})
    with pytest.raises(ValueError, match=r"ArcConfig.thresholds.window: 'x' is not a valid int"):
        ArcConfig.from_env({"ARC_CONFIG_THRESHOLDS__WINDOW": "x"})
    with pytest.raises(ValueError, match="'maybe' is not a valid true/false"):
        ArcConfig.from_env({"ARC_CONFIG_PREFLIGHT": "maybe"})
    # precedence: defaults < file < environment
    f = tmp_path / "arc.toml"
    f.write_text(
        "max_skips = 5\nkeep_checkpoints = 7\n[thresholds]\nwindow = 60\nzscore_fail = 20.0\n"
    )
    monkeypatch.setenv("ARC_CONFIG_MAX_SKIPS", "1")
    monkeypatch.setenv("ARC_CONFIG_THRESHOLDS__WINDOW", "40")
    c = ArcConfig.from_file(f, env=True)
    assert (c.max_skips, c.keep_checkpoints) == (1, 7)
    assert (c.thresholds.window, c.thresholds.zscore_fail) == (40, 20.0)
    assert ArcConfig.from_file(f).max_skips == 5  # env only when asked


def test_hf_argument_parser_builds_it_next_to_training_arguments():
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((TrainingArguments, ArcConfigFlat))
    targs, flat = parser.parse_args_into_dataclasses(
        [
            "--output_dir", "/tmp/out", "--warmup_steps", "7",
            "--max_skips", "3", "--hang_timeout", "30", "--async_checkpoint", "false",
            "--log_dir", "/tmp/logs", "--thresholds__window", "50",
            "--thresholds__loss_ratio_fail", "3",
        ]
    )  # fmt: skip
    assert targs.warmup_steps == 7 and flat.to_config() == ArcConfig.from_dict(CUSTOM)
    (defaults,) = HfArgumentParser(ArcConfigFlat).parse_args_into_dataclasses([])
    assert defaults.to_config() == ArcConfig()


def test_jsonargparse_builds_it():
    import jsonargparse

    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(ArcConfigFlat, "arc")
    ns = parser.parse_args(["--arc.max_skips=3", "--arc.thresholds__window=50"])
    cfg = ArcConfigFlat(**vars(ns.arc)).to_config()
    assert (cfg.max_skips, cfg.thresholds.window) == (3, 50)


def test_arc_keywords_override_the_new_fields(tmp_path):
    from arc_dist import Arc
    from arc_dist.checkpoint.manifest import config_digest

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = ArcConfig(metrics_every=3, log_dir=str(tmp_path / "a"), chaos="nan_loss@5")
    with Arc(model, opt, config=cfg) as arc:
        assert arc._rec.metrics_every == 3 and arc.log_dir == str(tmp_path / "a")
        assert arc.chaos is not None and arc.chaos.faults
    with Arc(model, opt, config=cfg, metrics_every=1, log_dir=str(tmp_path / "b"), chaos="") as arc:
        assert arc._rec.metrics_every == 1 and arc.log_dir == str(tmp_path / "b")
        assert arc.chaos is None or not arc.chaos.faults
    with Arc(model, opt) as arc:  # the old defaults
        assert arc._rec.metrics_every == 10 and arc.log_dir is None and arc.chaos is None
    # logging and fault injection do not change what a checkpoint holds: same digest
    assert config_digest(cfg.digest_fields()) == config_digest(ArcConfig().digest_fields())
