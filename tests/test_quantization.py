"""Weight-only quantization: module numerics, the on-disk cache, the CUDA path's skip, and
(slow) the quality gate on the real model."""

from __future__ import annotations

import json

import pytest
import torch

from llamawrapper import LlamaWrapper
from llamawrapper.errors import InvalidRequestError
from llamawrapper.models import quantization as quant


def test_int8_linear_close_to_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=True)
    x = torch.randn(3, 5, 128)
    q = quant.Int8Linear.from_linear(lin)
    ref = lin(x)
    err = (q(x).float() - ref).abs().max() / ref.abs().max()
    assert q(x).shape == ref.shape and err < 0.03


def test_int4_linear_close_to_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(2, 128)
    ref = lin(x)
    err = (quant.Int4Linear.from_linear(lin)(x).float() - ref).abs().max() / ref.abs().max()
    assert err < 0.15


def test_w8a8_smoothing_moves_activation_outliers_into_the_weights():
    """Linears reading one input share their smoothing factors (so they still fuse); with a few
    input channels 40x larger than the rest, smoothing cuts w8a8's error against the float
    Linear by more than 30 %."""
    from llamawrapper.models.smoothing import smoothing_factors

    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(64, 128)
            with torch.no_grad():
                self.emb.weight[:, [3, 70]] *= 40  # outlier channels, as in real decoders
            self.attn = torch.nn.Module()
            self.attn.q, self.attn.k = torch.nn.Linear(128, 96), torch.nn.Linear(128, 32)
            self.out = torch.nn.Linear(96, 16)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.emb(ids)
            return self.out(self.attn.q(x)) + self.attn.k(x).sum()

    toy = Toy()
    targets = quant._targets(toy)
    factors = smoothing_factors(toy, targets, torch.arange(64)[None])
    assert set(factors) == {toy.attn.q, toy.attn.k, toy.out}
    assert torch.equal(factors[toy.attn.q], factors[toy.attn.k]) and factors[toy.attn.q][3] < factors[toy.attn.q][0]
    x = toy.emb(torch.arange(64))
    with torch.no_grad():
        ref = toy.attn.q(x)
        plain = quant.W8A8Linear.from_linear(toy.attn.q)(x)
        smoothed = quant.W8A8Linear.from_linear(toy.attn.q, factors[toy.attn.q])(x)
    err = lambda y: ((y - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()  # noqa: E731
    assert err(smoothed) < 0.7 * err(plain), (err(smoothed), err(plain))


def test_int4_recovers_weights_on_a_32_grid():
    # weights already on a Q4_1-style grid (per block of 32: scale * q + min) come back nearly exactly
    torch.manual_seed(0)
    q = torch.randint(0, 16, (64, 128)).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # each block spans the full range, as a min/max quantizer makes it
    scale = torch.rand(64, 4, 1) * 0.01 + 0.001
    lo = torch.randn(64, 4, 1) * 0.01
    w = (q.view(64, 4, 32) * scale + lo).view(64, 128)
    qi, sz = quant.quantize_int4_groups(w, 32)
    back = ((qi.view(64, 4, 32).float() - 8) * sz[:, :, 0].T.float().unsqueeze(2) + sz[:, :, 1].T.float().unsqueeze(2)).view(64, 128)
    assert (back - w).abs().max() < 2e-3


def test_bad_quantization_is_typed(tiny_model_dir):
    with pytest.raises(InvalidRequestError) as info:
        LlamaWrapper.load(str(tiny_model_dir), quantization="int3", progress=False)
    assert info.value.param == "quantization" and "w8a8" in str(info.value)
    with pytest.raises(InvalidRequestError) as info:  # FBGEMM is a CPU library: refused by name on CUDA
        quant.bitsandbytes_config("w8a8")
    assert info.value.param == "quantization" and "CPU" in str(info.value)


def test_w8a8_weights_use_the_range_this_cpu_multiplies_without_saturating():
    """The weights reach ``w8a8_weight_max`` (127 only with AVX512-VNNI, else 63), and a row whose u8
    activations and weights are all at their largest (the worst case for AVX2's saturating int16
    pairs) still gives the float result. A wrong range fails here: 127 on FBGEMM's AVX2 path
    (``FBGEMM_ENABLE_INSTRUCTIONS=AVX2``) gave 0.8 % of the right value."""
    top = quant.w8a8_weight_max()
    assert top in (127, 63) and (top == 127) <= torch.cpu._is_vnni_supported()
    lin = torch.nn.Linear(256, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(0.5, 2.0, 8)[:, None].expand(8, 256))
    q = quant.W8A8Linear.from_linear(lin)
    assert q.weight.abs().max().item() == top
    x = torch.ones(2, 256)
    x[1] *= -3.0
    ref = lin(x)
    assert torch.allclose(q(x), ref, rtol=0.02), (q(x), ref)


def test_int4_weights_cached_on_another_kind_of_cpu_are_quantized_again(tiny_model_dir, lw_home):
    """torch packs int4 weights per CPU kernel set (AVX512, AVX2, default). A cache written by a
    process on another set (here torch's default kernels, through ATEN_CPU_CAPABILITY) is not
    read as this one's weights: the load quantizes again and answers as a fresh quantization."""
    import os
    import subprocess
    import sys

    here = torch.backends.cpu.get_cpu_capability()
    if here == "DEFAULT":
        pytest.skip("this CPU runs torch's default kernels already")
    folder = quant.cache_folder(tiny_model_dir, "int4")
    fresh = LlamaWrapper.load(str(tiny_model_dir), quantization="int4", progress=False)
    try:
        expected = fresh.generate("Hello there", max_tokens=8, temperature=0).token_ids
    finally:
        fresh.close()
    assert json.loads((folder / "manifest.json").read_text())["int4_layout"] == here
    import shutil

    shutil.rmtree(folder)
    # the other process does not build the C++ kernels for the default kernel set (~2 min of g++ in
    # an empty home): the int4 cache it writes is torch's packing, which does not depend on them
    script = ("import sys, torch; from llamawrapper import LlamaWrapper; from llamawrapper.engine import kernels; "
              "kernels._failed = 'not built in this test'; "
              "llm = LlamaWrapper.load(sys.argv[1], quantization='int4', progress=False); llm.close(); "
              "print(torch.backends.cpu.get_cpu_capability())")
    out = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})
    assert out.returncode == 0 and out.stdout.split()[-1] == "DEFAULT", out.stderr[-2000:]
    assert json.loads((folder / "manifest.json").read_text())["int4_layout"] == "DEFAULT"
    assert not quant.cache_is_valid(folder, "int4", quant.fingerprint(tiny_model_dir, {}))
    again = LlamaWrapper.load(str(tiny_model_dir), quantization="int4", progress=False)
    try:
        assert again.generate("Hello there", max_tokens=8, temperature=0).token_ids == expected
    finally:
        again.close()
    assert json.loads((folder / "manifest.json").read_text())["int4_layout"] == here


@pytest.mark.parametrize("mode", ["int8", "int4", "w8a8"])
def test_quantized_load_is_cached_and_runs(tiny_model_dir, lw_home, monkeypatch, mode):
    llm = LlamaWrapper.load(str(tiny_model_dir), quantization=mode, progress=False)
    try:
        assert llm.info()["quantization"] == mode
        assert llm.info()["dtype"] == ("float32" if mode == "w8a8" else "bfloat16")  # the activations' dtype
        first = llm.generate("Hello there", max_tokens=6, temperature=0)
        assert first.usage.completion_tokens == 6
        linears = [m for m in llm.loaded.model.modules() if isinstance(m, torch.nn.Linear)]
        assert not linears  # every projection swapped
    finally:
        llm.close()
    folder = quant.cache_folder(tiny_model_dir, mode)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quantization"] == mode and (folder / "model.safetensors").is_file()

    def fail(*a, **k):
        raise AssertionError("quantized again although the cache is valid")

    monkeypatch.setattr(quant, "quantize_model", fail)
    again = LlamaWrapper.load(str(tiny_model_dir), quantization=mode, progress=False)
    try:
        assert again.generate("Hello there", max_tokens=6, temperature=0).token_ids == first.token_ids
        # cached tensors get aligned storage (the packed kernels crash on a misaligned file buffer)
        assert all(b.data_ptr() % 64 == 0 for b in again.loaded.model.buffers() if b.dtype in (torch.int8, torch.uint8))
        with torch.inference_mode():
            assert again.loaded.model(torch.tensor([[1, 2, 3]])).logits.shape[1] == 3
        if mode == "w8a8":  # calibrated on the built-in text with the folder's tokenizer; kept in the cache
            smooth = [m.smooth for m in again.loaded.model.modules() if isinstance(m, quant.W8A8Linear)]
            assert smooth and all(not torch.equal(t, torch.ones_like(t)) for t in smooth)
    finally:
        again.close()
    source = quant.fingerprint(tiny_model_dir, {})
    assert quant.cache_is_valid(folder, mode, source) and not quant.cache_is_valid(folder, mode, "another-source")
    if mode == "w8a8":  # smoothed weights depend on alpha (and the calibration text): a new one quantizes again
        from llamawrapper.models import smoothing

        alpha = smoothing.SMOOTHING_ALPHA
        monkeypatch.setattr(smoothing, "SMOOTHING_ALPHA", alpha / 2)
        assert not quant.cache_is_valid(folder, mode, source)
        monkeypatch.setattr(smoothing, "SMOOTHING_ALPHA", alpha)
        assert quant.cache_is_valid(folder, mode, source)
        # weights quantized for the other kind of CPU (8-bit with VNNI, 7-bit without) are not used
        other = 63 if quant.w8a8_weight_max() == 127 else 127
        monkeypatch.setattr(quant, "w8a8_weight_max", lambda: other)
        assert not quant.cache_is_valid(folder, mode, source)


def test_bitsandbytes_path_on_cuda(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes 8-/4-bit quantization needs a CUDA GPU; none on this machine")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    llm = LlamaWrapper.load(str(tiny_model_dir), quantization="int8", device="cuda", progress=False)
    try:
        assert llm.generate("Hello", max_tokens=4, temperature=0).usage.completion_tokens == 4
    finally:
        llm.close()


@pytest.mark.slow
def test_quality_gate_on_smollm2():
    """int8 perplexity within +3% of fp32, int4 within +15%, w8a8 within +5% (smoothed, 7-bit weights
    on AVX2: +3.8 % at 1,024 tokens; 8-bit with AVX512-VNNI: -0.1 %); fixed questions
    still right (asked in one batch). On the text's first 1,024 tokens (one window; each further
    window costs ~12 s over the models, and ``llamawrapper eval-ppl`` scores the whole text).
    The quantized models' answers are also asked one at a time: the same text alone as in the
    batch (before their batch-invariant attention, 3 of w8a8's 6 differed, 1 of int8's and 1 of
    int4's). w8a8 may miss one answer: its greedy
    answer to the sky question sits near a tie (fp32 says "blue" after 15 tokens; w8a8 said it
    or rambled past 24 tokens depending on last-bit differences in attention, 1e-7 apart)."""
    from llamawrapper.models.evaluation import PPL_LIMITS, evaluate

    reports = {}
    for mode in (None, "int8", "int4", "w8a8"):
        llm = LlamaWrapper.load("smollm2", quantization=mode, progress=False)
        try:
            reports[mode] = evaluate(llm, tokens=1024)
            if mode is not None:
                alone = [llm.chat(a["question"], max_tokens=24, temperature=0, cache=False).text for a in reports[mode].answers]
                assert alone == [a["answer"] for a in reports[mode].answers]
        finally:
            llm.close()
    base = reports[None]
    assert base.answers_correct == len(base.answers)
    for mode in ("int8", "int4", "w8a8"):
        r = reports[mode]
        assert r.perplexity <= base.perplexity * (1 + PPL_LIMITS[mode]), (mode, r.perplexity, base.perplexity)
        assert r.answers_correct >= len(r.answers) - (mode == "w8a8"), [a for a in r.answers if not a["correct"]]


def test_cli_eval_ppl_and_models_verbose(tiny_model_dir, lw_home):
    from typer.testing import CliRunner

    from llamawrapper.cli import app

    res = CliRunner().invoke(app, ["eval-ppl", str(tiny_model_dir), "--no-questions", "--json", "--quantization", "int8",
                                      "--tokens", "2001"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["quantization"] == "int8" and report["tokens"] == 2001 and report["perplexity"] > 1
    res = CliRunner().invoke(app, ["run", str(tiny_model_dir), "hi", "--override", "nope=1", "-q"])
    assert res.exit_code == 1 and "nope" in res.output
