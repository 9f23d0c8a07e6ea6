"""The quantizer's distances in chunks: the same tokens as all distances at once, bounded memory, the zero-vector
token computed once per codebook state."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from nest.model.quantizer import QuantizerConfig, RandomProjectionQuantizer
from nest.calibrate.measure import TensorPeak


def all_at_once(q: RandomProjectionQuantizer, feats: torch.Tensor) -> torch.Tensor:
    """The quantizer as it was: the (B, T', N, C) distances in one tensor."""
    B, D, T = feats.shape
    n, d = q.cfg.num_books, q.cfg.code_dim
    x = feats.float().transpose(1, 2).reshape(B, T // q.combine, q.combine * D)
    x = F.normalize(q.proj(x).view(B, -1, n, d), dim=-1)
    dots = torch.einsum("btnd,ncd->btnc", x.double(), q.codebooks.double())
    if q.cfg.dist_fn == "cosine":
        return dots.argmax(-1)
    tokens = (q.codebooks.double().pow(2).sum(-1) - 2 * dots).argmin(-1)
    diff = torch.zeros(1, 1, *q.codebooks.shape[::2], 1, dtype=torch.float64, device=feats.device)
    diff = diff - q.codebooks.transpose(1, 2)[None, None]
    return torch.where(x.abs().amax(-1) == 0, diff.norm(dim=-2).argmin(-1)[0, 0], tokens)


@pytest.mark.parametrize("dist_fn", ["l2", "cosine"])
@pytest.mark.parametrize("books", [1, 3])
def test_chunks_give_the_tokens_of_all_distances_at_once(dist_fn, books, monkeypatch):
    torch.manual_seed(0)
    q = RandomProjectionQuantizer(QuantizerConfig(num_classes=512, num_books=books, dist_fn=dist_fn), 20, 4)
    feats = torch.randn(5, 20, 4 * 37)
    feats[1, :, 4 * 30:] = 0  # padded frames: zero vectors, tied codewords
    expected = all_at_once(q, feats)
    monkeypatch.setattr(RandomProjectionQuantizer, "chunk_elements", 7 * books * 512)  # 27 chunks, the last short
    tokens = q(feats)
    assert tokens.shape == (5, 37, books) and torch.equal(tokens, expected)
    assert q(feats[:0]).shape == (0, 37, books)  # an empty batch


def test_distances_of_a_nest_l_batch_take_a_chunk_of_memory():
    """62.5k tokens (about 83 minutes of audio) against 8192 codewords: 4 GB of float64 distances at once, and
    the old expression's two temporaries beside them; in chunks, 256 MiB."""
    q = RandomProjectionQuantizer(QuantizerConfig(), 80, 8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = q.to("cuda")
        feats = torch.randn(50, 80, 8 * 1250, device="cuda")
        with TensorPeak() as memory:
            q(feats)
        with TensorPeak() as before:
            all_at_once(q, feats)
    assert memory.peak < 270 * 2**20 and before.peak > 11 * 2**30, (memory.peak, before.peak)


def test_zero_vector_token_is_computed_once_per_codebook_state():
    q = RandomProjectionQuantizer(QuantizerConfig(num_classes=64, num_books=2), 8, 1)
    first = q.zero_vector_tokens()
    q(torch.randn(2, 8, 5))
    assert q.zero_vector_tokens() is first
    other = RandomProjectionQuantizer(QuantizerConfig(num_classes=64, num_books=2), 8, 1)
    q.load_state_dict(other.state_dict())
    assert q.zero_vector_tokens() is not first and torch.equal(q.zero_vector_tokens(), other.zero_vector_tokens())
    assert torch.equal(q.zero_vector_tokens(), (-q.codebooks).norm(dim=-1).argmin(-1))
