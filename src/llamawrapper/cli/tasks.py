"""Task commands: classify (sentiment, zero-shot with --labels), embed (JSON out), imagine
(text-to-image with a progress bar). The model argument is optional where the task has an
offline default (``minilm``): the first argument is taken as the model when it names one (an
alias, an existing path, or a hub id ``owner/name``) and more arguments follow."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .common import LlamaWrapperError, err, fail

_HUB = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def split_model(args: List[str], model: Optional[str]) -> tuple[Optional[str], List[str]]:
    """(model, texts) from ``[MODEL] TEXT...``; ``--model`` wins."""
    from ..models.registry import ALIASES

    if model is not None or len(args) < 2:
        return model, list(args)
    first = args[0]
    if first in ALIASES or Path(first).expanduser().exists() or _HUB.match(first):
        return first, list(args[1:])
    return None, list(args)


def _texts(texts: List[str], stdin: bool) -> List[str]:
    if stdin:
        texts = texts + [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        fail(ValueError("give at least one text (or --stdin with one text per line)"))
    return texts


@app.command()
def classify(args: List[str] = typer.Argument(..., metavar="[MODEL] TEXT...", help="An optional model, then the texts."),
             labels: Optional[str] = typer.Option(None, "--labels", help="Candidate labels a,b,c: zero-shot classification."),
             multi_label: bool = typer.Option(False, "--multi-label", help="Score every label on its own."),
             template: str = typer.Option("This example is {}.", "--template", help="Zero-shot hypothesis template."),
             model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: minilm)."),
             stdin: bool = typer.Option(False, "--stdin", help="Also read texts from stdin, one per line."),
             as_json: bool = typer.Option(False, "--json", help="One JSON object per text.")) -> None:
    """Classify texts: sentiment (or the model's own labels) without --labels, zero-shot with them."""
    from ..tasks import pipeline

    model, texts = split_model(args, model)
    texts = _texts(texts, stdin)
    try:
        if labels is not None:
            with pipeline("zero-shot-classification", model=model) as zs:
                results = zs(texts, candidate_labels=labels, multi_label=multi_label, hypothesis_template=template)
            rows = [{"text": r["sequence"], "label": r["labels"][0], "score": r["scores"][0], "labels": r["labels"],
                     "scores": r["scores"]} for r in results]
        else:
            with pipeline("text-classification", model=model) as clf:
                results = clf(texts, top_k=None)
            rows = [{"text": t, "label": r[0]["label"], "score": r[0]["score"], "labels": [d["label"] for d in r],
                     "scores": [d["score"] for d in r]} for t, r in zip(texts, results)]
    except LlamaWrapperError as exc:
        fail(exc)
    for row in rows:
        if as_json:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(f"{row['label']}\t{row['score']:.3f}\t{row['text']}\n")  # tab-separated, for cut/awk


@app.command()
def embed(args: List[str] = typer.Argument(..., metavar="[MODEL] TEXT...", help="An optional model, then the texts."),
          model: Optional[str] = typer.Option(None, "--model", "-m", help="Model (default: minilm)."),
          stdin: bool = typer.Option(False, "--stdin", help="Also read texts from stdin, one per line."),
          dimensions: Optional[int] = typer.Option(None, "--dimensions", help="Keep the leading N dimensions (renormalized).")) -> None:
    """Embed texts; prints JSON: {"model", "dimensions", "data": [{"index", "text", "embedding"}]}."""
    from ..tasks import pipeline

    model, texts = split_model(args, model)
    texts = _texts(texts, stdin)
    try:
        with pipeline("feature-extraction", model=model) as emb:
            vectors = emb(texts)
            name = emb.model.name
    except LlamaWrapperError as exc:
        fail(exc)
    if dimensions is not None:
        if not 1 <= dimensions <= vectors.shape[1]:
            fail(ValueError(f"--dimensions must be between 1 and {vectors.shape[1]}"))
        import numpy as np

        vectors = vectors[:, :dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    data = [{"index": i, "text": t, "embedding": [round(float(x), 7) for x in v]} for i, (t, v) in enumerate(zip(texts, vectors))]
    sys.stdout.write(json.dumps({"model": name, "dimensions": int(vectors.shape[1]), "data": data}) + "\n")


@app.command()
def imagine(model: str = typer.Argument(..., help="A diffusers pipeline: folder or hub id."),
            prompt: str = typer.Argument(..., help="What to draw."),
            output: Path = typer.Option(Path("image.png"), "--output", "-o", help="PNG file (with -n > 1: name-1.png, ...)."),
            negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="What to keep out of the image."),
            steps: int = typer.Option(25, "--steps", help="Denoising steps."),
            guidance_scale: float = typer.Option(7.5, "--guidance-scale", help="Classifier-free guidance strength."),
            width: Optional[int] = typer.Option(None, help="Width in pixels (default: the model's)."),
            height: Optional[int] = typer.Option(None, help="Height in pixels (default: the model's)."),
            seed: Optional[int] = typer.Option(None, help="Seed that makes the image reproducible."),
            n: int = typer.Option(1, "-n", help="Number of images."),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.")) -> None:
    """Generate images from a prompt with a diffusers pipeline; a progress bar per denoising step."""
    from ..tasks import pipeline

    try:
        with pipeline("text-to-image", model=model) as gen:
            images = gen(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                         width=width, height=height, seed=seed, num_images=n, progress=not quiet)
    except LlamaWrapperError as exc:
        fail(exc)
    paths = [output] if len(images) == 1 else [output.with_name(f"{output.stem}-{i + 1}{output.suffix or '.png'}")
                                               for i in range(len(images))]
    for image, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        if not quiet:
            err.print(f"wrote {path} ({image.width}x{image.height})", highlight=False)
