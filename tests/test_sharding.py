import traceback

import pytest
import torch

from data.sharding import batch_indices, epoch_indices, eval_shard, normalize, seed_step, step_seed, steps_per_epoch


@pytest.mark.parametrize("world_size", range(1, 9))
def test_shards_disjoint_and_covering(world_size):
    n, seed, epoch = 1000, 3, 0
    shares = [epoch_indices(n, r, world_size, seed, epoch) for r in range(world_size)]
    sets = [set(s.tolist()) for s in shares]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not sets[i] & sets[j], f"ranks {i} and {j} overlap"
    # together they cover the set but for the n % world_size left over (never padded with repeats)
    union = set().union(*sets)
    assert union <= set(range(n)) and len(union) == n - n % world_size
    assert all(len(s) == len(shares[0]) for s in shares)


def test_order_changes_with_epoch_and_seed():
    a = epoch_indices(1000, 0, 2, seed=0, epoch=0)
    assert not torch.equal(a, epoch_indices(1000, 0, 2, seed=0, epoch=1))
    assert not torch.equal(a, epoch_indices(1000, 0, 2, seed=1, epoch=0))
    assert torch.equal(a, epoch_indices(1000, 0, 2, seed=0, epoch=0))


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_global_batch_is_the_same_at_every_world_size(world_size):
    """Step s consumes the same images whatever the world size: the basis of
    world-size-invariant resume."""
    n, global_batch, seed, epoch = 1000, 64, 5, 2
    reference = epoch_indices(n, 0, 1, seed, epoch)
    per_rank = global_batch // world_size
    for s in range(steps_per_epoch(n, global_batch)):
        got = torch.cat([batch_indices(epoch_indices(n, r, world_size, seed, epoch), s, per_rank) for r in range(world_size)])
        assert len(got) == global_batch
        assert sorted(got.tolist()) == sorted(reference[s * global_batch:(s + 1) * global_batch].tolist())


def test_steps_per_epoch_drops_incomplete_batch():
    assert steps_per_epoch(60000, 128) == 468
    assert steps_per_epoch(128, 128) == 1


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8, 16])
def test_eval_shards_count_every_image_once(world_size):
    bounds = [eval_shard(10000, r, world_size) for r in range(world_size)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(10000))


def test_normalize_shape_and_statistics():
    x = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    y = normalize(x)
    assert y.shape == (10, 1, 28, 28) and y.dtype == torch.float32
    assert y.min() == pytest.approx((0 - 0.1307) / 0.3081, abs=1e-5)
    assert y.max() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)


def test_normalized_training_set_is_standardized(mnist_root):
    from data import mnist
    images, _ = mnist.load(mnist_root, train=True)
    y = normalize(images)
    assert y.mean().item() == pytest.approx(0.0, abs=1e-3)
    assert y.std().item() == pytest.approx(1.0, abs=1e-3)


def test_seed_step_draws_what_torch_manual_seed_draws():
    seed = step_seed(3, 17, 1)
    torch.manual_seed(seed)
    want = torch.nn.functional.dropout(torch.ones(1000), 0.25), torch.rand(5)
    torch.manual_seed(0)
    seed_step(seed, torch.device("cpu"))
    got = torch.nn.functional.dropout(torch.ones(1000), 0.25), torch.rand(5)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_seed_step_formats_no_traceback(monkeypatch):
    """torch.manual_seed formats the caller's stack for each device type not initialized (MTIA at
    least, on any machine these tests run on): host time every step."""
    calls = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(1)
    assert calls, "torch.manual_seed formatted no stack: the reason for seed_step is gone"
    calls.clear()
    for step in range(10):
        seed_step(step_seed(0, step, 0), torch.device("cpu"))
    assert not calls
