"""Model-config overrides: user changes to a model's Hugging Face config applied before its
weights load (keep the first N layers, a longer context through RoPE scaling, another attention
implementation). Each key is checked by name and against the rest of the config, so a typo or
an inconsistent value fails with ``InvalidRequestError`` naming the key instead of loading a
silently different model."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Callable, Optional

from ..errors import InvalidRequestError

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope", "default")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequestError(f"Override '{key}' must be a positive integer; got {value!r}.", param=key)
    return value


def _num_hidden_layers(config: Any, value: Any) -> None:
    n = _positive_int("num_hidden_layers", value)
    have = config.num_hidden_layers
    if n > have:
        raise InvalidRequestError(
            f"Override 'num_hidden_layers'={n} is more than the model's {have} layers (only the first N can be kept).",
            param="num_hidden_layers",
        )
    config.num_hidden_layers = n
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n]


def _max_position_embeddings(config: Any, value: Any) -> None:
    config.max_position_embeddings = _positive_int("max_position_embeddings", value)


def _rope_scaling(config: Any, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidRequestError(f"Override 'rope_scaling' must be a mapping; got {value!r}.", param="rope_scaling")
    rope_type = value.get("rope_type", value.get("type"))
    if rope_type not in ROPE_TYPES:
        raise InvalidRequestError(
            f"Override 'rope_scaling' has rope_type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}.", param="rope_scaling"
        )
    factor = value.get("factor", 1.0)
    if rope_type != "default" and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1.0):
        raise InvalidRequestError(f"Override 'rope_scaling' needs a numeric factor >= 1; got {factor!r}.", param="rope_scaling")
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.update({k: v for k, v in value.items() if k != "type"})
    params["rope_type"] = rope_type
    if rope_type != "default":
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    config.rope_parameters = params


def _attn_implementation(config: Any, value: Any) -> None:
    if value not in ATTN_IMPLEMENTATIONS:
        raise InvalidRequestError(
            f"Override 'attn_implementation' must be one of {', '.join(ATTN_IMPLEMENTATIONS)}; got {value!r}.",
            param="attn_implementation",
        )
    config._attn_implementation = value


def _float_key(name: str, lo: float = 0.0) -> Callable[[Any, Any], None]:
    def apply(config: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= lo:
            raise InvalidRequestError(f"Override '{name}' must be a number > {lo}; got {value!r}.", param=name)
        setattr(config, name, float(value))

    return apply


# Order matters: rope_scaling reads max_position_embeddings as it was before a context change.
APPLIERS: dict[str, Callable[[Any, Any], None]] = {
    "num_hidden_layers": _num_hidden_layers,
    "rope_scaling": _rope_scaling,
    "max_position_embeddings": _max_position_embeddings,
    "attn_implementation": _attn_implementation,
    "rms_norm_eps": _float_key("rms_norm_eps"),
}

# Keys that change which weights exist (and so the quantized cache they belong to).
WEIGHT_KEYS = ("num_hidden_layers",)


def apply_overrides(config: Any, overrides: Optional[dict[str, Any]]) -> Any:
    """A copy of ``config`` with ``overrides`` applied; ``InvalidRequestError`` names a bad key."""
    if not overrides:
        return config
    if not isinstance(overrides, dict):
        raise InvalidRequestError(f"overrides must be a mapping of config keys; got {type(overrides).__name__}.", param="overrides")
    unknown = [k for k in overrides if k not in APPLIERS]
    if unknown:
        raise InvalidRequestError(
            f"Unknown config override '{unknown[0]}'; supported: {', '.join(APPLIERS)}.", param=str(unknown[0])
        )
    config = copy.deepcopy(config)
    for key in APPLIERS:
        if key in overrides:
            APPLIERS[key](config, overrides[key])
    _check_consistent(config, overrides)
    return config


def _check_consistent(config: Any, overrides: dict[str, Any]) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings")
    if "max_position_embeddings" in overrides and original and rope.get("rope_type", "default") != "default":
        if config.max_position_embeddings < original:
            raise InvalidRequestError(
                f"Override 'max_position_embeddings'={config.max_position_embeddings} is below the original "
                f"context {original} that 'rope_scaling' extends.", param="max_position_embeddings",
            )


def overrides_key(overrides: Optional[dict[str, Any]]) -> str:
    """A short stable key of the overrides that change the set of weights ('' if none do)."""
    relevant = {k: overrides[k] for k in WEIGHT_KEYS if overrides and k in overrides}
    if not relevant:
        return ""
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]


def effective_config(config: Any) -> dict[str, Any]:
    """The config as the model runs it, as plain JSON-ready data."""
    data = config.to_dict()
    data.pop("_name_or_path", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl:
        data["attn_implementation"] = impl
    return json.loads(json.dumps(data, default=str))
