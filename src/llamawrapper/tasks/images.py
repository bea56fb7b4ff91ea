"""Text-to-image: a ``diffusers`` pipeline folder (``model_index.json``) loaded with
``DiffusionPipeline.from_pretrained``, fp16 on CUDA and fp32 on CPU, run on the executor thread.

One generation runs as one executor job (``get_executor().call``): diffusers' denoising loop is
a single call, so chat engines in the same process pause while an image is generated. A
progress callable gets ``(step, total)`` after every denoising step."""

from __future__ import annotations

import base64
import io
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

from ..engine.executor import get_executor
from ..errors import InvalidModelError, InvalidRequestError
from .base import TaskModel

MAX_IMAGES = 10
MAX_SIDE = 2048
MAX_STEPS = 500


class TextToImage(TaskModel):
    """A diffusers pipeline behind ``generate``."""

    task = "text-to-image"
    capabilities = frozenset({"images"})

    def __init__(self, folder: Path, name: str, device: Optional[str] = None) -> None:
        import torch

        try:
            from diffusers import DiffusionPipeline
        except ImportError as exc:  # pragma: no cover - an install without diffusers
            raise InvalidModelError("Text-to-image models need diffusers: pip install diffusers.") from exc
        self.folder, self.name = Path(folder), name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if str(self.device).startswith("cuda") else torch.float32
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        try:
            # low_cpu_mem_usage=False: the default builds the modules under accelerate's
            # init_empty_weights, which patches torch.nn.Module for the whole process; a chat model
            # loading in another thread at that moment got meta tensors (seen here, every time)
            self.module = DiffusionPipeline.from_pretrained(self.folder, dtype=dtype, low_cpu_mem_usage=False).to(self.device)
        except Exception as exc:
            raise InvalidModelError(f"could not load the diffusers pipeline in {self.folder}: {exc}") from exc
        self.module.set_progress_bar_config(disable=True)  # progress goes through our callback
        unet = getattr(self.module, "unet", None) or getattr(self.module, "transformer", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
        scale = getattr(self.module, "vae_scale_factor", 8)
        self.default_size = int(sample * scale) if isinstance(sample, int) else 512
        self.size_multiple = max(8, int(scale)) if isinstance(scale, int) else 8  # pipelines check for 8 themselves

    def check(self, n: int = 1, width: Optional[int] = None, height: Optional[int] = None,
              num_inference_steps: int = 25, guidance_scale: float = 7.5) -> tuple[int, int]:
        """Validate a request's numbers (``InvalidRequestError`` naming the parameter); returns (width, height)."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
            raise InvalidRequestError(f"'n' must be between 1 and {MAX_IMAGES}, got {n!r}.", param="n")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= MAX_STEPS:
            raise InvalidRequestError(f"'num_inference_steps' must be between 1 and {MAX_STEPS}.", param="num_inference_steps")
        if not isinstance(guidance_scale, (int, float)) or not 0 <= guidance_scale <= 50:
            raise InvalidRequestError("'guidance_scale' must be between 0 and 50.", param="guidance_scale")
        sides = []
        for label, side in (("width", width), ("height", height)):
            side = self.default_size if side is None else side
            if isinstance(side, bool) or not isinstance(side, int) or not self.size_multiple <= side <= MAX_SIDE \
                    or side % self.size_multiple:
                raise InvalidRequestError(f"'{label}' must be a multiple of {self.size_multiple} between "
                                          f"{self.size_multiple} and {MAX_SIDE}, got {side!r}.", param="size")
            sides.append(side)
        return sides[0], sides[1]

    def generate_future(self, prompt: str, negative_prompt: Optional[str] = None, n: int = 1,
                        num_inference_steps: int = 25, guidance_scale: float = 7.5, width: Optional[int] = None,
                        height: Optional[int] = None, seed: Optional[int] = None,
                        progress: Optional[Callable[[int, int], None]] = None) -> Future:
        """A future of ``n`` PIL images."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("'prompt' must be a non-empty string.", param="prompt")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise InvalidRequestError("'negative_prompt' must be a string.", param="negative_prompt")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequestError("'seed' must be an integer.", param="seed")
        width, height = self.check(n, width, height, num_inference_steps, guidance_scale)

        def run() -> list[Any]:
            import torch

            generator = torch.Generator("cpu").manual_seed(seed) if seed is not None else None

            def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
                if progress is not None:
                    progress(step + 1, num_inference_steps)
                return kwargs

            with torch.inference_mode():
                out = self.module(prompt, negative_prompt=negative_prompt, num_images_per_prompt=n,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  width=width, height=height, generator=generator, callback_on_step_end=on_step)
            return list(out.images)

        return get_executor().call(run)

    def generate(self, prompt: str, **options: Any) -> list[Any]:
        return self.generate_future(prompt, **options).result()

    def close(self) -> None:
        self.module = None


def png_base64(image: Any) -> str:
    """A PIL image as base64 PNG (the ``b64_json`` of OpenAI's images API)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
