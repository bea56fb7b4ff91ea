"""Fixtures for the task pipelines' tests (imported by tests/test_tasks_*.py): the real minilm
folder, and tiny random-weight models built into temporary folders with minilm's tokenizer —
a BERT encoder, a sentiment head, an NLI head, and a diffusers pipeline from small configs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 extracted into the user's cache (once)."""
    from llamawrapper.models import registry
    from llamawrapper.tasks.extract import extract_zip

    return extract_zip(registry.resolve("minilm"), progress=False)


def _tiny_bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                      max_position_embeddings=128, **extra)


def _save_tiny(out: Path, model, minilm_folder: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(minilm_folder)
    tok.model_max_length = 128
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory, minilm_folder) -> Path:
    import torch
    from transformers import BertModel

    torch.manual_seed(1)
    return _save_tiny(tmp_path_factory.mktemp("tiny-encoder"), BertModel(_tiny_bert_config()), minilm_folder)


@pytest.fixture(scope="session")
def tiny_sentiment_dir(tmp_path_factory, minilm_folder) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(2)
    config = _tiny_bert_config(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    return _save_tiny(tmp_path_factory.mktemp("tiny-sentiment"), BertForSequenceClassification(config), minilm_folder)


@pytest.fixture(scope="session")
def tiny_nli_dir(tmp_path_factory, minilm_folder) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    labels = {0: "contradiction", 1: "neutral", 2: "entailment"}
    config = _tiny_bert_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    return _save_tiny(tmp_path_factory.mktemp("tiny-nli"), BertForSequenceClassification(config), minilm_folder)


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tmp_path_factory, minilm_folder) -> Path:
    return build_tiny_diffusers(tmp_path_factory.mktemp("tiny-diffusion"), minilm_folder)


def build_tiny_diffusers(out: Path, tokenizer_folder: Path) -> Path:
    """A Stable Diffusion pipeline with a 2-block UNet and VAE and a 2-layer CLIP text encoder
    (random weights, minilm's tokenizer) saved into ``out``: 64x64 images, milliseconds per step
    (also used by bench/tasks.py)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(4)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                                bos_token_id=101, eos_token_id=102, pad_token_id=0))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    tokenizer.model_max_length = 77
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def assert_same_image(x, y) -> None:
    """The same generation, up to float rounding: the executor's torch thread count may differ
    from the caller's (or another process's), which sums in another order and can move a pixel
    by a level or two. A different seed or prompt changes the image wholesale."""
    import numpy as np

    a, b = np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 3 and diff.mean() <= 0.5, (int(diff.max()), float(diff.mean()))
