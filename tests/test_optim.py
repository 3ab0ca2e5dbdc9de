"""The optimizers and the schedule: Muon's update, Adam + Muon as one optimizer, muon_lr=0 as plain Adam."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cnn import checkpoint, config
from cnn.model import CNN
from cnn import optim
from cnn.optim import (AdamMuon, Muon, build_optimizer, gram_pays, lr_at, muon_params, newton_schulz,
                       newton_schulz_direct, set_lr)


def _cfg(*overrides):
    return config.build(None, list(overrides))


def test_newton_schulz_orthogonalizes_both_shapes():
    g = torch.randn(64, 288, generator=torch.Generator().manual_seed(0))
    for m in (g, g.T):
        s = torch.linalg.svdvals(newton_schulz(m))
        # the quintic iteration pushes every singular value into roughly [0.7, 1.2] (not exactly 1)
        assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(newton_schulz(m).flatten(), (u @ vh).flatten(), dim=0) > 0.95


def _with_singular_values(rows, cols, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g))
    return u @ torch.diag(s) @ v.T


@pytest.mark.parametrize("shape", [(64, 288), (128, 576), (576, 128)])
@pytest.mark.parametrize("steps", [2, 3, 5])
def test_the_gram_form_is_the_direct_iteration_up_to_rounding(shape, steps):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(steps))
    direct, gram = newton_schulz_direct(g, steps), newton_schulz(g, steps)
    assert ((gram - direct).norm() / direct.norm()) < 1e-5


@pytest.mark.parametrize("name, s", [("rank 1", torch.tensor([1.0] + [0.0] * 63)),
                                     ("singular values 1e-8..1", torch.logspace(-8, 0, 64)),
                                     ("all zero", torch.zeros(64))])
def test_the_gram_form_holds_on_ill_conditioned_and_degenerate_grads(name, s):
    # the Gram matrix squares the condition number; in fp32 the result still matches the direct form
    m = _with_singular_values(64, 288, s)
    direct, gram = newton_schulz_direct(m), newton_schulz(m)
    assert gram.isfinite().all(), name
    assert (gram - direct).norm() <= 1e-3 * max(direct.norm(), 1e-12), name


def test_muon_shapes_take_about_half_the_direct_forms_flops():
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for form in (newton_schulz, newton_schulz_direct):
        with FlopCounterMode(display=False) as count:
            for rows, cols in [(64, 288), (128, 576)]:
                form(torch.randn(rows, cols))
        flops[form] = count.get_total_flops()
    assert flops[newton_schulz] < 0.55 * flops[newton_schulz_direct], flops


def test_gram_pays_where_the_long_side_is_long_enough():
    assert gram_pays(64, 288, 5) and gram_pays(128, 576, 5) and gram_pays(128, 576, 2)
    assert not gram_pays(64, 64, 5)  # square: the Gram form's m x m products are the whole cost
    assert not gram_pays(128, 576, 1)  # one iteration: the same products, more ops
    assert gram_pays(100, 151, 5) and not gram_pays(100, 150, 5)  # 5 iterations pay from long > 1.5 short


def test_half_precision_takes_the_direct_form():
    g = torch.randn(64, 288, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(newton_schulz(g), newton_schulz_direct(g))


@pytest.fixture
def fp32_precision():
    """Restores torch's fp32 matmul settings after the test."""
    b = torch.backends
    saved = (b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.fp32_precision, b.mkldnn.matmul.fp32_precision)
    yield b
    torch.set_float32_matmul_precision("highest")  # the legacy setting's own state, then the new API's
    b.fp32_precision = saved[0]
    b.cuda.matmul.fp32_precision, b.mkldnn.fp32_precision, b.mkldnn.matmul.fp32_precision = saved[1:]


@pytest.mark.parametrize("set_, cuda, cpu", [
    (lambda b: None, True, True),  # torch's defaults: fp32 matmuls in fp32
    (lambda b: torch.set_float32_matmul_precision("high"), False, False),  # TF32 on both backends
    (lambda b: setattr(b.cuda.matmul, "allow_tf32", True), False, True),  # the legacy CUDA switch
    (lambda b: setattr(b.mkldnn.matmul, "fp32_precision", "bf16"), True, False),
    (lambda b: setattr(b, "fp32_precision", "tf32"), False, False),  # the generic level reaches both
    (lambda b: (setattr(b, "fp32_precision", "tf32"), setattr(b.cuda.matmul, "fp32_precision", "ieee")), True, False),
])
def test_exact_fp32_matmul_reads_torchs_precision_settings(fp32_precision, set_, cuda, cpu):
    set_(fp32_precision)
    assert optim.exact_fp32_matmul("cuda") is cuda and optim.exact_fp32_matmul("cpu") is cpu


def test_reduced_precision_fp32_matmuls_take_the_direct_form(fp32_precision):
    g = torch.randn(64, 288, generator=torch.Generator().manual_seed(0))
    fp32_precision.mkldnn.matmul.fp32_precision = "bf16"
    assert torch.equal(newton_schulz(g), newton_schulz_direct(g))
    fp32_precision.mkldnn.matmul.fp32_precision = "ieee"
    assert not torch.equal(newton_schulz(g), newton_schulz_direct(g))  # the Gram form again


def test_muon_takes_conv2_and_conv3_weights_and_adam_the_rest():
    model = CNN()
    opt = build_optimizer(model, _cfg("optim.muon_lr=0.02").optim)
    assert isinstance(opt, AdamMuon)
    assert [p.shape for p in muon_params(model)] == [(64, 32, 3, 3), (128, 64, 3, 3)]
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in opt.adam.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in muon_params(model)} and not muon_ids & adam_ids
    assert muon_ids | adam_ids == {id(p) for p in model.parameters()}


def test_muon_lr_zero_is_plain_adam():
    opt = build_optimizer(CNN(), _cfg("optim.muon_lr=0").optim)
    assert type(opt) is torch.optim.Adam


def test_schedule_scales_each_optimizers_own_peak():
    cfg = _cfg("optim.muon_lr=0.02", "optim.lr=0.004").optim
    opt = build_optimizer(CNN(), cfg)
    for step in (0, 10, 100, 233):
        set_lr(opt, step, 234, cfg)
        assert opt.adam.param_groups[0]["lr"] == lr_at(step, 234, cfg)
        assert opt.muon.param_groups[0]["lr"] == pytest.approx(lr_at(step, 234, cfg) * 0.02 / 0.004)


def _steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_adam_muon_state_round_trips_and_continues_identically():
    cfg = _cfg("optim.muon_lr=0.02", "model.dropout=0").optim
    torch.manual_seed(0)
    a = CNN(dropout=0)
    opt_a = build_optimizer(a, cfg)
    _steps(a, opt_a, 3)
    b = CNN(dropout=0)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, cfg)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a checkpoint holds copies, not opt_a's buffers
    before = muon_params(b)[0].detach().clone()
    _steps(a, opt_a, 2, seed=1)
    _steps(b, opt_b, 2, seed=1)
    assert not torch.equal(before, muon_params(b)[0])  # Muon moved it
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(ValueError, match="Adam's alone"):
        opt_b.load_state_dict(torch.optim.Adam(CNN().parameters()).state_dict())


def test_checkpoint_from_before_muon_resumes_only_as_adam():
    now = config.to_dict(_cfg("optim.muon_lr=0.02"))
    before = config.to_dict(_cfg("optim.muon_lr=0"))
    del before["optim"]["muon_lr"]  # a config saved before the key existed
    checkpoint.check_config(before, config.to_dict(_cfg("optim.muon_lr=0")), "old")  # Adam then, Adam now: fine
    with pytest.raises(checkpoint.CheckpointError, match=r"optim.muon_lr was 0.0 when saved but is 0.02 now: "
                                                        r"pass optim.muon_lr=0.0 to continue"):
        checkpoint.check_config(before, now, "old")


class _GenericPath(AdamMuon):
    """The same optimizer with the scaler-aware flag hidden: GradScaler.step unscales, reads
    found_inf with .item() and calls step() only when it is 0 (its generic path)."""

    _step_supports_amp_scaling = False


def _fp16_pair(seed=0):
    """Two identical CNNs with the default optimizer, the second on GradScaler's generic path, each with its
    own live fp16 scaler (default init scale 2**16, growth 2, backoff 0.5: the scale stays a power of 2)."""
    cfg = _cfg("model.dropout=0").optim
    torch.manual_seed(seed)
    a = CNN(dropout=0)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg), build_optimizer(b, cfg)
    assert isinstance(opt_a, AdamMuon)  # the default recipe trains the convs with Muon
    opt_b = _GenericPath(opt_b.adam, opt_b.muon)
    return (a, opt_a, torch.amp.GradScaler("cpu")), (b, opt_b, torch.amp.GradScaler("cpu"))


def _fp16_step(model, opt, scaler, seed, poison=None):
    """One training step as the loop takes it in fp16; poison(model) may corrupt the (scaled) grads."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    if poison is not None:
        poison(model)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def _assert_same(model_a, opt_a, model_b, opt_b):
    for (k, va), vb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(va, vb), k
    for part in ("adam", "muon"):
        sa, sb = getattr(opt_a, part).state_dict()["state"], getattr(opt_b, part).state_dict()["state"]
        assert sa.keys() == sb.keys(), part
        for i in sa:
            for name in sa[i]:
                assert torch.equal(sa[i][name], sb[i][name]), (part, i, name)


def test_default_optimizer_handles_loss_scaling_itself_and_matches_the_generic_path_bitwise():
    (a, opt_a, sc_a), (b, opt_b, sc_b) = _fp16_pair()
    assert opt_a._step_supports_amp_scaling is True and opt_a.muon._step_supports_amp_scaling is True
    for seed in range(3):
        _fp16_step(a, opt_a, sc_a, seed)
        _fp16_step(b, opt_b, sc_b, seed)
    # Bitwise, not approximately: Muon unscales as GradScaler.unscale_ does (times the fp32 reciprocal
    # computed in fp64), and fused Adam's divide by the scale equals that multiply because the scale is 2**16.
    _assert_same(a, opt_a, b, opt_b)
    assert sc_a.get_scale() == sc_b.get_scale() == 2.0 ** 16
    assert not any(hasattr(o, n) for o in (opt_a, opt_a.adam, opt_a.muon) for n in ("grad_scale", "found_inf"))
    # Without fused Adam (a build that lacks it) the flag is off, and the generic path still works.
    foreach = AdamMuon(torch.optim.Adam(a.head.parameters(), foreach=True), opt_a.muon)
    assert foreach._step_supports_amp_scaling is False


@pytest.mark.parametrize("where", ["muon", "adam"])
def test_an_inf_grad_skips_the_whole_step_and_backs_off_the_scale(where):
    (a, opt_a, sc_a), (b, opt_b, sc_b) = _fp16_pair()
    assert opt_a._step_supports_amp_scaling is True
    for model, opt, scaler in ((a, opt_a, sc_a), (b, opt_b, sc_b)):
        for seed in range(2):
            _fp16_step(model, opt, scaler, seed)
    params, state, scale = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict()), sc_a.get_scale()

    def poison(model):  # one inf in a weight of the other optimizer must stop this one too
        p = muon_params(model)[0] if where == "muon" else model.hidden[0].weight
        p.grad.view(-1)[0] = float("inf")

    _fp16_step(a, opt_a, sc_a, 2, poison)
    _fp16_step(b, opt_b, sc_b, 2, poison)
    for k, v in a.state_dict().items():
        assert torch.equal(v, params[k]), k
    for part in ("adam", "muon"):
        now, before = opt_a.state_dict()[part]["state"], state[part]["state"]
        assert all(torch.equal(now[i][n], before[i][n]) for i in before for n in before[i]), part
    assert sc_a.get_scale() == sc_b.get_scale() == scale / 2
    _assert_same(a, opt_a, b, opt_b)
    _fp16_step(a, opt_a, sc_a, 3)  # and training goes on as on the generic path
    _fp16_step(b, opt_b, sc_b, 3)
    _assert_same(a, opt_a, b, opt_b)


def test_scaler_step_reads_nothing_back_to_the_host(monkeypatch):
    (a, opt_a, sc_a), _ = _fp16_pair()
    _fp16_step(a, opt_a, sc_a, 0)  # state exists; the guarded step is a steady-state one
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    sc_a.scale(F.cross_entropy(a(x), y)).backward()
    before = [p.detach().clone() for p in a.parameters()]

    def sync(self, *args, **kwargs):  # on CUDA each of these waits for the device
        raise AssertionError("host-device sync in GradScaler.step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    sc_a.step(opt_a)
    sc_a.update()
    monkeypatch.undo()
    assert all(not torch.equal(p0, p) for p0, p in zip(before, a.parameters()))  # it did step


@pytest.mark.parametrize("device_type, enabled, want", [("cuda", True, True), ("cuda", False, False),
                                                         ("cpu", True, False), ("cpu", False, False)])
def test_muon_replays_as_a_cuda_graph_on_cuda_only(device_type, enabled, want):
    assert optim.uses_cuda_graph(device_type, enabled) is want


def test_cuda_graph_setting_on_a_cpu_model_trains_eagerly_and_identically():
    cfg = _cfg().optim
    torch.manual_seed(0)
    a = CNN(dropout=0)
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg, cuda_graph=True), build_optimizer(b, cfg, cuda_graph=False)
    assert not opt_a.muon.cuda_graph  # the decision: no graphs on CPU
    opt_a.muon.cuda_graph = True  # forced on anyway: CPU tensors keep the eager step
    _steps(a, opt_a, 3)
    _steps(b, opt_b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert opt_a.muon.graph_replays == 0 and optim.facts(opt_a) == {"muon_graph_replays": 0}
    assert optim.facts(opt_b) == {}


def test_graph_body_is_muons_step():
    """The CUDA graph's body (optim._update, learning rate as a tensor) computes the eager step:
    the same momentum buffers bit for bit, the weights up to the update's rounding."""
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(64, 32, 3, 3, generator=g)),
              torch.nn.Parameter(torch.randn(128, 64, 3, 3, generator=g))]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    eager = Muon(params, lr=0.02)
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    eager.step()  # makes the momentum buffers
    bufs = [eager.state[p]["momentum_buffer"].clone() for p in params]
    weights = [p.detach().clone() for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad.flip(0)
    eager.step()
    alphas = [torch.tensor(-0.02 * optim._scale(p)) for p in params]
    optim._update(weights, bufs, [grad.flip(0) for grad in grads], alphas, [0.95, 0.95], [5, 5])
    for p, w, buf in zip(params, weights, bufs):
        assert torch.equal(buf, eager.state[p]["momentum_buffer"])
        torch.testing.assert_close(w, p.detach(), rtol=0, atol=1e-6)
    assert optim._scale(params[0]) == 1.0 and optim._scale(torch.empty(600, 10)) == pytest.approx(60 ** 0.5)
