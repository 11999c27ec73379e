"""ServeConfig and IndexUpdate without Ray: flat fields lifted into their nested configs, refusals, options."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasc_ray.engine.config import DrafterConfig, DraftMode, EngineConfig
from tasc_ray.serving.config import SERVE_MAX_BATCH_SIZE, IndexUpdate, ServeConfig


def test_flat_engine_and_drafter_fields_are_lifted():
    cfg = ServeConfig.model_validate(
        {
            "model": "m",
            "index": "/idx",
            "dtype": "bfloat16",
            "max_batch_size": "4",
            "mode": "context",
            "min_path_prob": "0.25",
        }
    )
    assert cfg.engine == EngineConfig(
        model="m",
        index="/idx",
        dtype="bfloat16",
        max_batch_size=4,
        drafter=DrafterConfig(mode=DraftMode.CONTEXT, min_path_prob=0.25),
    )


def test_top_level_fields_override_the_engine_block():
    cfg = ServeConfig.model_validate(
        {"engine": {"model": "a", "max_batch_size": 2, "min_path_prob": 0.1}, "model": "b", "min_path_prob": 0.9}
    )
    assert cfg.engine.model == "b" and cfg.engine.max_batch_size == 2 and cfg.engine.drafter.min_path_prob == 0.9


def test_serving_batch_size_defaults_to_16():
    assert SERVE_MAX_BATCH_SIZE == 16
    assert ServeConfig().engine.max_batch_size == 16
    assert ServeConfig.model_validate({"model": "m"}).engine.max_batch_size == 16
    assert ServeConfig.model_validate({"engine": {"model": "m"}}).engine.max_batch_size == 16
    assert ServeConfig.model_validate({"engine": {"max_batch_size": 8}}).engine.max_batch_size == 8
    assert EngineConfig().max_batch_size == 8  # the engine's own default is unchanged


def test_null_strings_from_serve_run():
    cfg = ServeConfig.model_validate(
        {"index": "None", "device": "null", "num_replicas": "none", "api_key": "", "model_name": "NULL"}
    )
    assert cfg.engine.index is None and cfg.engine.device is None
    assert cfg.num_replicas is None and cfg.api_key is None and cfg.model_name is None


@pytest.mark.parametrize(
    "data",
    [
        {"bogus": 1},
        {"engine": {"bogus": 1}},
        {"max_batch_size": 0},
        {"mode": "sideways"},
        {"autoscaling": {"max_replicas": 2, "extra": 1}},
        {"user_config": {"bogus": 1}},
        {"max_request_bytes": 0},
    ],
)
def test_unknown_or_invalid_fields_are_refused(data):
    with pytest.raises(ValidationError):
        ServeConfig.model_validate(data)


def test_names_and_resources(monkeypatch):
    assert ServeConfig(model="/models/SmolLM2/").served_model_name == "SmolLM2"
    assert ServeConfig(model="/models/x", model_name="tiny").served_model_name == "tiny"
    assert ServeConfig(device="cuda:0").gpus == 1.0 and ServeConfig(device="cpu").gpus == 0.0
    assert ServeConfig(device="cuda", num_gpus=0.5).gpus == 0.5
    monkeypatch.setenv("TASC_TEST_KEY", "sk-env")
    assert ServeConfig(api_key_env="TASC_TEST_KEY").resolved_api_key() == "sk-env"
    assert ServeConfig(api_key="sk-given", api_key_env="TASC_TEST_KEY").resolved_api_key() == "sk-given"
    assert ServeConfig(api_key_env="TASC_UNSET_KEY_FOR_TEST").resolved_api_key() is None


def test_deployment_options():
    opts = ServeConfig(num_cpus=2, max_ongoing_requests=32).deployment_options()
    assert opts == {"ray_actor_options": {"num_cpus": 2}, "max_ongoing_requests": 32, "num_replicas": 1}
    cfg = ServeConfig.model_validate({"device": "cuda", "autoscaling": {"min_replicas": 0, "max_replicas": 3}})
    opts = cfg.deployment_options()
    assert cfg.num_replicas is None and "num_replicas" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 1.0
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 16}
    opts = ServeConfig.model_validate({"user_config": {"index": None, "min_path_prob": 0.3}}).deployment_options()
    assert opts["user_config"] == {"index": None, "drafter": {"min_path_prob": 0.3}}  # only what was given


def test_index_update_nests_drafter_fields():
    update = IndexUpdate.model_validate(
        {"index": "/new", "index_version": 2, "min_path_prob": 0.2, "drafter": {"max_draft": 3}}
    )
    assert update.drafter == {"max_draft": 3, "min_path_prob": 0.2}
    assert update.model_fields_set == {"index", "index_version", "drafter"}
    assert IndexUpdate.model_validate({"drafter": None}).drafter == {}
    assert IndexUpdate.model_validate({}).model_fields_set == set()
    current = DrafterConfig(mode=DraftMode.CORPUS, max_draft=5)
    assert update.drafter_config(current) == DrafterConfig(mode=DraftMode.CORPUS, max_draft=3, min_path_prob=0.2)
    assert IndexUpdate().drafter_config(current) == current


@pytest.mark.parametrize("data", [{"bogus": 1}, {"max_batch_size": 0}, {"batch_wait_timeout_s": 0.1}])
def test_index_update_refuses(data):
    with pytest.raises(ValidationError):
        IndexUpdate.model_validate(data)


def test_index_update_drafter_values_checked_when_applied():
    with pytest.raises(ValidationError):
        IndexUpdate.model_validate({"min_path_prob": 2.0}).drafter_config(DrafterConfig())
    with pytest.raises(ValidationError):
        IndexUpdate.model_validate({"drafter": {"bogus_knob": 1}}).drafter_config(DrafterConfig())


def test_max_request_bytes():
    assert ServeConfig().max_request_bytes == 1_000_000
    assert ServeConfig.model_validate({"max_request_bytes": "2048"}).max_request_bytes == 2048  # from serve run
