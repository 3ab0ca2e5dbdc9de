"""precision=auto: each rule forced through the capabilities it depends on; this machine's own answer."""

import pytest
import torch

from cnn import precision
from cnn.model import CNN
from cnn.precision import MEASURE, Caps, resolve

AVX2 = Caps(cpu_capability="AVX2", cpu_avx512_bf16=False, cpu_amx=False)

CASES = [
    # (case, requested, device type, caps, probe, precision chosen)
    ("explicit wins", "fp16", "cpu", AVX2, False, "fp16"),
    ("H100/A100: native bf16", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=True), False, "bf16"),
    ("V100/T4: bf16 only emulated", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=False), False, "fp16"),
    ("EPYC Zen 4: avx512_bf16", "auto", "cpu", Caps(cpu_capability="AVX512", cpu_avx512_bf16=True, cpu_amx=False),
     False, "bf16"),
    ("Sapphire Rapids: AMX", "auto", "cpu", Caps(cpu_capability="AVX512", cpu_avx512_bf16=True, cpu_amx=True),
     False, "bf16"),
    ("Skylake-X: AVX-512 without bf16", "auto", "cpu",
     Caps(cpu_capability="AVX512", cpu_avx512_bf16=False, cpu_amx=False), False, "fp32"),
    ("AVX2 only", "auto", "cpu", AVX2, False, "fp32"),
    ("AVX-512, torch cannot tell bf16", "auto", "cpu", Caps(cpu_capability="AVX512"), False, MEASURE),
    ("AVX2, torch cannot tell bf16", "auto", "cpu", Caps(cpu_capability="AVX2"), False, "fp32"),
    ("Graviton (aarch64)", "auto", "cpu", Caps(cpu_arch="aarch64", cpu_capability="SVE256", cpu_avx512_bf16=False,
                                                cpu_amx=False), False, MEASURE),
    ("train.precision_probe=true", "auto", "cpu", AVX2, True, MEASURE),
    ("probe does not apply to CUDA", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=True), True, "bf16"),
]


@pytest.mark.parametrize("case, requested, device_type, caps, probe, want", CASES, ids=[c[0] for c in CASES])
def test_resolve(case, requested, device_type, caps, probe, want):
    choice = resolve(requested, device_type, caps, probe)
    assert choice.name == want and choice.reason
    assert (choice.candidates == ("fp32", "bf16")) == (want == MEASURE)


def test_auto_is_fp32_on_a_cpu_without_native_bf16():
    """This machine's own capabilities (an AVX2 EPYC here): auto must stay fp32 where bf16 is emulated."""
    caps = precision.detect()
    if caps.cpu_avx512_bf16 or caps.cpu_amx or not caps.x86:
        pytest.skip(f"this CPU may have native bf16: {caps}")
    choice = resolve("auto", "cpu", caps)
    assert choice.name == "fp32", choice


def test_builds_match_the_rules():
    cpu = torch.device("cpu")
    assert precision.build("fp16", cpu).scaler.is_enabled()  # fp16 needs loss scaling
    assert not precision.build("bf16", cpu).scaler.is_enabled()  # bf16 has fp32's exponent range
    with precision.build("bf16", cpu).autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with precision.build("fp32", cpu).autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_pick_prefers_the_faster_and_fp32_on_a_tie():
    assert precision.pick({"fp32": 0.040, "bf16": 0.028}) == "bf16"
    assert precision.pick({"fp32": 0.040, "bf16": 0.055}) == "fp32"
    assert precision.pick({"bf16": 0.040, "fp32": 0.040}) == "fp32"


def test_step_timing_leaves_the_model_and_rng_alone():
    torch.manual_seed(0)
    model = CNN().to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 1, 28, 28).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    rng = torch.get_rng_state()
    times = precision.step_seconds(model, x, y, ("fp32", "bf16"), torch.device("cpu"), budget_s=0.05)
    assert set(times) == {"fp32", "bf16"} and all(0 < t < 5 for t in times.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
