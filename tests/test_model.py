import torch
from torch.utils.flop_counter import FlopCounterMode

import torch.nn.functional as F

from cnn.model import CNN, FORWARD_FLOPS_PER_IMAGE


def test_output_shape_and_finite():
    model = CNN()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert torch.isfinite(out).all()


def test_architecture_matches_the_seed():
    model = CNN()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 128, 4, 4)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(2048, 625), (625, 10)]


def test_hidden_block_is_used_in_forward():
    """The tutorial skipped ReLU+dropout in forward; ours must apply them."""
    model = CNN(dropout=0.5)
    x = torch.randn(8, 1, 28, 28)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b), "dropout has no effect in train mode"
    model.eval()
    assert torch.equal(model(x), model(x))
    hidden = model.hidden(torch.flatten(model.features(x), 1))
    assert (hidden >= 0).all(), "ReLU not applied to the hidden layer"


def test_flop_constant_matches_flop_counter():
    model = CNN()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(4, 1, 28, 28))
    assert counter.get_total_flops() / 4 == FORWARD_FLOPS_PER_IMAGE


def test_channels_last_gives_same_logits():
    model = CNN().eval()
    x = torch.randn(4, 1, 28, 28)
    ref = model(x)
    cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)


def seed_order_features(model: CNN, x: torch.Tensor) -> torch.Tensor:
    """The seed's block order, conv -> ReLU -> max-pool, with the model's own weights."""
    for block, pad in zip(model.features, (0, 0, 1)):
        x = F.max_pool2d(F.relu(block[0](x)), kernel_size=2, stride=2, padding=pad)
    return x


def test_blocks_compute_the_seeds_conv_relu_pool():
    """Pool-then-ReLU is a speed-up, not a different network: same activations, same gradients."""
    torch.manual_seed(0)
    model = CNN()
    x = torch.randn(16, 1, 28, 28)
    ours = model.features(x)
    ref = seed_order_features(model, x)
    assert torch.equal(ours, ref)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), model.features[1][0].weight)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), model.features[1][0].weight)
    torch.testing.assert_close(g_ours, g_ref)
