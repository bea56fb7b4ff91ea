"""Zero-shot classification on a chat model: a constrained choice over the labels.

The chat model is asked which label fits the text (its own chat template, one user turn) and each
label's answer is scored by its log-probability as the reply: the sum of the label tokens'
log-probabilities after the prompt, computed in one padded forward over prompt + label for all
labels. Single-label scores are the softmax of those sums over the labels (the model's choice,
renormalized to the allowed answers); with ``multi_label`` each label's score is the probability of
that exact answer. The hypothesis template does not apply: the question replaces it.

The forward runs on the executor thread (``get_executor().call``), like every torch call in a
serving process."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Optional

from ..engine.executor import get_executor
from .base import TaskModel, softmax
from .zero_shot import ranked

QUESTION = "Text: {text}\n\nWhich one of these labels fits the text best: {labels}?\nAnswer with the label only."


class ChatChoice(TaskModel):
    """A ``LlamaWrapper`` seen as a zero-shot classifier."""

    task = "zero-shot-classification"
    capabilities = frozenset({"zero-shot"})

    def __init__(self, llm: Any, owns: bool = True) -> None:
        self.llm, self.owns, self.name = llm, owns, llm.name

    def label_logprobs(self, text: str, labels: list[str]) -> list[float]:
        """Sum of log-probabilities of each label as the assistant's reply (call on the executor)."""
        import torch

        prompt = self.llm.chat_prompt_ids([{"role": "user", "content": QUESTION.format(text=text, labels=", ".join(labels))}])
        answers = [self.llm.tokenize(label) for label in labels]
        width = len(prompt) + max(len(a) for a in answers)
        pad = self.llm.tokenizer.pad_token_id if self.llm.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(labels), width), pad, dtype=torch.long)
        mask = torch.zeros((len(labels), width), dtype=torch.long)
        for row, answer in enumerate(answers):
            seq = prompt + answer
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        with torch.inference_mode():
            logits = self.llm.loaded.model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        out = []
        for row, answer in enumerate(answers):
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
            out.append(float(logp[row, positions, torch.tensor(answer)].sum()))
        return out

    def zero_shot_future(self, texts: list[str], labels: list[str], multi_label: bool = False,
                         hypothesis_template: Optional[str] = None) -> Future:
        """A future of one ``{"sequence", "labels", "scores"}`` per text."""
        import math

        def run() -> list[dict]:
            out = []
            for text in texts:
                sums = self.label_logprobs(text, labels)
                scores = [math.exp(s) for s in sums] if multi_label else list(softmax(sums))
                names, values = ranked(labels, scores)
                out.append({"sequence": text, "labels": names, "scores": values})
            return out

        return get_executor().call(run)

    def close(self) -> None:
        if self.owns:
            self.llm.close()
