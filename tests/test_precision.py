"""precision=auto: each rule forced through the capabilities it depends on; this machine's own answer."""

import os

import pytest
import torch

from cnn import precision
from cnn.model import CNN
from cnn.precision import MEASURE, Caps, native_bf16, resolve

AVX2 = Caps(cpu_capability="AVX2", cpu_avx512_bf16=False, cpu_amx=False)

CASES = [
    # (case, requested, device type, caps, probe, precision chosen)
    ("explicit wins", "fp16", "cpu", AVX2, False, "fp16"),
    ("A100: sm_80, native bf16", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=native_bf16((8, 0))),
     False, "bf16"),
    ("H100/H200: sm_90", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=native_bf16((9, 0))), False, "bf16"),
    ("V100: sm_70, bf16 only emulated", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=native_bf16((7, 0))),
     False, "fp16"),
    ("T4: sm_75, bf16 only emulated", "auto", "cuda", Caps(cuda_available=True, cuda_bf16_native=native_bf16((7, 5))),
     False, "fp16"),
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


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_this_machine_is_judged_by_its_own_flags():
    """Whatever this CPU is: torch's probes read what /proc/cpuinfo says (lscpu's flags), and auto
    follows the rules above from them -- bf16 with avx512_bf16 or AMX, fp32 without."""
    caps, flags = precision.detect(), _cpu_flags()
    if os.environ.get("MNIST_DDP_EMULATE_CPU") == "avx2":  # tests/emulate: an AVX2-only CPU's flags
        flags -= {"avx512_bf16", "amx_tile"}
    if not (caps.x86 and flags):
        pytest.skip(f"not an x86 Linux CPU with /proc/cpuinfo flags: {caps}")
    assert caps.cpu_avx512_bf16 in (None, "avx512_bf16" in flags) and caps.cpu_amx in (None, "amx_tile" in flags), caps
    want = "bf16" if caps.cpu_avx512_bf16 or caps.cpu_amx else MEASURE if caps.cpu_capability.startswith("AVX512") \
        and caps.cpu_avx512_bf16 is None and caps.cpu_amx is None else "fp32"
    assert resolve("auto", "cpu", caps).name == want


def test_a_trained_model_runs_in_its_runs_precision_unless_told():
    assert precision.for_trained("auto", "bf16", "recorded in the checkpoint") == (
        "bf16", "the run's (recorded in the checkpoint)")
    assert precision.for_trained("fp32", "bf16", "recorded in the checkpoint") == ("fp32", "requested")
    assert precision.for_trained("fp16", "fp32", "x") == ("fp16", "requested")


@pytest.mark.parametrize("run, caps, here", [("fp32", Caps(cpu_capability="AVX512", cpu_avx512_bf16=True, cpu_amx=True),
                                               "bf16"), ("bf16", AVX2, "fp32"), ("bf16", Caps(cpu_arch="aarch64"), None)])
def test_a_resumed_run_keeps_its_precision_under_auto(run, caps, here):
    """Both ways, whatever this machine is: a run resumed on a machine whose own choice differs
    goes on in the precision its checkpoint computed in, and says what the machine alone would do
    (no collective is needed: every rank holds the same broadcast checkpoint)."""
    x, y = torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    prec = precision.choose("auto", torch.device("cpu"), CNN(), x, y, caps=caps, resumed=run)
    assert prec.name == run and prec.reason.startswith(f"the run's: resumed from a checkpoint that computed in {run}")
    assert (f"alone, this machine would pick {here}" if here else "alone, this machine would measure") in prec.reason
    assert prec.scaler.is_enabled() == (run == "fp16")


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
