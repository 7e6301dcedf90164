"""The TTT alignment on hand-made rows: which slots count, which position the target comes from, which
tokens the acceptance simulation feeds.

Convention (spec_models.ttt): step j at slot t predicts x_{t+2+j}; its target is the verifier's
distribution after x_{t+1+j}, i.e. computed from last[t+1+j].
"""

import torch

from spec_train.data import supervised_slots
from spec_train.loss import chunked_loss
from spec_train.offline import greedy_step_ids


def _two_docs():
    # doc A = x0..x5 (prompt x0, x1), doc B = x6..x9 (prompt x6)
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    return mask, pos


def test_supervised_slots_by_hand():
    mask, pos = _two_docs()
    valid = supervised_slots(mask, pos, 3)
    # (j, t) counts iff x_{t+2+j} is supervised and in t's document.
    expect = torch.zeros(3, 10, dtype=torch.bool)
    expect[0, [0, 1, 2, 3, 6, 7]] = True  # t=4 -> x6 and t=5 -> x7 are in doc B; t=6 -> x8 ok
    expect[1, [0, 1, 2, 6]] = True  # t=3 -> x6 crosses; t=6 -> x9; t=7 -> x10 is past the row
    expect[2, [0, 1]] = True  # t=2 -> x6 crosses; t=6 -> x10 past the row
    assert torch.equal(valid, expect)


def test_unsupervised_target_is_not_counted():
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)  # x3 is a user token inside the document
    valid = supervised_slots(mask, torch.arange(6), 2)
    assert valid[0].tolist() == [True, False, True, True, False, False]  # t=1 predicts x3
    assert valid[1].tolist() == [False, True, True, False, False, False]  # t=0 predicts x3


def test_loss_targets_come_from_position_t_plus_1_plus_j():
    """A verifier whose distribution at position p is one-hot on x_{p+1}, and a 'draft' whose output at
    (j, t) is one-hot on x_{t+2+j}: every counted slot agrees and the KL is ~0. Shifting the draft's
    outputs by one position breaks the agreement."""
    x = torch.tensor([3, 1, 4, 1, 5, 2, 6, 5, 3, 5])
    mask, pos = _two_docs()
    V, H, S, T = 8, 8, 3, 10
    eye = torch.eye(V)

    class Head:  # the verifier's lm_head rows of the draft vocabulary: the identity
        draft_weight = eye

    big = 30.0
    # last[p] such that norm(last[p]) points at x_{p+1} (the row's last position predicts nothing counted).
    t_normed = torch.stack([eye[x[p + 1]] * big if p + 1 < T else torch.zeros(V) for p in range(T)])
    valid = supervised_slots(mask, pos, S)

    def draft_out(shift):
        out = torch.zeros(S, T, H)
        for j in range(S):
            for t in range(T):
                if t + 2 + j + shift < T:
                    out[j, t] = eye[x[t + 2 + j + shift]] * big
        return out

    ones = torch.ones(S)
    for chunk in (1, 3, 100):
        loss, stats = chunked_loss(draft_out(0), eye, t_normed, Head, valid, ones, chunk)
        assert torch.equal(stats[2], valid.sum(-1).float())
        assert torch.equal(stats[1], stats[2]), "every counted slot agrees with its target"
        assert loss.item() < 1e-6
    _, stats = chunked_loss(draft_out(1), eye, t_normed, Head, valid, ones, 4)
    assert stats[1].sum() < stats[2].sum() / 2


def test_greedy_step_inputs_by_hand():
    x = torch.tensor([10, 11, 12, 13, 14])
    g = torch.tensor([20, 21, 22, 23, 24])  # g[p] = the verifier's greedy token after x_0..x_p
    ids = greedy_step_ids(x, g, 3)
    assert ids[0].tolist() == [11, 12, 13, 14, 0]  # step 0 at slot t reads x_{t+1}
    assert ids[1].tolist() == [21, 22, 23, 24, 0]  # step 1 reads the accepted draft token g_{t+1}
    assert ids[2].tolist() == [22, 23, 24, 0, 0]  # step 2 reads g_{t+2}
