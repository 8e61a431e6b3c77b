"""At most one host sync per sweep batch, whatever the number of states.

A GPU's host waits for the device when a result is read back: a scalar (``.item()``, ``if
tensor``), a data-dependent shape (boolean indexing, ``nonzero``, ``masked_select``) or a copy
to the host. On CPU nothing waits, so the test counts the operators that would (a dispatch
mode sees every one, whoever calls it: bgotrace or transformers). The sweep's own loop has
none per batch (predicted positions and counts come from the host's lengths, sums stay on the
device until the block ends); what is left is transformers' check of the position ids for
packed sequences, once per batch for the mask every block shares.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bgotrace.modeling.losses import IGNORE, head_token_losses
from bgotrace.score.sweep import predicted_positions, unit_loss_sums
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
WAITS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.nonzero.default",
         "aten.masked_select.default", "aten.equal.default", "aten.item.default"}  # fmt: skip


class HostWaits(TorchDispatchMode):
    """Counts the operators that make a GPU's host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masks = [a for arg in args if isinstance(arg, (list, tuple)) for a in arg]
        if name in WAITS or (name.startswith("aten.index.") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in masks
        )):  # fmt: skip
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


class Units:
    """Ten units of mixed lengths (padded batches), the last three with a loss mask."""

    lengths = np.array([16, 12, 16, 9, 16, 16, 5, 16, 7, 11])
    toks = np.random.default_rng(0).integers(1, 300, (10, 16)).astype(np.uint32)

    def unit_tokens(self, i):
        return self.toks[i, : self.lengths[i]]

    def unit_loss_mask(self, i):
        if i < 7:
            return None
        mask = np.zeros(self.lengths[i], dtype=bool)
        mask[3:] = True
        return mask


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("where", [".1.", "."])  # the last block (split) or all (full forward)
def test_one_host_wait_per_batch_whatever_the_states(arch, where):
    tok = make_tiny_tokenizer()
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(tok, seed=2)
    names = [n for n, _ in model.named_parameters() if where in n]
    waits = {}
    for n_states in (1, 5):
        states = [None] + [
            {n: p.detach() + 1e-3 * k for n, p in model.named_parameters() if n in names}
            for k in range(1, n_states)
        ]
        with HostWaits() as mode:
            unit_loss_sums(model, Units(), np.arange(10), states, batch_size=4, pad_id=0,
                           device=CPU)  # fmt: skip
        waits[n_states] = sum(mode.seen.values())
    assert waits[1] == waits[5] <= 3, waits  # 3 batches of ≤ 4 units


def test_predicted_positions_are_the_labels_that_count():
    """The host's positions equal the device labels' non-IGNORE entries (loss masks too)."""
    from bgotrace.cache.batching import collate

    units, batch = Units(), np.array([6, 3, 9, 7, 0])
    ids, _, labels = collate(units, batch, 0, CPU)
    keep = predicted_positions(units, batch, ids.shape[1])
    shifted = torch.zeros_like(labels, dtype=torch.bool)
    shifted[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts label t + 1
    assert keep.tolist() == torch.nonzero(shifted.reshape(-1)).squeeze(1).tolist()


def test_head_losses_at_known_positions_equal_the_masked_ones():
    torch.manual_seed(0)
    hidden, head = torch.randn(3, 7, 8), torch.nn.Linear(8, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 5:], labels[2, 2:4] = IGNORE, IGNORE
    in_loss = torch.zeros_like(labels, dtype=torch.bool)
    in_loss[:, :-1] = labels[:, 1:] != IGNORE
    keep = torch.nonzero(in_loss.reshape(-1)).squeeze(1)
    expected = head_token_losses(hidden, head, labels, chunk_rows=4)
    torch.testing.assert_close(head_token_losses(hidden, head, labels, 4, keep), expected)
