"""Settings defined once. Environment variables (``LLAMAWRAPPER_*``), the config file
(``$LLAMAWRAPPER_HOME/config.toml`` or ``LLAMAWRAPPER_CONFIG``) and command-line flags all
read these classes; nothing else defines a default."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def home_dir() -> Path:
    """Where converted models, manifests and caches live."""
    return Path(os.environ.get("LLAMAWRAPPER_HOME") or Path.home() / ".cache" / "llamawrapper").expanduser()


def config_file() -> Path:
    """The TOML config file: ``LLAMAWRAPPER_CONFIG`` or ``$LLAMAWRAPPER_HOME/config.toml``."""
    return Path(os.environ.get("LLAMAWRAPPER_CONFIG") or home_dir() / "config.toml").expanduser()


def _config_tables() -> dict:
    import tomllib

    path = config_file()
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def _with_config_file(table: str):
    """A ``settings_customise_sources`` that adds the ``[table]`` of the config file below env vars."""

    @classmethod
    def customise(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        if table not in _config_tables():  # a config file without this table is fine (pydantic-settings raises)
            return init_settings, env_settings, dotenv_settings, file_secret_settings
        toml: PydanticBaseSettingsSource = TomlConfigSettingsSource(settings_cls, toml_file=config_file(), toml_table_header=(table,))
        return init_settings, env_settings, dotenv_settings, toml, file_secret_settings

    return customise


class EngineSettings(BaseSettings):
    """Admission limits and cache budgets of one engine."""

    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    @classmethod
    def of(cls, value: "EngineSettings | dict | None") -> "EngineSettings":
        """``value`` itself, or the settings its dict gives (None: the defaults, the environment, the config file)."""
        return value if isinstance(value, cls) else cls(**(value or {}))

    max_batch_size: int = Field(32, ge=1, description="Most sequences decoded together in one step.")
    max_queue: int = Field(256, ge=0, description="Most requests waiting for a slot; beyond it requests are refused.")
    max_tokens_in_flight: int = Field(65536, ge=1, description="Most prompt + completion tokens admitted at once.")
    prefill_chunk: int = Field(256, ge=1, description="Most prompt tokens prefilled per engine step.")
    prefix_cache_mb: float = Field(256.0, ge=0, description="Byte budget of the prefix (KV) cache, in MiB.")
    threads: int = Field(0, ge=0, description="Torch threads; 0 = one per core.")
    pin_threads: Optional[bool] = Field(
        None, description="Pin torch's threads one per CPU (on: always; off: never; unset: when they are as many as "
                          "the CPUs the process may use), so that another process on the machine (a client) does "
                          "not make the scheduler stack or move them (docs/BENCHMARKS.md section 17).")
    fuse_projections: bool = Field(
        True, description="Run each layer's q/k/v and gate/up projections as one matmul each (same results; off = separate).")
    attention_fp32: bool = Field(
        True, description="Attention of bfloat16/float16 (and int8/int4) models in float32 (torch's bf16 attention was "
                          "slower on every CPU measured, AVX512-BF16 included; off = in the model's dtype).")
    attention_per_row: Optional[bool] = Field(
        None, description="Attention whose every row is bit for bit what it is alone (decode: a batch-invariant kernel; "
                          "prefill: row by row), so a request's text does not depend on its batch; unset = for int8, "
                          "int4 and w8a8 models (whose GEMMs compute each row on its own).")
    kv_cache_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = Field(
        None, description="dtype of the KV cache: float32 or the model's own (unset). float32 for a bfloat16/int8/int4 "
                          "model doubles the KV memory and spares attention_fp32 casting the context each step "
                          "(decode steps of 16 rows x 300 tokens 1.06-1.08x faster, no gain end to end on smollm2).")
    onednn_linear: bool = Field(
        True, description="float32 and bfloat16 projections through oneDNN's matmul on weights packed once at load "
                          "(float32 decode ~2x faster than torch's MKL linear on an AVX-512 AMD EPYC; bfloat16 the "
                          "same results, sooner); the packed copy costs the weights' memory once more; off = torch's "
                          "own linear. Not with compile_decode.")
    attention_kernel: bool = Field(
        True, description="Decode steps' attention through the project's C++ kernel (built with g++ at the first load, "
                          "cached under the home): reads a float32 or bfloat16 KV cache in place, each row exactly what "
                          "it is alone (compile_decode's graph calls it too); off (or without a compiler) = torch's attention.")
    int8_kernel: bool = Field(
        True, description="An int8 model's projections and the int8 output head of int8 and int4 models through the "
                          "project's int8 kernel (built with the attention kernel; AVX512-BF16 CPUs): 1.4-2.8x faster than "
                          "torch's int8 matmul at 1 to 256 rows, each row the same in any batch; its copy of the int8 "
                          "weights costs their memory once more; off = torch's int8 matmul.")
    bf16_kernel: bool = Field(
        True, description="A bfloat16 model's projections and head through the project's kernel (built with the "
                          "attention kernel; AVX512-BF16 CPUs) instead of oneDNN's (onednn_linear): 1.1-1.6x faster at "
                          "1 to 256 rows, each row the same in any batch; off = oneDNN's packed matmul.")
    f32_kernel: bool = Field(
        True, description="A float32 model's projections and head through the project's kernel (built with the "
                          "attention kernel; AVX-512 CPUs) instead of oneDNN's (onednn_linear): 1.4-1.7x faster at one "
                          "row, the same at 16 to 256, each row the same in any batch; off = oneDNN's packed matmul.")
    int4_kernel: bool = Field(
        True, description="An int4 model's projections through the project's int4 kernel (built with the attention "
                          "kernel; AVX512-BF16 CPUs): bfloat16 dot products on the weights looked up as exact bfloat16 "
                          "values, 1.3-2.3x torch's int4 kernel at 1 to 256 rows and faster than unpacking the weights for "
                          "a prefill chunk, each row the same in any batch; its copy of the int4 weights costs their "
                          "memory once more; off = torch's int4 kernel (and unpacked weights for prefill).")
    compile_decode: bool = Field(
        False, description="torch.compile the whole decode step (CPU inductor, C++ wrapper), at load; ~4 min of compiling "
                           "at the first load on 2 cores, ~30 s once cached on disk. It was int4 smollm2's fastest "
                           "step at batch 1 until the eager step's kernels lost their Python overhead; on an "
                           "AVX512-BF16 CPU the eager step, whose layer loop is one kernel call, is now ~1.5x faster "
                           "(W1 int4 186 against 120 tokens/s in one run).")
    prompt_lookup: int = Field(
        0, ge=0, le=32, description="Prompt-lookup speculative decoding: most draft tokens per step, verified in one "
                                    "forward (greedy requests of float32 models only; same text); 0 = off.")

    settings_customise_sources = _with_config_file("engine")

    def engine_config(self):
        from .engine import EngineConfig

        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_tokens_in_flight=self.max_tokens_in_flight,
            prefill_chunk=self.prefill_chunk,
            prefix_cache_bytes=int(self.prefix_cache_mb * 1024 * 1024),
            prompt_lookup=self.prompt_lookup,
        )


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    log_level: str = Field("INFO", description="Logging level.")
    log_format: Literal["text", "json"] = Field("text", description="'json' writes one JSON object per line.")


def _split_list(value):
    """``a,b`` (env var) or a JSON-free list (flags, config file) → list of non-empty strings."""
    if isinstance(value, str):
        value = value.split(",")
    return [v.strip() for v in value or [] if v and v.strip()]


class ServerSettings(BaseSettings):
    """``llamawrapper serve``: what to serve, where, and its limits. Config file table: ``[server]``."""

    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["smollm2"], description="Models to serve: alias, folder, .gguf or hub id; 'name=source' to rename.")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 = any free port).")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, repr=False, description="Accepted API keys (Authorization: Bearer); none = no auth. Env: comma-separated.")
    dtype: str = Field("float32", description="Weights dtype: float32, bfloat16 or float16.")
    quantization: Optional[Literal["int8", "int4", "w8a8"]] = Field(
        None, description="Quantization of every served model: int8 or int4 (weight-only), w8a8 (int8 weights and activations); cached after the first load.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description="Largest request body accepted; larger gets 413.")
    drain_timeout: float = Field(30.0, ge=0, description="Seconds SIGTERM waits for in-flight requests before exiting.")
    idle_connection_timeout: int = Field(
        65, ge=1, description="Seconds an idle keep-alive HTTP connection stays open for the client's next request; "
        "longer than clients' own limit (httpx and the openai client drop theirs after 5 s), so the server never "
        "closes a connection just as a client reuses it.")
    max_choices: int = Field(8, ge=1, description="Most choices (n x prompts) one request may ask for.")
    retry_after: Optional[int] = Field(None, ge=0, description="Retry-After seconds on 429 (default: the engine's hint).")
    models_file: Optional[str] = Field(None, description="TOML file of models to serve ([NAME] tables: source, revision, sha256, ...).")
    keep_alive: Optional[float] = Field(None, gt=0, description="Unload a model idle this many seconds; the next request loads it again.")
    max_loaded_models: Optional[int] = Field(None, ge=1, description="Most model versions loaded at once; the least recently used idle one unloads.")
    otlp_endpoint: Optional[str] = Field(
        None, description="OTLP/HTTP collector URL for OpenTelemetry traces (default: OTEL_EXPORTER_OTLP_ENDPOINT; unset = no traces).")

    ssl_certfile: Optional[str] = Field(None, description="TLS certificate (PEM) for HTTPS; needs --ssl-keyfile.")
    ssl_keyfile: Optional[str] = Field(None, description="TLS private key (PEM) for HTTPS; needs --ssl-certfile.")

    settings_customise_sources = _with_config_file("server")

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value):
        return _split_list(value)


class CacheSettings(BaseSettings):
    """The response cache (exact-match answers for deterministic requests). Config file table:
    ``[cache]``; env ``LLAMAWRAPPER_CACHE_ENABLED``, ``LLAMAWRAPPER_CACHE_URL``, ..."""

    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_CACHE_", extra="ignore")

    enabled: bool = Field(False, description="Answer repeated deterministic requests (temperature 0 or a seed) from the cache.")
    url: Optional[str] = Field(None, description="Where: sqlite:///path or redis://host:port/db (default: SQLite under the cache folder).")
    ttl: Optional[float] = Field(None, gt=0, description="Seconds an entry lives (default: until evicted).")
    max_entries: int = Field(10000, ge=1, description="Most entries kept; the least recently used go first.")
    max_mb: float = Field(256.0, gt=0, description="Most MiB of entries kept (SQLite).")

    settings_customise_sources = _with_config_file("cache")


class SecuritySettings(BaseSettings):
    """Keys, limits, audit and encryption at rest (``llamawrapper.security``). Config file table:
    ``[security]``; env ``LLAMAWRAPPER_STATE_URL``, ``LLAMAWRAPPER_ADMIN_KEY``, ..."""

    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    state_url: Optional[str] = Field(
        None, description="Where keys and limits live: sqlite:///path (default: keys.sqlite under the cache folder) or "
                          "redis://host:port/db (shared by every server process using it).")
    admin_key: Optional[str] = Field(None, repr=False, description="A bootstrap admin key (Authorization: Bearer); "
                                                                     "prefer the env var to the flag.")
    encryption_key: Optional[str] = Field(None, repr=False, description="32-byte key (base64 or hex) sealing the response "
                                                                          "cache with AES-GCM; prefer the env var or a key file.")
    encryption_key_file: Optional[str] = Field(None, description="File holding the encryption key.")
    retention_days: Optional[float] = Field(None, gt=0, description="Delete cached answers and audit lines older than this many days.")
    log_content: bool = Field(False, description="Write prompt and answer text (PII-redacted) to the audit log.")
    audit_file: Optional[str] = Field(None, description="The audit log (default: audit/audit.jsonl under the cache folder).")
    audit_requests: bool = Field(True, description="Audit every request, not only admin actions and refused keys.")

    settings_customise_sources = _with_config_file("security")


class RaySettings(BaseSettings):
    """``llamawrapper serve --ray``: the same server as a Ray Serve application
    (``llamawrapper.deploy``). Config file table: ``[ray]``; the cluster is ``RAY_ADDRESS``
    (unset = start a local one)."""

    model_config = SettingsConfigDict(env_prefix="LLAMAWRAPPER_", extra="ignore")

    ray: bool = Field(False, description="Serve through Ray Serve: replicas on a Ray cluster (RAY_ADDRESS, else a local one); needs the 'ray' extra.")
    replicas: Optional[int] = Field(None, ge=1, description="Fixed number of replicas, each one model host with --threads torch threads (1 unless autoscaling).")
    min_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling: fewest replicas.")
    max_replicas: Optional[int] = Field(None, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: Optional[float] = Field(
        None, gt=0, description="Autoscaling: ongoing requests per replica to aim for (default: half the engine batch).")
    routing: Literal["pow2", "prefix"] = Field(
        "pow2", description="How Ray picks a replica: 'pow2' (the less busy of two at random) or 'prefix' (the replica "
                            "that last saw the prompt's longest prefix, unless it is much busier).")

    settings_customise_sources = _with_config_file("ray")


def model_table(name: str) -> dict:
    """The config file's ``[models.NAME]`` table: ``plugins = [...]``, ``[models.NAME.plugin_options.PLUGIN]``,
    ``chat_template = "registered-name"``, ``cache = true|false``; and for loading: ``dtype``,
    ``quantization = "int8"|"int4"|"w8a8"``, ``[models.NAME.overrides]`` (config keys) and
    ``[models.NAME.adapters]`` (``name = "path/to/lora"``)."""
    return dict((_config_tables().get("models") or {}).get(name) or {})
