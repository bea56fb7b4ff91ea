"""Route handlers of the task models: ``POST /v1/embeddings``, ``POST /v1/classify``,
``POST /v1/images/generations``. Thin, like the chat routes: pick the model through the host
(a lease held until the answer is ready), check it can do what the endpoint asks (a 400 naming
``model`` otherwise), hand the inputs to the task model and await its future — concurrent
requests meet in the model's micro-batcher on the executor thread. Each request is counted in
``/metrics`` under the served name and version that answered (``_task``), and the model's
micro-batchers report their batch sizes there."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import time
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..errors import InvalidRequestError
from ..tasks.base import as_labels, as_texts
from ..tasks.kinds import a_model
from . import protocol as P
from . import task_protocol as T
from .routes import _log_unknown, _rid, _state

router = APIRouter()

_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
NEEDS = {"embed": "an embedding model (e.g. 'minilm')",
         "classify": "a classification model or a sentence encoder (e.g. 'minilm')",
         "zero-shot": "an NLI model or a sentence encoder (e.g. 'minilm') to score candidate labels",
         "images": "a text-to-image model (a diffusers pipeline)"}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


async def _lease(request: Request, model: Optional[str], capability: str, endpoint: str) -> Any:
    """A host lease on ``model``, released again with a 400 when the model cannot do ``capability``."""
    lease = await _state(request).host.acquire_async(model)
    if capability == "zero-shot" and getattr(lease.model, "capabilities", None) is None and hasattr(lease.model, "chat_prompt_ids"):
        from ..tasks.chat_choice import ChatChoice  # a chat model: constrained choice over the labels

        lease.model = ChatChoice(lease.model, owns=False)
    if capability not in getattr(lease.model, "capabilities", frozenset()):
        task = getattr(lease.model, "task", "chat")
        lease.release()
        raise InvalidRequestError(f"The model '{model}' is {a_model(task)}; {endpoint} needs {NEEDS[capability]}.", param="model")
    return lease


@contextlib.asynccontextmanager
async def _task(request: Request, model: Optional[str], capability: str, endpoint: str, inputs: int) -> AsyncIterator[Any]:
    """``_lease``, with the request counted in the metrics (outcome, inputs, latency) under the
    version that answers, and that version's batch sizes recorded."""
    lease = await _lease(request, model, capability, endpoint)
    metrics, served = _state(request).metrics, (lease.name, lease.version)
    for batcher in lease.model.batchers() if hasattr(lease.model, "batchers") else ():
        batcher.observe = metrics.batch_observer(served)
    start, ok = time.perf_counter(), False
    try:
        with lease:
            yield lease
        ok = True
    finally:
        metrics.observe_task(served, capability, time.perf_counter() - start, inputs, ok)


# -- embeddings ---------------------------------------------------------------------------------------
@router.post("/v1/embeddings", response_model=T.EmbeddingList, responses=_ERRORS)
async def embeddings(body: T.EmbeddingRequest, request: Request) -> Response:
    _log_unknown(body, request)
    if isinstance(body.input, list) and body.input and all(isinstance(x, int) or isinstance(x, list) for x in body.input):
        raise InvalidRequestError("Token-id arrays are not accepted as 'input'; send text.", param="input")
    texts, _ = as_texts(body.input, "input")
    async with _task(request, body.model, "embed", "/v1/embeddings", len(texts)) as lease:
        full = lease.model.dimensions
        dims = full if body.dimensions is None else body.dimensions
        if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= full:
            raise InvalidRequestError(f"'dimensions' must be between 1 and {full} for '{body.model}', got {dims!r}.",
                                      param="dimensions")
        vectors, counts = await asyncio.wrap_future(lease.model.embed_future(texts))
    if dims < full:  # keep the leading dimensions and normalize again (Matryoshka-style shortening)
        import numpy as np

        vectors = vectors[:, :dims]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if body.encoding_format == "base64":
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vectors)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
    tokens = int(sum(counts))
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# -- classification -----------------------------------------------------------------------------------
@router.post("/v1/classify", response_model=T.ClassificationList, responses=_ERRORS)
async def classify(body: T.ClassifyRequest, request: Request) -> Response:
    _log_unknown(body, request)
    texts, _ = as_texts(body.input, "input")
    labels = None if body.labels is None else as_labels(body.labels, "labels")
    template = body.hypothesis_template
    if template is not None and "{}" not in template:
        raise InvalidRequestError("'hypothesis_template' must contain '{}' where the label goes.", param="hypothesis_template")
    capability = "classify" if labels is None else "zero-shot"
    async with _task(request, body.model, capability, "/v1/classify" + (" with labels" if labels else ""), len(texts)) as lease:
        if labels is None:
            ranked = await asyncio.wrap_future(lease.model.scores_future(texts))
            results = [([d["label"] for d in r], [d["score"] for d in r]) for r in ranked]
        else:
            future = lease.model.zero_shot_future(texts, labels, body.multi_label, template or "This example is {}.")
            results = [(r["labels"], r["scores"]) for r in await asyncio.wrap_future(future)]
    data = [{"index": i, "label": names[0], "score": scores[0], "labels": names, "scores": scores}
            for i, (names, scores) in enumerate(results)]
    return JSONResponse({"id": f"classify-{_rid(request)}", "object": "list", "model": body.model, "data": data})


# -- images -------------------------------------------------------------------------------------------
@router.post("/v1/images/generations", response_model=T.ImagesResponse, responses=_ERRORS)
async def images_generations(body: T.ImageRequest, request: Request) -> Response:
    _log_unknown(body, request)
    if body.response_format not in (None, "b64_json"):
        raise InvalidRequestError("Only response_format 'b64_json' is supported (this server keeps no image URLs).",
                                  param="response_format")
    for name in ("quality", "style"):
        if getattr(body, name) not in (None, "auto", "standard"):
            raise InvalidRequestError(f"'{name}' is not supported by local diffusion models.", param=name)
    if not isinstance(body.prompt, str) or not body.prompt.strip():
        raise InvalidRequestError("'prompt' must be a non-empty string.", param="prompt")
    width = height = None
    if body.size is not None and body.size != "auto":
        match = _SIZE.match(body.size)
        if not match:
            raise InvalidRequestError(f"'size' must look like '512x512', got {body.size!r}.", param="size")
        width, height = int(match.group(1)), int(match.group(2))
    model = body.model or _first_image_model(request)
    async with _task(request, model, "images", "/v1/images/generations", body.n) as lease:
        future = lease.model.generate_future(body.prompt, negative_prompt=body.negative_prompt, n=body.n,
                                             num_inference_steps=body.num_inference_steps,
                                             guidance_scale=body.guidance_scale, width=width, height=height, seed=body.seed)
        images = await asyncio.wrap_future(future)
    from ..tasks.images import png_base64

    encoded = await run_in_threadpool(lambda: [png_base64(img) for img in images])
    return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": None} for b in encoded]})


def _first_image_model(request: Request) -> str:
    served = [m["id"] for m in _state(request).host.served() if m.get("task") == "text-to-image"]
    if not served:
        raise InvalidRequestError("No text-to-image model is served here; name one in 'model'.", param="model")
    return served[0]
