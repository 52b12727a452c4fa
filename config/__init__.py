"""Typed configuration for dishtrack: pydantic models loaded from YAML.

Every model forbids unknown keys, so a typo in a YAML file is an error that
names the field instead of a silently ignored setting.
"""
from .settings import (
    ApiConfig,
    AppConfig,
    AuthConfig,
    CameraConfig,
    ClusterConfig,
    ConfigError,
    CorrectionsConfig,
    DetectorConfig,
    IntegrationsConfig,
    LineConfig,
    MenuConfig,
    MqttConfig,
    RateLimitConfig,
    StorageConfig,
    StrideConfig,
    TokenConfig,
    TrackerConfig,
    WebhookConfig,
    ZoneConfig,
    default_config_path,
    load_config,
)

__all__ = [
    "ApiConfig",
    "AppConfig",
    "AuthConfig",
    "CameraConfig",
    "ClusterConfig",
    "ConfigError",
    "CorrectionsConfig",
    "DetectorConfig",
    "IntegrationsConfig",
    "LineConfig",
    "MenuConfig",
    "MqttConfig",
    "RateLimitConfig",
    "StorageConfig",
    "StrideConfig",
    "TokenConfig",
    "TrackerConfig",
    "WebhookConfig",
    "ZoneConfig",
    "default_config_path",
    "load_config",
]
