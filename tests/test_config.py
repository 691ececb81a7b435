"""Settings: flags over environment over file; every mistake named with field and value."""

from __future__ import annotations

import os

import pytest

from slimserve.config import Settings
from slimserve.errors import ConfigError


def test_defaults_are_safe():
    s = Settings()
    assert s.host == "127.0.0.1"
    assert s.model_control is False
    assert s.max_body_bytes == 64 * 1024 * 1024


def test_flags_win_over_environment_which_wins_over_the_file(tmp_path, monkeypatch):
    config = tmp_path / "serve.yaml"
    config.write_text("http_port: 7000\ngrpc-port: 7001\nmax_queue_size: 9\n")
    monkeypatch.setenv("SLIMSERVE_GRPC_PORT", "7101")
    monkeypatch.setenv("SLIMSERVE_MAX_QUEUE_SIZE", "19")
    s = Settings.load(config, max_queue_size=29, http_port=None)
    assert s.http_port == 7000  # file (flag not given)
    assert s.grpc_port == 7101  # environment over file
    assert s.max_queue_size == 29  # flag over both


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http_port: 70000\n", "'http_port' = 70000"),
        ("max_body_bytes: -1\n", "'max_body_bytes' = -1"),
        ("htp_port: 1\n", "known settings"),
        ("log_level: loud\n", "'log_level' = 'loud'"),
        ("- a list\n", "expected a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_file_mistakes_name_the_file_field_and_value(tmp_path, text, expected):
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        Settings.load(config)
    assert expected in info.value.message
    if "mapping" not in expected and "YAML" not in expected:
        assert str(config) in info.value.message


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("SLIMSERVE_HTTP_PORT", "eighty")
    with pytest.raises(ConfigError, match="http_port"):
        Settings.load()


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        Settings.load(tmp_path / "absent.yaml")


def test_serve_makes_openmp_threads_sleep_unless_told_to_spin(monkeypatch) -> None:
    from slimserve.launch import configure_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "unset")  # recorded, so the test leaves it as it was
    monkeypatch.delenv("OMP_WAIT_POLICY")
    configure_threads(Settings(spin_wait=True))
    assert "OMP_WAIT_POLICY" not in os.environ
    configure_threads(Settings())
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice wins
    configure_threads(Settings())
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
