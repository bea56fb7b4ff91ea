"""Loading a model and its tokenizer from a ``ModelSource``.

A GGUF file is converted once (dequantized) into a safetensors folder in the cache, written
under a temporary name and renamed into place, with a manifest that records the source's
sha256; a later load reads that folder, and a source whose hash no longer matches is
converted again. Hub ids go through ``huggingface_hub`` (which honours ``HF_HUB_OFFLINE``)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .cachefs import atomic_folder
from ..errors import InvalidModelError, LlamaWrapperError, ModelNotFoundError, UnsupportedModelError
from .registry import ModelSource, cache_dir_for

log = logging.getLogger("llamawrapper.loading")

DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED_GGUF_ARCHS = ("llama", "mistral", "qwen2")
MANIFEST_VERSION = 1


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    source: ModelSource
    folder: Path
    manifest: dict = field(default_factory=dict)
    quantization: Optional[str] = None  # "int8" | "int4" | "w8a8" | None
    overrides: dict = field(default_factory=dict)


def file_sha256(path: Path, progress: Any = None) -> str:
    h = hashlib.sha256()
    task = progress.add_task(f"hashing {path.name}", total=path.stat().st_size) if progress else None
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
            if progress:
                progress.advance(task, len(chunk))
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"llamawrapper": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from rich.console import Console

    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not enabled, transient=False,
    )


def check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise InvalidModelError(f"{path} is not a GGUF model file (bad magic bytes).")


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; ``InvalidModelError`` if it is not one.
    Slow (the reader parses all metadata in Python, ~10 s for smollm2's vocabulary, holding the
    GIL): only called when converting."""
    check_gguf_magic(path)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field_ = reader.fields["general.architecture"]
        return bytes(field_.parts[field_.data[0]]).decode()
    except Exception as exc:  # truncated or malformed file
        raise InvalidModelError(f"{path} is not a readable GGUF file: {exc}") from exc


def read_manifest(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def cached_build(source: ModelSource, build: Any, what: str, progress: bool = True, force: bool = False) -> Path:
    """The cache folder made from ``source``'s file by ``build(tmp, bar) -> manifest fields``:
    reused while the file's sha256 matches the manifest, else built again under a temporary name
    and renamed into place (under a file lock, so concurrent callers build it once)."""
    from filelock import FileLock

    path = source.path
    assert path is not None
    dest = cache_dir_for(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _progress(progress) as bar, FileLock(str(dest) + ".lock"):
        sha = file_sha256(path, bar)
        manifest = read_manifest(dest)
        if not force and manifest and manifest.get("source_sha256") == sha and (dest / "config.json").is_file():
            return dest  # a valid build: nothing of the source is read again
        if manifest and not force:
            log.warning("cached %s of %s does not match the source (hash changed); building it again", what, path)
        with atomic_folder(dest) as tmp:
            fields = build(tmp, bar)
            manifest = {"manifest_version": MANIFEST_VERSION, "name": source.display_name, "source": str(path),
                        "source_sha256": sha, "source_size": path.stat().st_size, "dtype": "float32",
                        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
                        **fields}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def convert_gguf(source: ModelSource, progress: bool = True, force: bool = False) -> Path:
    """Ensure the converted folder for a GGUF source exists and matches the file; return it."""
    assert source.path is not None
    check_gguf_magic(source.path)

    def build(tmp: Path, bar: Any) -> dict:
        with _one_metadata_parse():
            arch = gguf_architecture(source.path)  # slow: only when converting
            if arch not in SUPPORTED_GGUF_ARCHS:
                raise UnsupportedModelError(f"GGUF architecture '{arch}' is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHS)}.")
            _write_conversion(source.path, tmp, bar)
        return {"architecture": arch}

    return cached_build(source, build, "conversion", progress, force)


_METADATA_PARSE_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_metadata_parse():
    """Within the block, every ``gguf.GGUFReader`` of one file is the same reader. A conversion
    reads the file four times (its architecture here; transformers' config, tokenizer and
    weights), and each reader parses all metadata in Python: ~8 s for smollm2's 49,152 tokens
    and 48,900 merges. The reader is only read from (its arrays are memory-mapped). The patch
    of the ``gguf`` module is process-wide, so conversions in two threads take turns (two
    overlapping patches would restore each other's wrapper and leave it in place)."""
    import gguf

    with _METADATA_PARSE_LOCK:
        real = gguf.GGUFReader
        readers: dict[tuple[str, str], Any] = {}

        def shared(path: Any, mode: str = "r") -> Any:
            key = (str(path), mode)
            if key not in readers:
                readers[key] = real(path, mode)
            return readers[key]

        gguf.GGUFReader = shared  # transformers imports it from the module at each call
        try:
            yield
        finally:
            gguf.GGUFReader = real


def _write_conversion(gguf_path: Path, out: Path, bar: Any) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    task = bar.add_task("dequantizing GGUF", total=3)
    folder, name = str(gguf_path.parent), gguf_path.name
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    own_bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(own_bar, disable=True)  # ours (rich) reports this stage
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise InvalidModelError(f"could not read the GGUF model {gguf_path}: {exc}") from exc
    finally:
        gguf_utils.tqdm = own_bar
    bar.advance(task)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # a dequantized model must not keep the GGUF marker
    config.pop("_name_or_path", None)
    fresh_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(fresh_config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    if quantized.generation_config is not None:
        model.generation_config = quantized.generation_config
    del quantized
    bar.advance(task)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    bar.advance(task)


def resolve_folder(source: ModelSource, progress: bool = True) -> Path:
    """The local Hugging Face folder to load ``source`` from (converting or fetching as needed)."""
    if source.kind == "gguf":
        return convert_gguf(source, progress=progress)
    if source.kind == "zip":  # a zipped Hugging Face folder (the task models' default): extracted once
        from ..tasks.extract import extract_zip

        return extract_zip(source, progress=progress)
    if source.kind == "dir":
        if not (source.path / "config.json").is_file():
            raise InvalidModelError(f"{source.path} is not a Hugging Face model folder (no config.json).")
        return source.path
    return hub_snapshot(source)


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def hub_snapshot(source: ModelSource, patterns: list[str] = HUB_PATTERNS) -> Path:
    """The local folder of a hub model (downloaded once into the Hugging Face cache); a clear
    ``ModelNotFoundError`` when it does not exist or cannot be had offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(source.repo_id, revision=source.revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelNotFoundError(f"Hub model '{source.name}' does not exist: {exc}") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(
            f"Hub model '{source.name}' is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). Download it once with network access, or pass a local folder."
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(f"Could not fetch hub model '{source.name}': {exc}") from exc


def load(source: ModelSource, dtype: str = "float32", device: str = "cpu", progress: bool = True,
         quantization: Optional[str] = None, overrides: Optional[dict] = None) -> LoadedModel:
    """Load model and tokenizer for ``source`` in ``dtype`` on ``device``, with its config changed
    by ``overrides`` and its weights quantized (``"int8"``/``"int4"`` weight-only, ``"w8a8"``) if asked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import quantization as quant
    from ..engine.runner import SUPPORTED_MODEL_TYPES
    from .overrides import apply_overrides, overrides_key

    if dtype not in DTYPES:
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"Invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}.", param="dtype")
    from ..tasks.kinds import refuse_task_model

    quantization = quant.check_quantization(quantization)
    refuse_task_model(source)  # a task model (an alias with a task, a classifier folder) names its pipeline
    folder = resolve_folder(source, progress=progress)
    refuse_task_model(source, folder)
    if not progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise InvalidModelError(f"{folder} has no readable model config: {exc}") from exc
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"Architecture '{getattr(config, 'model_type', None)}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    config = apply_overrides(config, overrides)
    manifest = read_manifest(folder) or {}
    kwargs: dict[str, Any] = {"config": config, "device_map": None}
    if getattr(config, "_attn_implementation", None):
        kwargs["attn_implementation"] = config._attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if quantization and str(device).startswith("cuda"):
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), quantization_config=quant.bitsandbytes_config(quantization),
                **{**kwargs, "device_map": device})
        elif quantization:
            load_float = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)  # noqa: E731
            model = quant.load_or_quantize(folder, config, quantization, manifest, load_float, overrides_key(overrides))
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), **kwargs)
    except LlamaWrapperError:
        raise
    except Exception as exc:
        raise InvalidModelError(f"could not load the model in {folder}: {exc}") from exc
    if not (quantization and str(device).startswith("cuda")):
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, source.display_name, source, folder, manifest, quantization, dict(overrides or {}))
