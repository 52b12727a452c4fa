"""Admin-only routes (role ``admin`` when auth is on; see auth.required_role)."""
from __future__ import annotations

from fastapi import APIRouter

from dishtrack.config import AppConfig

from .ingest import redact


def redacted_config(cfg: AppConfig) -> dict:
    """The resolved config without secrets: camera passwords masked, session secret and token hashes left out."""
    data = cfg.model_dump(mode="json")
    for cam in data["cameras"]:
        cam["source"] = redact(cam["source"])
    data["auth"]["tokens"] = [{"name": t["name"], "role": t["role"]} for t in data["auth"]["tokens"]]
    if data["auth"]["session_secret"]:
        data["auth"]["session_secret"] = "***"
    if data["storage"].get("url"):
        data["storage"]["url"] = redact(data["storage"]["url"])
    integ = data.get("integrations", {})
    for hook in integ.get("webhooks", []):
        hook["secret"] = "***"
        hook["url"] = redact(hook["url"])
    if integ.get("mqtt") and integ["mqtt"]["password"]:
        integ["mqtt"]["password"] = "***"
    return data


def admin_router(cfg: AppConfig) -> APIRouter:
    r = APIRouter()

    @r.get("/config")
    def config() -> dict:
        """The running configuration (secrets masked). Admin role."""
        return redacted_config(cfg)

    return r
