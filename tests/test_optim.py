"""The optimizers and the schedule: Muon's update, Adam + Muon as one optimizer, muon_lr=0 as plain Adam."""

import copy

import pytest
import torch
import torch.nn.functional as F

from cnn import checkpoint, config
from cnn.model import CNN
from cnn.optim import AdamMuon, build_optimizer, lr_at, muon_params, newton_schulz, set_lr


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
