"""Settings defined once. Environment variables (``LLAMAWRAPPER_*``), the config file
(``$LLAMAWRAPPER_HOME/config.toml`` or ``LLAMAWRAPPER_CONFIG``) and command-line flags all
read these classes; nothing else defines a default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def home_dir() -> Path:
    """Where converted models, manifests and caches live."""
    return Path(os.environ.get("LLAMAWRAPPER_HOME") or Path.home() / ".cache" / "llamawrapper").expanduser()


class EngineSettings(BaseSettings):
    """Admission limits and cache budgets of one engine."""

    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    max_batch_size: int = Field(32, ge=1, description="Most sequences decoded together in one step.")
    max_queue: int = Field(256, ge=0, description="Most requests waiting for a slot; beyond it requests are refused.")
    max_tokens_in_flight: int = Field(65536, ge=1, description="Most prompt + completion tokens admitted at once.")
    prefill_chunk: int = Field(256, ge=1, description="Most prompt tokens prefilled per engine step.")
    prefix_cache_mb: float = Field(256.0, ge=0, description="Byte budget of the prefix (KV) cache, in MiB.")
    threads: int = Field(0, ge=0, description="Torch threads; 0 = one per core.")

    def engine_config(self):
        from .engine import EngineConfig

        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_tokens_in_flight=self.max_tokens_in_flight,
            prefill_chunk=self.prefill_chunk,
            prefix_cache_bytes=int(self.prefix_cache_mb * 1024 * 1024),
        )


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    log_level: str = Field("INFO", description="Logging level.")
    log_format: Literal["text", "json"] = Field("text", description="'json' writes one JSON object per line.")
