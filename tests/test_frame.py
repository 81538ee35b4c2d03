"""comm/frame.py's pieces that need no process group: the buffer pool and the layout of a
frame (the exchanges themselves: tests/test_agreement.py)."""
import numpy as np
import torch

from moe_flashcomm.comm import frame as F


def test_pool_reuses_by_size_class_and_keeps_a_bounded_amount():
    framing = F.Framing(10)
    a = framing.buffer(1000)
    assert a.head(1000).numel() == 1000 and a.tensor.numel() == F.POOL_MIN
    assert a.head(1000) is a.head(1000)  # (a repeated size keeps its view)
    assert a.array.ctypes.data == a.words.ctypes.data == a.tensor.data_ptr()
    framing.give_back(a)
    b = framing.buffer(2000)  # the same size class: the same storage
    assert b.head(2000).data_ptr() == a.tensor.data_ptr() and b.head(2000).numel() == 2000
    big = [framing.buffer(F.POOL_BYTES // 2 + 1) for _ in range(3)]
    for buf in big:
        framing.give_back(buf)
    assert framing._pooled <= F.POOL_BYTES  # one fits, the others are left to be collected
    assert sum(len(v) for v in framing._free.values()) == 1


def test_layout_splits_and_headers():
    legs = (None, F.Leg(3, 300, 7), F.Leg(0, 0), F.Leg(5, F.FRAME_BYTES))
    back = (None, F.Leg(2, 200, 7), F.Leg(1, 100), F.Leg(4, 400))
    lay = F.layout(0, 4, "all_to_all", torch.bfloat16, 64, legs, back, 0, 0)
    H = F.HEADER_BYTES
    assert lay.peers == (1, 2, 3)
    # round 1 sends the header and at most a frame's room; the last payload does not fit
    assert lay.in_splits == [0, H + 300, H, F.FRAME_BYTES] and not lay.fits
    assert lay.send_bytes == 3 * H + 300 + F.FRAME_BYTES
    # every peer gets a 16-byte aligned slot of at least a frame
    assert lay.out_splits == [0] + [F.FRAME_BYTES] * 3
    assert all(at % 16 == 0 for at in lay.recv_at.values())
    row = dict(zip(range(F.WORDS), lay.template[0].tolist()))
    assert row[0] == F.MAGIC and row[1] == F.OPERATIONS.index("all_to_all") + 1
    assert row[3] == 0 | 4 << 32 and row[4] == F.dtype_code(torch.bfloat16) | 64 << 8
    assert (row[5], row[6], row[7], row[8], row[10]) == (7, 3, 2, 300, 0)
    assert not lay.template.flags.writeable
    # an aborted frame sends headers only, flagged
    ab = F.layout(0, 4, "all_to_all", torch.bfloat16, 64, legs, back, 0, F.ABORTED)
    assert ab.in_splits == [0, H, H, H] and ab.fits
    assert np.all(ab.template[:, 10] == F.ABORTED) and np.all(ab.template[:, 8] == 0)
    # one round only where every payload, sent and received, fits its frame
    assert not lay.one_round and ab.one_round
    long_in = F.layout(0, 4, "all_to_all", torch.bfloat16, 64, back, legs, 0, 0)
    assert long_in.fits and not long_in.one_round  # rank 3's long payload: round 2


def test_expected_headers_mirror_the_peers_headers():
    """What rank a expects from rank b is exactly the header b sends to a when they agree,
    so the steady state is one array comparison (Frame.problems)."""
    rows = [[0, 3, 0], [2, 0, 5], [1, 4, 0]]  # rows[src][dst]
    wire = {(s, d): 7 if (s + d) % 2 else 1 for s in range(3) for d in range(3)}

    def lay(r):
        sends = tuple(None if q == r else F.Leg(rows[r][q], rows[r][q] * 16, wire[r, q])
                      for q in range(3))
        recvs = tuple(None if q == r else F.Leg(rows[q][r], rows[q][r] * 16, wire[q, r])
                      for q in range(3))
        return F.layout(r, 3, "all_reduce all-gather", torch.float16, 1024, sends, recvs, 77, 0)
    lays = [lay(r) for r in range(3)]
    for a in range(3):
        for b in range(3):
            if a != b:
                sent = lays[b].template[lays[b].peers.index(a)]
                assert np.array_equal(lays[a].expected[lays[a].peers.index(b)], sent)


def test_remember_makes_each_key_once_none_included():
    """memo.remember made a key again at every call where the thing made was None."""
    from moe_flashcomm.memo import remember
    made, table = [], {}
    for _ in range(3):
        assert remember(table, "k", lambda: made.append(1), 8) is None
    assert made == [1]
    for i in range(10):  # past the bound: emptied, then made again
        remember(table, i, lambda: made.append(1), 8)
    assert len(table) <= 9 and "k" not in table
