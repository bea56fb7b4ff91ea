"""Text-to-image: a ``diffusers`` pipeline folder (``model_index.json``) loaded with
``DiffusionPipeline.from_pretrained``, fp16 on CUDA and fp32 on CPU, run on the executor thread.

A generation must not stall chat: the executor runs one bounded unit of torch work at a time
and an image takes seconds to minutes. So a Stable Diffusion pipeline is driven step by step
here (``_Generation``): its denoising loop, written out as diffusers' own ``__call__`` runs it
(prompt encoding, a per-generation copy of the scheduler, one UNet call + guidance + scheduler
step per executor step, then the VAE decode), so chat engines and task batchers get their turn
between two denoising steps. The images equal diffusers' own call with the same seed (tested).
Other pipeline classes (SDXL, Flux, ...) run as one executor job, pausing chat meanwhile.
A progress callable gets ``(step, total)`` after every denoising step."""

from __future__ import annotations

import base64
import copy
import io
import logging
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

from ..engine.executor import get_executor
from ..errors import InvalidModelError, InvalidRequestError
from .base import TaskModel

log = logging.getLogger("llamawrapper.tasks")

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
        self.stepwise = type(self.module).__name__ == "StableDiffusionPipeline"  # the loop _Generation writes out
        self.denoiser = _Denoiser(name)

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

        if self.stepwise:
            return self.denoiser.submit(_Generation(self.module, prompt, negative_prompt, n, num_inference_steps,
                                                    guidance_scale, width, height, seed, progress))

        def run() -> list[Any]:  # any other pipeline class: diffusers' own loop, as one executor job
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
        self.denoiser.close()
        self.module = None


class _Generation:
    """One Stable Diffusion generation as a sequence of bounded steps: ``advance()`` runs the
    next one (prepare, each denoising step, decode) and returns the images after the last.
    Mirrors ``StableDiffusionPipeline.__call__`` (diffusers 0.3x-0.4x) without IP-adapters,
    guidance rescale or LoRA scale, which this API does not expose."""

    def __init__(self, pipe: Any, prompt: str, negative_prompt: Optional[str], n: int, steps: int,
                 guidance_scale: float, width: int, height: int, seed: Optional[int],
                 progress: Optional[Callable[[int, int], None]]) -> None:
        self.pipe, self.prompt, self.negative_prompt, self.n, self.steps = pipe, prompt, negative_prompt, n, steps
        self.guidance_scale, self.width, self.height, self.seed, self.progress = guidance_scale, width, height, seed, progress
        self.future: Future = Future()
        self.index = -1  # -1: not prepared; 0..len(timesteps)-1: the next denoising step

    def advance(self) -> Optional[list[Any]]:
        import torch

        with torch.inference_mode():
            if self.index < 0:
                self._prepare()
            elif self.index < len(self.timesteps):
                self._denoise(self.index)
            else:
                return self._decode()
        self.index += 1
        return None

    def _prepare(self) -> None:
        import torch
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        self.device = pipe._execution_device
        self.generator = torch.Generator("cpu").manual_seed(self.seed) if self.seed is not None else None
        self.cfg = self.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
        embeds, negative = pipe.encode_prompt(self.prompt, self.device, self.n, self.cfg, self.negative_prompt)
        self.embeds = torch.cat([negative, embeds]) if self.cfg else embeds
        self.scheduler = copy.deepcopy(pipe.scheduler)  # schedulers keep per-loop state; generations may queue
        self.timesteps, _ = retrieve_timesteps(self.scheduler, self.steps, self.device)
        shape = (self.n, pipe.unet.config.in_channels, self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=self.generator, device=self.device, dtype=self.embeds.dtype)
        self.latents = latents * self.scheduler.init_noise_sigma
        self.extra = pipe.prepare_extra_step_kwargs(self.generator, 0.0)
        self.timestep_cond = None
        if pipe.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(self.n)
            self.timestep_cond = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=self.device, dtype=self.latents.dtype)

    def _denoise(self, i: int) -> None:
        import torch

        t = self.timesteps[i]
        model_input = torch.cat([self.latents] * 2) if self.cfg else self.latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        noise = self.pipe.unet(model_input, t, encoder_hidden_states=self.embeds, timestep_cond=self.timestep_cond,
                               return_dict=False)[0]
        if self.cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + self.guidance_scale * (text - uncond)
        self.latents = self.scheduler.step(noise, t, self.latents, **self.extra, return_dict=False)[0]
        if self.progress is not None:
            self.progress(i + 1, len(self.timesteps))

    def _decode(self) -> list[Any]:
        pipe = self.pipe
        image = pipe.vae.decode(self.latents / pipe.vae.config.scaling_factor, return_dict=False, generator=self.generator)[0]
        image, nsfw = pipe.run_safety_checker(image, self.device, self.embeds.dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        return list(pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize))


class _Denoiser:
    """The executor worker of one text-to-image model: each ``step()`` advances the oldest
    waiting generation by one unit (generations run one after the other, chat steps in between)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._queue: deque[_Generation] = deque()
        self._attached = self._closed = False

    def submit(self, generation: _Generation) -> Future:
        executor = get_executor()
        with self._lock:
            if self._closed:
                generation.future.set_exception(RuntimeError(f"the {self.name} model is closed"))
                return generation.future
            self._queue.append(generation)
            if not self._attached:
                executor.attach(self)
                self._attached = True
        executor.wake()
        return generation.future

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue)

    def step(self) -> None:
        with self._lock:
            if not self._queue:
                return
            generation = self._queue[0]
        try:
            images = generation.advance()
        except Exception as exc:  # this generation fails; the next ones go on
            self._finish(generation)
            generation.future.set_exception(exc)
            return
        if images is not None:
            self._finish(generation)
            generation.future.set_result(images)

    def on_idle(self) -> None:
        pass

    def fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._queue = list(self._queue), deque()
        for generation in pending:
            if not generation.future.done():
                generation.future.set_exception(exc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.fail_all(RuntimeError(f"the {self.name} model was unloaded"))
        get_executor().detach(self)

    def _finish(self, generation: _Generation) -> None:
        with self._lock:
            if generation in self._queue:
                self._queue.remove(generation)


def png_base64(image: Any) -> str:
    """A PIL image as base64 PNG (the ``b64_json`` of OpenAI's images API)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
