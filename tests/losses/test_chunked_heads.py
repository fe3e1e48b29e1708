"""The head drivers of ``chunked.py`` that run the loss maths on row blocks: exact values and gradients,
how the blocks' stats are merged, the vocabulary-sized memory they hold, and one host read per term.

References are written from the equations (fp64 autograd on the full chunk), not from the drivers.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from tolerance import reduction_tolerance
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dskd_scale.losses import TrainableHead, fused_head_chunk
from dskd_scale.losses.chunked import eager_head_grad
from dskd_scale.losses.divergences import DivergenceParams, forward_kl

D, V = 5, 23
PARAMS = DivergenceParams(temperature=2.0)


def _kd_ce_rows(logits, labels, target):
    """forward KL to a target plus CE, per-row argmax ids and a 0-dim hit count as stats."""
    kd = forward_kl(logits, target, PARAMS).sum()
    ce = F.cross_entropy(logits, labels, reduction="sum")
    pred = logits.argmax(-1)
    return kd, ce, pred, (pred == labels).sum()


def _inputs(rows, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=gen, dtype=dtype)
    hidden = torch.randn(rows, D, generator=gen, dtype=dtype).requires_grad_(True)
    target = torch.randn(rows, V, generator=gen, dtype=dtype)
    labels = torch.randint(0, V, (rows,), generator=gen)
    return weight, hidden, target, labels


@pytest.mark.parametrize("rows", [1, 16, 37])
def test_fused_head_chunk_on_row_blocks_equals_full_chunk_autograd(rows):
    """Losses, merged stats (per-row ids concatenated in order, counts summed), weight and input gradients."""
    weight, hidden, target, labels = _inputs(rows)
    w_kd, w_ce = 0.3, 1.7
    head = TrainableHead(weight)
    kd, ce, pred, hits = fused_head_chunk(_kd_ce_rows, head, hidden, labels, expected_weights=(w_kd, w_ce),
                                          first_pass_rows=(target,))
    (w_kd * kd + w_ce * ce).backward()
    fused_hidden_grad = hidden.grad
    leaf, plain_hidden = weight.clone().requires_grad_(True), hidden.detach().clone().requires_grad_(True)
    logits = plain_hidden @ leaf.T
    ref_kd = forward_kl(logits, target, PARAMS).sum()
    ref_ce = F.cross_entropy(logits, labels, reduction="sum")
    (w_kd * ref_kd + w_ce * ref_ce).backward()
    tol = reduction_tolerance(torch.float64, D + V + rows, scale=10.0)
    torch.testing.assert_close(kd, ref_kd.detach(), **tol)
    torch.testing.assert_close(ce, ref_ce.detach(), **tol)
    assert torch.equal(pred, logits.argmax(-1)), "per-row stats are concatenated in row order"
    assert hits.dim() == 0 and hits.item() == int((logits.argmax(-1) == labels).sum()), "counts are summed"
    torch.testing.assert_close(head.take_gradient(), leaf.grad, **tol)
    torch.testing.assert_close(fused_hidden_grad, plain_hidden.grad, **tol)


@pytest.mark.parametrize("keep_logits", [False, True])
def test_eager_head_grad_equals_autograd_and_keeps_the_logits_on_request(keep_logits):
    weight, hidden, target, labels = _inputs(37, seed=1)

    def kd_rows(logits, target_rows):
        return forward_kl(logits, target_rows, PARAMS).sum(), logits.argmax(-1)

    outputs = eager_head_grad(kd_rows, lambda h: F.linear(h, weight), hidden, target, keep_logits=keep_logits)
    (3.0 * outputs[0]).backward()
    plain = hidden.detach().clone().requires_grad_(True)
    logits = F.linear(plain, weight)
    ref = forward_kl(logits, target, PARAMS).sum()
    (3.0 * ref).backward()
    tol = reduction_tolerance(torch.float64, D + V + 37, scale=10.0)
    torch.testing.assert_close(outputs[0], ref.detach(), **tol)
    torch.testing.assert_close(hidden.grad, plain.grad, **tol)
    assert torch.equal(outputs[1], logits.argmax(-1))
    assert len(outputs) == 3 if keep_logits else 2
    if keep_logits:
        torch.testing.assert_close(outputs[2], logits.detach(), **tol)


def test_eager_head_grad_of_no_rows_is_zero_and_a_stat_viewing_the_logits_is_refused():
    weight, hidden, target, _ = _inputs(0, seed=2)
    (loss,) = eager_head_grad(lambda z, t: (forward_kl(z, t, PARAMS).sum(),), lambda h: F.linear(h, weight),
                              hidden, target)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, D)
    weight, hidden, target, _ = _inputs(8, seed=2)
    with pytest.raises(RuntimeError, match="view of its logits"):
        eager_head_grad(lambda z, t: (forward_kl(z, t, PARAMS).sum(), z.detach()), lambda h: F.linear(h, weight),
                        hidden, target)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that aten ops inside the block create and that are alive at the same time
    (views of the given inputs and storages of ``ignore_bytes``, the [V, D] accumulator, not counted)."""

    def __init__(self, inputs, ignore_bytes: int):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.ignore_bytes, self.live, self.peak = ignore_bytes, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.untyped_storage().nbytes() != self.ignore_bytes
                and tensor.untyped_storage().data_ptr() not in self.inputs
            ):
                storage = tensor.untyped_storage()
                self.live.setdefault(storage.data_ptr(), []).append((weakref.ref(tensor), storage.nbytes()))
        alive = {}
        for ptr, refs in self.live.items():
            sizes = [size for ref, size in refs if ref() is not None]
            if sizes:
                alive[ptr] = max(sizes)
        self.live = {ptr: [r for r in refs if r[0]() is not None] for ptr, refs in self.live.items() if ptr in alive}
        self.peak = max(self.peak, sum(alive.values()))
        return out


def test_a_chunk_holds_one_logits_buffer_plus_small_block_temporaries():
    """The vocabulary-sized memory of one fused chunk (forward KL + CE): the [C, V] logits, overwritten by
    their gradient, plus the temporaries of one row block; not the half-dozen [C, V] softmax and gradient
    copies of running the loss maths on the whole chunk. The [V, D] accumulator is not counted here."""
    rows, vocab = 64, 4096
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(vocab, 8, generator=gen)
    hidden = torch.randn(rows, 8, generator=gen).requires_grad_(True)
    target = torch.randn(rows, vocab, generator=gen)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    chunk_bytes = rows * vocab * 4
    head = TrainableHead(weight)
    inputs = (weight, hidden, target, labels)
    with _LiveBytes(inputs, ignore_bytes=weight.numel() * 4) as fused:
        fused_head_chunk(_kd_ce_rows, head, hidden, labels, expected_weights=(1.0, 1.0), first_pass_rows=(target,))
    assert fused.peak <= 1.5 * chunk_bytes, fused.peak / chunk_bytes
    with _LiveBytes(inputs, ignore_bytes=weight.numel() * 4) as eager:
        eager_head_grad(lambda z, t: (forward_kl(z, t, PARAMS).sum(),), lambda h: F.linear(h, weight), hidden, target)
    assert eager.peak <= 1.5 * chunk_bytes, eager.peak / chunk_bytes


class _ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_backward_reads_each_terms_incoming_gradient_once_not_once_per_chunk():
    """Every chunk of a term receives the same gradient tensor; the fused backward reads it to the host once
    (one device sync per term instead of one per chunk), with the same gradients."""
    weight, hidden, target, labels = _inputs(12, seed=4)
    head = TrainableHead(weight)
    kd_total = ce_total = 0.0
    for hidden_c, target_c, labels_c in zip(hidden.split(2), target.split(2), labels.split(2), strict=True):
        kd, ce, _, _ = fused_head_chunk(_kd_ce_rows, head, hidden_c, labels_c, expected_weights=(2.0, 1.0),
                                        first_pass_rows=(target_c,))
        kd_total, ce_total = kd_total + kd, ce_total + ce
    loss = 0.5 * (2.0 * kd_total + ce_total)
    with _ScalarReads() as counter:
        loss.backward()
    assert counter.reads == 2, f"{counter.reads} host reads for 6 chunks of 2 terms"
    leaf, plain_hidden = weight.clone().requires_grad_(True), hidden.detach().clone().requires_grad_(True)
    logits = plain_hidden @ leaf.T
    ref = 0.5 * (2.0 * forward_kl(logits, target, PARAMS).sum() + F.cross_entropy(logits, labels, reduction="sum"))
    ref.backward()
    tol = reduction_tolerance(torch.float64, D + V + 12, scale=10.0)
    torch.testing.assert_close(head.take_gradient(), leaf.grad, **tol)
    torch.testing.assert_close(hidden.grad, plain_hidden.grad, **tol)
