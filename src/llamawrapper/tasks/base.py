"""What every task model shares: input validation with errors that name the parameter, futures
chained with a post-processing step, and the base class the server and ``pipeline`` see.

A task model is what ``load_served`` returns and what the pipelines wrap. It has ``task``
("embedding", "classification", "zero-shot-classification", "text-to-image"), ``name``,
``capabilities`` (a subset of {"embed", "classify", "zero-shot", "images"}) and ``close()``; each
capability is a method returning a ``concurrent.futures.Future`` so the HTTP layer can await it
without a thread per request."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Sequence, Union

from ..errors import InvalidRequestError

TextInput = Union[str, Sequence[str]]


def as_texts(inputs: Any, param: str = "input") -> tuple[list[str], bool]:
    """The inputs as a non-empty list of strings, and whether one string was given."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise InvalidRequestError(f"'{param}' is an empty list; give at least one text.", param=param)
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise InvalidRequestError(f"'{param}[{i}]' must be a string, got {type(text).__name__}.", param=param)
        return list(inputs), False
    raise InvalidRequestError(f"'{param}' must be a string or a list of strings, got {type(inputs).__name__}.", param=param)


def as_labels(labels: Any, param: str = "candidate_labels") -> list[str]:
    """Candidate labels as a non-empty list of distinct strings (``"a, b"`` splits on commas, as transformers does)."""
    if isinstance(labels, str):
        labels = [x.strip() for x in labels.split(",") if x.strip()]
    if not isinstance(labels, (list, tuple)) or not labels:
        raise InvalidRequestError(f"'{param}' must be a non-empty list of labels.", param=param)
    if not all(isinstance(x, str) and x.strip() for x in labels):
        raise InvalidRequestError(f"Every entry of '{param}' must be a non-empty string.", param=param)
    if len(set(labels)) != len(labels):
        raise InvalidRequestError(f"'{param}' repeats a label.", param=param)
    return list(labels)


def then(future: Future, fn: Callable[[Any], Any]) -> Future:
    """A future of ``fn(result)`` once ``future`` is done (errors pass through)."""
    out: Future = Future()

    def done(f: Future) -> None:
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
            return
        try:
            out.set_result(fn(f.result()))
        except BaseException as err:
            out.set_exception(err)

    future.add_done_callback(done)
    return out


def softmax(x: Any, axis: int = -1) -> Any:
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(x: Any) -> Any:
    import numpy as np

    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def quiet_loading() -> None:
    """No per-tensor progress bar from transformers: task models load in well under a second."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


class TaskModel:
    """Base of the served task models."""

    task: str = ""
    capabilities: frozenset[str] = frozenset()
    name: str = ""

    def close(self) -> None:
        """Release the model (its batcher stops; waiting requests fail)."""

    def batchers(self) -> list[Any]:
        """The micro-batchers behind this model (the server sets their ``observe`` for /metrics)."""
        return []

    def describe(self) -> dict:
        return {"name": self.name, "task": self.task, "capabilities": sorted(self.capabilities)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} task={self.task}>"
