from pathlib import Path

import pytest
from pydantic import ValidationError

from captionflow.config import DEFAULT_MODEL, Settings, setting_names
from captionflow.errors import ConfigError, ErrorCode


def test_defaults_are_the_seed_serving_options() -> None:
    s = Settings.load()
    assert s.serving.model == DEFAULT_MODEL == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert (s.serving.tensor_parallel_size, s.serving.temperature, s.serving.top_p) == (1, 0.7, 0.9)
    assert (s.serving.max_tokens, s.serving.max_model_len) == (2048, 51200)
    assert s.serving.gpu_memory_utilization == 0.9
    assert s.serving.default_prompt == "Please describe the video in detail."
    assert s.serving.system_prompt == "You are a helpful assistant."
    assert s.kafka.enable_idempotence == "auto"


@pytest.mark.parametrize(("value", "expected"), [
    ("auto", "auto"), ("true", True), ("false", False), ("1", True), ("0", False)])
def test_enable_idempotence_is_auto_true_or_false(value: str, expected: object,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE", value)
    assert Settings.load().kafka.enable_idempotence == expected


def test_enable_idempotence_rejects_other_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTIONFLOW_KAFKA__ENABLE_IDEMPOTENCE", "maybe")
    with pytest.raises(ConfigError, match="kafka.enable_idempotence"):
        Settings.load()


def test_precedence_overrides_then_env_then_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[serving]\nmax_tokens = 11\ntop_p = 0.5\n[worker]\nmax_batch_size = 3\n')
    monkeypatch.setenv("CAPTIONFLOW_SERVING__MAX_TOKENS", "22")
    s = Settings.load(cfg)
    assert (s.serving.max_tokens, s.serving.top_p, s.worker.max_batch_size) == (22, 0.5, 3)
    s = Settings.load(cfg, {"serving.max_tokens": 33, "worker.max_wait_ms": None})
    assert s.serving.max_tokens == 33
    assert s.worker.max_wait_ms == 50  # None means "flag not given"


def test_config_file_from_env_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.json"
    cfg.write_text('{"topics": {"input": "my.videos"}}')
    monkeypatch.setenv("CAPTIONFLOW_CONFIG", str(cfg))
    assert Settings.load().topics.input == "my.videos"


def test_settings_are_frozen() -> None:
    s = Settings.load()
    with pytest.raises(ValidationError):
        s.worker.max_batch_size = 2  # type: ignore[misc]


@pytest.mark.parametrize(("overrides", "fix"), [
    ({"kafka.security_protocol": "SASL_SSL"}, "needs sasl_mechanism"),
    ({"kafka.security_protocol": "SASL_SSL", "kafka.sasl_mechanism": "SCRAM-SHA-512"},
     "needs sasl_username and sasl_password"),
    ({"kafka.sasl_mechanism": "PLAIN"}, "use SASL_SSL or SASL_PLAINTEXT"),
    ({"kafka.security_protocol": "SSL", "kafka.ssl_certfile": "/c.pem"}, "set both or neither"),
    ({"topics.output": "captionflow.videos"}, "three different topics"),
    ({"worker.max_in_flight": 4, "worker.resume_in_flight": 4}, "resume_in_flight"),
    ({"serving.temperature": -1}, "serving.temperature"),
    ({"worker.max_batch_size": "many"}, "CAPTIONFLOW_WORKER__MAX_BATCH_SIZE"),
    ({"worker.no_such_setting": 1}, "worker.no_such_setting"),
])
def test_invalid_combinations_fail_with_a_fix(overrides: dict, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(overrides=overrides)
    assert info.value.code is ErrorCode.CONFIG_INVALID
    assert fix in info.value.message


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "nope.toml")


def test_valid_sasl_ssl_settings_reach_the_client_options(tmp_path: Path) -> None:
    from captionflow.kafka import connection_kwargs

    s = Settings.load(overrides={
        "kafka.security_protocol": "SASL_PLAINTEXT", "kafka.sasl_mechanism": "SCRAM-SHA-256",
        "kafka.sasl_username": "u", "kafka.sasl_password": "s3cret-pw"})
    kw = connection_kwargs(s.kafka)
    assert kw["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("u", "s3cret-pw")
    assert "s3cret-pw" not in repr(s)  # secrets are not printed


def test_setting_names_lists_dotted_names() -> None:
    names = setting_names()
    assert {"kafka.bootstrap_servers", "worker.max_wait_ms", "serving.max_model_len"} <= names


def test_a_window_longer_than_max_duration_s_is_refused() -> None:
    from captionflow.errors import ConfigError

    with pytest.raises(ConfigError, match="must not exceed video.max_duration_s"):
        Settings.load(overrides={"video.window_s": 60.0, "video.max_duration_s": 30.0})
