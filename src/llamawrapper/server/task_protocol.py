"""Pydantic models of the task endpoints: ``/v1/embeddings`` and ``/v1/images/generations`` in
OpenAI's shapes, and ``/v1/classify`` (the pipelines' shapes). Requests keep unknown fields
(logged, not fatal), like the chat protocol. Inputs are typed loosely here on purpose: the
library validates them so its 400s name the parameter the same way in Python and over HTTP."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel

from .protocol import _Open


class EmbeddingRequest(_Open):
    model: str
    input: Any  # str | [str]; token arrays are refused with a 400 naming 'input'
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ClassifyRequest(_Open):
    model: str
    input: Any  # str | [str]
    labels: Optional[Any] = None  # candidate labels: zero-shot; none: the model's own labels
    multi_label: bool = False
    hypothesis_template: Optional[str] = None


class Classification(BaseModel):
    index: int
    label: str  # the best label
    score: float
    labels: list[str]  # every label, best first
    scores: list[float]


class ClassificationList(BaseModel):
    id: str
    object: Literal["list"] = "list"
    model: str
    data: list[Classification]


class ImageRequest(_Open):
    prompt: Any
    model: Optional[str] = None  # default: the first text-to-image model served
    n: Any = 1
    size: Optional[str] = None  # "WIDTHxHEIGHT"; default: the model's native size
    response_format: Optional[str] = "b64_json"
    quality: Optional[str] = None
    style: Optional[str] = None
    user: Optional[str] = None
    negative_prompt: Optional[str] = None
    seed: Optional[Any] = None
    num_inference_steps: Any = 25
    guidance_scale: Any = 7.5


class Image(BaseModel):
    b64_json: str
    revised_prompt: Optional[str] = None


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]
