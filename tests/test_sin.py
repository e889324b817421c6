import torch

from scalecert.sin import SINLayer, importance, masked_topk_from_order, num_winners, sin_mask, strict_order


def test_ties_broken_by_lower_index():
    f = torch.zeros(1, 2, 2, 3)  # all six positions tie
    m = sin_mask(f, 0.5)
    assert m.flatten().tolist() == [True, True, True, False, False, False]


def test_topk_keeps_exactly_k_positions_and_all_channels():
    torch.manual_seed(0)
    f = torch.randn(4, 5, 8, 8)
    out = SINLayer(0.15)(f)
    k = num_winners(0.15, 64)
    nz = (out != 0).any(1).flatten(1).sum(1)
    assert (nz <= k).all() and k == 10
    keep = sin_mask(f, 0.15)
    assert torch.equal(out, f * keep.unsqueeze(1))


def test_gradient_flows_through_winners_only():
    torch.manual_seed(1)
    f = torch.randn(2, 3, 6, 6, requires_grad=True)
    SINLayer(0.2)(f).sum().backward()
    keep = sin_mask(f.detach(), 0.2)
    assert torch.equal(f.grad != 0, keep.unsqueeze(1).expand_as(f))


def test_reranking_from_order_equals_fresh_topk():
    torch.manual_seed(2)
    f = torch.randn(6, 4, 10, 10).round()  # rounding creates ties
    excl = torch.rand(6, 100) < 0.3
    order = strict_order(importance(f))
    k = num_winners(0.1, 100)
    assert torch.equal(masked_topk_from_order(order, excl, k), sin_mask(f, 0.1, excl).flatten(1))


def test_bad_rate_is_rejected():
    import pytest

    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="rate"):
            SINLayer(bad)
