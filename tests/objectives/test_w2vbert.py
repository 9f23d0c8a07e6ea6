"""Wav2vec-BERT objective on small configs: masking law, negatives, NeMo's failure modes, schedule, training."""
import random

import pytest
import soundfile as sf
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nest.model import EncoderConfig
from nest.objectives import ModelConfig, W2vBertConfig
from nest.objectives.w2vbert import W2vBertModel, sample_freq_mask, sample_patch_mask
from nest.objectives.w2vbert_loss import (
    contrastive_logits,
    contrastive_loss,
    negatives_from_ranks,
    sample_negatives,
)


def tiny_config(**w2vbert) -> ModelConfig:
    w = dict(decoder_out=16, codebook_size=8, num_groups=2, num_negatives=4) | w2vbert
    return ModelConfig(objective="w2vbert", w2vbert=W2vBertConfig(**w),
                       encoder=EncoderConfig(n_layers=2, d_model=32, n_heads=4, subsampling_conv_channels=16))


def nemo_patch_mask(lens, T, patch=48, mask_patches=0.5):
    """NeMo's MaskedPatchAugmentation time masking, one utterance at a time with Python's random."""
    min_len = lens.min()
    if mask_patches >= 1:
        n = int(mask_patches)
    else:
        frac = int(min_len * mask_patches)
        n = frac // patch + int(frac % patch != 0)
    if min_len < patch * n:
        n = int(min_len // patch)
    mask = torch.zeros(len(lens), T, dtype=torch.bool)
    for i, L in enumerate(lens.tolist()):
        for p in random.sample(range(L // patch), n):
            mask[i, p * patch : (p + 1) * patch] = True
    return mask


@pytest.mark.parametrize("lens,mask_patches,n", [([100, 230, 500], 0.5, 2), ([40, 300], 0.5, 0), ([60, 300], 3, 1),
                                                  ([500, 510], 4, 4)])
def test_patch_mask_law_matches_nemo(lens, mask_patches, n):
    """Patch count from the shortest utterance; uniform whole patches of each utterance."""
    torch.manual_seed(0)
    random.seed(0)
    lens, T, draws = torch.tensor(lens), 512, 400
    ours = torch.stack([sample_patch_mask(lens, T, 48, mask_patches) for _ in range(draws)])  # (draws, B, T)
    ref = torch.stack([nemo_patch_mask(lens, T, 48, mask_patches) for _ in range(draws)])
    assert (ours.sum(-1) == 48 * n).all()  # exactly n patches in every utterance, every draw
    assert torch.equal(ours.sum(-1), ref.sum(-1))
    patches = ours[..., : T // 48 * 48].reshape(draws, len(lens), -1, 48)
    assert (patches.all(-1) | ~patches.any(-1)).all()  # aligned whole patches
    for b, L in enumerate(lens.tolist()):
        assert not ours[:, b, L // 48 * 48 :].any()  # never a partial patch at the end
        if n:
            freq = patches[:, b, : L // 48, 0].float().mean(0)
            ref_freq = ref[:, b, : L // 48 * 48 : 48].float().mean(0)
            assert (freq - n / (L // 48)).abs().max() < 0.1 and (freq - ref_freq).abs().max() < 0.12


def test_freq_masks_have_nemo_widths_and_are_seeded():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = sample_freq_mask(500, 80, 1, 20, torch.device("cpu"), g())
    assert torch.equal(a, sample_freq_mask(500, 80, 1, 20, torch.device("cpu"), g()))
    widths = a.sum(-1)
    assert widths.max() <= 19 and (widths == 0).any()  # widths drawn from [0, 20)
    assert abs(widths.float().mean().item() - 9.5) < 1.0
    assert sample_freq_mask(4, 80, 3, 20, torch.device("cpu")).sum(-1).max() <= 57


def test_temperature_schedule_by_step():
    model = W2vBertModel(tiny_config(quantizer_temp_start=2.0, quantizer_temp_min=0.5, quantizer_temp_decay=0.999995))
    for step, temp in [(0, 2.0), (1000, 2.0 * 0.999995**1000), (200_000, 2.0 * 0.999995**200_000), (10**7, 0.5)]:
        model.set_num_updates(step)
        assert model.quantizer.curr_temp == pytest.approx(temp)


def reference_contrastive(out, targets, mask, neg, temp, prob_ppl, weight, multiplier):
    """NeMo's ContrastiveLoss arithmetic, one masked step at a time (any masked counts per utterance)."""
    total = torch.zeros(())
    for b in range(out.shape[0]):
        for q in mask[b].nonzero().flatten().tolist():
            cands = torch.cat([targets[b, q][None], targets[b, neg[b, q]]])  # (1 + K, P)
            logits = F.cosine_similarity(out[b, q][None].expand_as(cands), cands, dim=-1) / temp
            logits[1:][(cands[1:] == cands[0]).all(-1)] = float("-inf")
            total = total + F.cross_entropy(logits[None], torch.zeros(1, dtype=torch.long), reduction="sum")
    return (total + weight * prob_ppl * mask.sum()) * multiplier / out.shape[0]


def test_unequal_masked_counts_nemo_4589():
    """Utterances with different numbers of masked steps: negatives stay within each utterance."""
    torch.manual_seed(0)
    B, T, K, P = 3, 20, 4, 6
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:5] = True  # 3 < K masked steps: drawn with replacement (NeMo #4587)
    mask[1, 5:17] = True  # 12
    mask[2, [0, 9]] = True  # 2
    neg = sample_negatives(mask, K)
    assert neg.shape == (B, T, K)
    for b in range(B):
        assert mask[b][neg[b][mask[b]]].all()  # only masked steps of the same utterance
    assert all(len(set(row.tolist())) == K for row in neg[1][mask[1]])  # distinct when there are enough
    # Uniform over the candidates (the step itself included), as NeMo's multinomial draw.
    draws = torch.stack([sample_negatives(mask, K) for _ in range(300)])
    hits = F.one_hot(draws[:, 1, 5:17], T).sum((0, 1, 2)).float()[5:17] / (300 * 12 * K)
    assert (hits - 1 / 12).abs().max() < 0.02
    # The loss equals NeMo's arithmetic done step by step, targets with repeated vectors included.
    out, codes = torch.randn(B, T, P), torch.randint(0, 3, (B, T))
    targets = torch.randn(3, P)[codes]
    logits = contrastive_logits(out, targets, codes, neg, 0.1)
    ours = contrastive_loss(logits, mask, torch.tensor(0.3), 0.1, "sum", 16.0)
    ref = reference_contrastive(out, targets, mask, neg, 0.1, torch.tensor(0.3), 0.1, 16.0)
    assert torch.allclose(ours, ref, rtol=1e-5)
    # NeMo's recorded layout of negatives needs equal counts: a clear error otherwise.
    with pytest.raises(ValueError, match=r"masked steps in every utterance.*\[3, 12, 2\]"):
        negatives_from_ranks(mask, torch.zeros(3, K, dtype=torch.long))


def test_fewer_masked_steps_than_negatives_nemo_4587():
    """Fewer masked steps than num_negatives, one, or none: defined, finite losses and gradients."""
    torch.manual_seed(0)
    B, T, K, P = 2, 10, 8, 4
    out = torch.randn(B, T, P, requires_grad=True)
    targets = torch.randn(B, T, P)
    keys = torch.arange(T).expand(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 3] = True  # one masked step: every negative is itself, masked as equal to the positive
    logits = contrastive_logits(out, targets, keys, sample_negatives(mask, K), 0.1)
    assert torch.isinf(logits[0, 3, 1:]).all() and contrastive_loss(logits, mask, None, 0.0, "sum", 16.0) == 0
    mask[1, :3] = True  # three masked steps < K: with replacement, never an error
    loss = contrastive_loss(contrastive_logits(out, targets, keys, sample_negatives(mask, K), 0.1),
                            mask, None, 0.0, "sum", 16.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(out.grad).all()
    none = torch.zeros(B, T, dtype=torch.bool)  # nothing masked: 0 (NeMo: 0 with sum, NaN with mean)
    for reduce in ("sum", "mean"):
        lg = contrastive_logits(out, targets, keys, sample_negatives(none, K), 0.1)
        assert contrastive_loss(lg, none, torch.tensor(0.5), 0.1, reduce, 16.0) == 0


def test_utterances_shorter_than_a_patch_mask_nothing():
    """The shortest utterance below patch_size: no patch anywhere, losses 0 and finite (NeMo: MLM NaN)."""
    model = W2vBertModel(tiny_config(freq_masks=0))
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([4000, 16000])  # 25 frames < 48
    out = model(audio, lens, audio, lens)
    assert not out.frame_mask.any() and not out.step_mask.any()
    assert out.contrastive_loss == 0 and out.mlm_loss == 0 and torch.isfinite(out.loss)


class SyncRecorder(TorchDispatchMode):
    """Records the operators that make a device wait for the host (or the host for the device)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None
        )
        if bool_index or any(s in name for s in ("_local_scalar_dense", "nonzero", "masked_select", "unique")):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


def test_forward_backward_finite_and_free_of_host_syncs():
    torch.manual_seed(0)
    model = W2vBertModel(tiny_config()).train()
    model.set_num_updates(10)
    audio = torch.randn(3, 24000) * 0.1
    lens = torch.tensor([24000, 17000, 20000])
    noisy = audio + 0.01 * torch.randn_like(audio)
    with SyncRecorder() as rec:
        out = model(audio, lens, noisy, lens)
        out.loss.backward()
    assert rec.syncs == []
    assert torch.isfinite(out.loss) and out.loss.dim() == 0 and out.mlm_loss > 0 and out.contrastive_loss > 0
    for name in ("encoder.layers.0.self_attn.linear_q.weight", "quantizer.weight_proj.weight", "quantizer.vars",
                 "contrastive_decoder.decoder_layers.0.weight", "mlm_decoder.decoder_layers.0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    metrics = model.metrics(out)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in metrics.values())
    assert {"contrastive_loss", "mlm_loss", "codebook_perplexity", "prob_ppl", "gumbel_temperature", "codes_used"} <= set(metrics)
    # Counting masked steps: the patches of the shortest utterance decide for all.
    assert (out.step_mask.sum(1) == out.step_mask.sum(1)[0]).all()


def test_targets_come_from_clean_audio_and_mlm_start_step():
    torch.manual_seed(0)
    model = W2vBertModel(tiny_config(mlm_start_step=100)).eval()
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 16000])
    noisy = audio + 0.5 * torch.randn_like(audio)
    with torch.no_grad():
        a = model(audio, lens, noisy, lens)
        b = model(audio, lens, audio, lens, frame_mask=a.frame_mask, freq_mask=a.freq_mask)
        assert torch.equal(a.target_ids, b.target_ids)  # the noisy input does not change the targets
        assert a.loss == a.contrastive_loss  # before mlm_start_step
        model.set_num_updates(100)
        c = model(audio, lens, noisy, lens)
        assert torch.allclose(c.loss, c.contrastive_loss + 1000.0 * c.mlm_loss)


def test_bf16_autocast_keeps_targets_float32():
    torch.manual_seed(0)
    model = W2vBertModel(tiny_config()).eval()
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 13000])
    masks = model(audio, lens, audio, lens)
    with torch.no_grad():
        torch.manual_seed(1)  # the same negatives in both
        ref = model(audio, lens, audio, lens, frame_mask=masks.frame_mask, freq_mask=masks.freq_mask)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(audio, lens, audio, lens, frame_mask=masks.frame_mask, freq_mask=masks.freq_mask)
    assert torch.equal(bf.target_ids, ref.target_ids) and bf.logits.dtype == torch.float32
    assert abs(bf.loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()


def test_linear_targets_variant_trains():
    """quantized_targets=false (NeMo's YAML as shipped): a linear target projection, no MLM."""
    model = W2vBertModel(tiny_config(quantized_targets=False, mlm=False)).train()
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    out = model(audio, lens, audio, lens)
    out.loss.backward()
    assert out.target_ids is None and torch.isfinite(out.loss) and model.target_proj.weight.grad is not None


def test_loss_goes_down_on_real_speech(real_data):
    """A few steps on two real utterances: the objective is learnable end to end."""
    clips = [sf.read(real_data / "speech" / f"spk1_snt{i}.wav", dtype="float32")[0][:24000] for i in (1, 2)]
    audio = torch.stack([torch.from_numpy(c) for c in clips])
    lens = torch.tensor([24000, 24000])
    torch.manual_seed(0)
    model = W2vBertModel(tiny_config(num_negatives=8, mlm_alpha=1.0)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(1)  # the same masks, negatives and Gumbel draws every step
        model.set_num_updates(step)
        out = model(audio, lens, audio, lens)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.loss.item(), out.mlm_loss.item()))
    assert losses[-1][0] < 0.8 * losses[0][0] and losses[-1][1] < losses[0][1], losses


def test_nest_model_has_the_same_logging_interface():
    from nest.objectives import NestModel
    from tests.objectives.test_model import tiny_config as nest_config

    torch.manual_seed(0)
    model = NestModel(nest_config())
    model.set_num_updates(5)
    audio, lens = torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000])
    out = model(audio, lens, audio, lens)
    metrics = model.metrics(out)
    assert set(metrics) == {"masked_accuracy", "target_perplexity", "masked_fraction", "codes_used"}
    sel = out.token_mask[:, : out.log_probs.shape[1]]
    expected = (out.log_probs.argmax(2) == out.tokens[:, : out.log_probs.shape[1]])[sel].float().mean()
    assert torch.allclose(metrics["masked_accuracy"], expected)
    assert 1.0 <= metrics["target_perplexity"] <= 32.0


def test_quantizer_weight_std_and_layer_norm_are_ours_and_off_by_default():
    from nest.objectives.w2vbert_loss import GumbelVectorQuantizer

    w = W2vBertConfig()
    assert (w.quantizer_weight_std, w.quantizer_norm) == (1.0, "none")  # NeMo's quantizer
    x = torch.randn(2, 5, 640)
    torch.manual_seed(0)
    nemo = GumbelVectorQuantizer(640, 16, 2, 32, (2.0, 0.5, 0.999995)).eval()
    assert 20 < nemo.weight_proj(x).std() < 30  # NeMo's init on 640 unit-variance inputs: a saturated softmax
    torch.manual_seed(0)
    small = GumbelVectorQuantizer(640, 16, 2, 32, (2.0, 0.5, 0.999995), weight_std=640**-0.5).eval()
    assert 0.7 < small.weight_proj(x).std() < 1.3
    assert torch.equal(small(x)[1], nemo(x)[1])  # the same directions: the same argmax codes
    normed = GumbelVectorQuantizer(640, 16, 2, 32, (2.0, 0.5, 0.999995), norm="layer").eval()
    louder = x * 3.0 + 1.0  # each step scaled and offset: the same codes after the LayerNorm
    assert torch.equal(normed(louder)[1], normed(x)[1]) and not torch.equal(nemo(louder)[1], nemo(x)[1])
