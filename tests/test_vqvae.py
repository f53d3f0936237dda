"""VQ-VAE shapes, gradients and the EMA codebook: python -m pytest tests/test_vqvae.py"""

import pytest
import torch

from run import DecoderOnly, patch_spread, texture_loss
from vqvae import VQVAE, Codebook, VQVAEConfig


def tiny(**kw):
    cfg = dict(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1, sequence_length=8,
               resolution=16)
    cfg.update(kw)
    return VQVAEConfig(**cfg)


@pytest.mark.parametrize("downsample",
                         [(1, 4, 4), (4, 2, 2), (2, 4, 4), (4, 4, 4), (1, 2, 2), (2, 1, 1)])
def test_shapes(downsample):
    torch.manual_seed(0)
    config = tiny(downsample=downsample)
    model = VQVAE(config)
    x = torch.rand(2, 3, 8, 16, 16) - 0.5
    out = model(x)
    latent = tuple(s // d for s, d in zip((8, 16, 16), downsample))
    assert config.latent_shape == latent
    assert out["recon"].shape == x.shape
    assert out["codes"].shape == (2, *latent) and out["codes"].dtype == torch.int64
    for k in ("loss", "recon_loss", "commitment_loss", "perplexity", "usage"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    model.eval()
    codes = model.encode(x)
    assert codes.shape == (2, *latent) and codes.max() < config.n_codes
    assert model.decode(codes).shape == x.shape


def test_any_input_size_divisible_by_downsample_works():
    model = VQVAE(tiny(downsample=(2, 4, 4))).eval()
    x = torch.rand(1, 3, 4, 24, 32) - 0.5          # not the training size, but divisible
    assert model.decode(model.encode(x)).shape == x.shape
    with pytest.raises(AssertionError, match="H=18 is not divisible"):
        model.encode(torch.zeros(1, 3, 4, 18, 32))


def test_gradients_reach_every_parameter_through_straight_through():
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=(2, 2, 2)))
    x = torch.rand(2, 3, 8, 16, 16) - 0.5
    # The reconstruction loss alone: the encoder can only get gradients through the estimator.
    model(x)["recon_loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    # The codebook is a set of buffers updated by EMA, never by gradients.
    assert not any(name.startswith("codebook") for name, _ in model.named_parameters())


def hand_made_codebook():
    cb = Codebook(n_codes=3, embedding_dim=2, decay=0.5, dead_code_threshold=1.0)
    cb.embeddings.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    cb.N.copy_(torch.tensor([2.0, 2.0, 0.5]))
    cb.z_avg.copy_(torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 5.0]]))
    cb.initialized.fill_(True)
    # Four latent vectors (B=1, D=2, t=1, h=1, w=4): two near code 0, two near code 1.
    flat = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [9.0, 1.0], [11.0, -1.0]])
    z = flat.t().reshape(1, 2, 1, 1, 4)
    return cb, flat, z


def test_ema_update_and_dead_code_restart_on_hand_made_numbers():
    cb, flat, z = hand_made_codebook()
    out = cb(z)
    assert out["codes"].flatten().tolist() == [0, 0, 1, 1]
    # Commitment: mean over all 8 numbers of (z - e)^2, every difference being +-1.
    assert out["commitment_loss"].item() == pytest.approx(1.0)
    # Histogram [2, 2, 0]: perplexity 2, two of three codes used.
    assert out["perplexity"].item() == pytest.approx(2.0, rel=1e-6)
    assert out["usage"].item() == pytest.approx(2 / 3)
    # N = 0.5 * [2, 2, 0.5] + 0.5 * [2, 2, 0];  z_avg = 0.5 * old + 0.5 * per-code sums.
    torch.testing.assert_close(cb.N, torch.tensor([2.0, 2.0, 0.25]))
    torch.testing.assert_close(cb.z_avg, torch.tensor([[0.0, 1.0], [20.0, 0.0], [0.0, 2.5]]))
    # e = z_avg / N for live codes (smoothing with eps 1e-7 changes nothing at this precision).
    torch.testing.assert_close(cb.embeddings[:2], torch.tensor([[0.0, 0.5], [10.0, 0.0]]))
    # Code 2 is dead (N = 0.25 < 1): restarted at one of this batch's encoder outputs.
    assert any(torch.equal(cb.embeddings[2], row) for row in flat)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_codebook_never_takes_a_non_finite_value(bad):
    cb, flat, z = hand_made_codebook()
    cb.initialized.fill_(True)
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    z[0, 1, 0, 0, 2] = bad                     # one number of one latent vector
    cb(z)
    assert all(torch.equal(before[k], v) for k, v in cb.state_dict().items())
    # An uninitialised codebook is not seeded from a non-finite first batch, but from the next good
    # one.
    fresh = Codebook(n_codes=3, embedding_dim=2)
    fresh(torch.full((1, 2, 1, 2, 2), bad))
    assert not fresh.initialized and torch.isfinite(fresh.embeddings).all()
    fresh(torch.randn(1, 2, 1, 2, 2))
    assert fresh.initialized and torch.isfinite(fresh.embeddings).all()


def test_restart_draws_from_tiled_inputs_when_batch_is_smaller_than_codebook():
    torch.manual_seed(0)
    cb = Codebook(n_codes=8, embedding_dim=2)
    flat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rows = cb.random_rows(flat)
    assert rows.shape == (8, 2)
    # Each row is an input plus noise of std 0.01 / sqrt(2).
    nearest = torch.cdist(rows, flat).min(dim=1).values
    assert (nearest < 0.05).all() and (nearest > 0).all()


def test_first_training_batch_initialises_codebook_and_eval_never_updates():
    torch.manual_seed(0)
    cb = Codebook(n_codes=3, embedding_dim=2)
    z = torch.randn(1, 2, 1, 2, 2)
    cb.eval()
    before = {k: v.clone() for k, v in cb.state_dict().items()}
    cb(z)
    assert all(torch.equal(before[k], v) for k, v in cb.state_dict().items())
    assert not cb.initialized
    flat = z.permute(0, 2, 3, 4, 1).reshape(-1, 2)
    cb.init_from(flat)
    assert cb.initialized and torch.equal(cb.N, torch.ones(3))
    assert all(any(torch.equal(e, row) for row in flat) for e in cb.embeddings)
    assert torch.equal(cb.z_avg, cb.embeddings)


def test_encode_never_updates_codebook_even_in_training_mode():
    model = VQVAE(tiny(downsample=(2, 4, 4)))
    model.train()
    before = {k: v.clone() for k, v in model.codebook.state_dict().items()}
    model.encode(torch.rand(1, 3, 8, 16, 16) - 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.codebook.state_dict().items())


def test_texture_loss_on_hand_made_patches():
    """A one-pixel checkerboard of +-0.1 against a flat picture: each 4x4 patch's spread is
    sqrt(16 * 0.01 / 15) (the unbiased estimate) at full resolution and 0 at half (2x2 pixels
    averaged), so the loss is half the first, over sqrt(0.06)."""
    signs = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1      # (8, 8)
    x = (0.1 * signs).float().expand(1, 3, 2, 8, 8).clone()                       # (B, C, T, H, W)
    spread = (16 * 0.01 / 15) ** 0.5
    assert torch.allclose(patch_spread(x, 4), torch.full((1, 3, 2, 2, 2), spread))
    assert texture_loss(torch.zeros_like(x), x).item() == pytest.approx(
        spread / 2 / 0.06 ** 0.5, rel=1e-6)
    assert texture_loss(x, x).item() == 0.0
    # Frames whose half is no whole number of patches: the last rows and columns are left out.
    assert patch_spread(torch.rand(1, 3, 2, 12, 10), 4).shape == (1, 3, 2, 3, 2)
    assert torch.isfinite(texture_loss(torch.rand(1, 3, 2, 12, 12), torch.rand(1, 3, 2, 12, 12)))
    # A texture of 2x2 blocks counts at both scales: its 2x2 averages keep it whole.
    blocks = x[..., :4, :4].repeat_interleave(2, -1).repeat_interleave(2, -2)     # (1, 3, 2, 8, 8)
    assert texture_loss(torch.zeros_like(x), blocks).item() == pytest.approx(
        spread / 0.06 ** 0.5, rel=1e-6)
    # It pulls a faint texture's patches apart: the gradient reaches every pixel, and a step
    # down it brings the spreads closer. (A perfectly flat patch has no gradient of its spread.)
    torch.manual_seed(0)
    faint = (0.01 * torch.randn_like(x)).requires_grad_()
    loss = texture_loss(faint, x)
    loss.backward()
    assert (faint.grad != 0).all()
    assert texture_loss(faint.detach() - 0.01 * faint.grad, x) < loss


def test_frozen_codes_stay_put_in_training_mode():
    """run.DecoderOnly (train.py --decoder_only): a training step's forward pass leaves the
    encoder's side in eval mode (its codebook neither averages nor restarts), and only the
    decoder's side takes gradients."""
    torch.manual_seed(0)
    model = DecoderOnly(tiny(downsample=(2, 4, 4), dead_code_threshold=100.0))
    model.codebook.init_from(torch.randn(32, 8))
    before = {k: v.clone() for k, v in model.coding().state_dict().items()}
    x = torch.rand(2, 3, 8, 16, 16) - 0.5
    for _ in range(2):   # as built, and after the loop's model.train()
        out = model(x)
        # the codebook's averages and the encoder's BatchNorm statistics alike
        assert all(torch.equal(before[k], v) for k, v in model.coding().state_dict().items())
        assert model.training and not model.encoder.training and model.decoder.training
        model.eval().train()
    (out["loss"] + texture_loss(out["recon"], x)).backward()
    tuned = {n for n, p in model.named_parameters() if p.grad is not None}
    assert tuned == {n for n, _ in model.named_parameters()
                     if n.startswith(("decoder.", "post_vq_conv."))}


def test_codebook_stays_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=(2, 4, 4)))
    x = torch.rand(2, 3, 8, 16, 16) - 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["commitment_loss"].dtype == torch.float32
    for name, buf in model.codebook.named_buffers():
        if name != "initialized":
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name
    out["loss"].backward()


@pytest.mark.parametrize("kw, message", [
    (dict(downsample=(3, 4, 4)), "powers of two"),
    (dict(downsample=(4, 4, 4), sequence_length=6), "sequence_length=6 is not a multiple of 4"),
    (dict(downsample=(1, 4, 4), resolution=18), "resolution=18 is not a multiple of 4"),
    (dict(downsample=(1, 1, 1)), "compresses nothing"),
    (dict(n_hiddens=15), "must be even"),
])
def test_bad_configs_are_refused_naming_the_value(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_paper_constants_and_the_normalized_mse_by_hand():
    """The paper's (and the original's) defaults, and loss = MSE / 0.06 + 0.25 * commitment,
    computed by hand."""
    c = VQVAEConfig()
    assert (c.embedding_dim, c.n_codes, c.n_hiddens, c.n_res_layers, c.downsample) == (256, 2048,
                                                                                       240, 4,
                                                                                       (4, 4, 4))
    assert (c.sequence_length, c.resolution, c.n_head) == (16, 64, 2)
    assert (c.commitment_cost, c.ema_decay, c.dead_code_threshold, c.data_variance) == (0.25, 0.99,
                                                                                        1.0, 0.06)
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=(2, 4, 4))).eval()
    x = torch.rand(2, 3, 8, 16, 16) - 0.5
    with torch.no_grad():
        out = model(x)
        z = model.pre_vq_conv(model.encoder(x))                              # (B, D, t, h, w)
    # Written out: the mean of the squared pixel errors over all 2*3*8*16*16 numbers, divided by
    # 0.06.
    mse = sum(float(d) ** 2 for d in (out["recon"] - x).flatten()) / x.numel()
    assert out["recon_loss"].item() == pytest.approx(mse / 0.06, rel=1e-5)
    # Commitment: the mean squared distance of each latent vector to its code, times beta = 0.25.
    e = model.codebook.embeddings[out["codes"]].permute(0, 4, 1, 2, 3)      # (B, D, t, h, w)
    assert out["commitment_loss"].item() == pytest.approx(0.25 * ((z - e) ** 2).mean().item(),
                                                          rel=1e-5)
    assert out["loss"].item() == pytest.approx(mse / 0.06 + 0.25 * ((z - e) ** 2).mean().item(),
                                               rel=1e-5)


def test_a_code_whose_count_is_exactly_the_threshold_lives():
    """Dead means N < dead_code_threshold: a code at exactly the threshold keeps its average."""
    cb, flat, z = hand_made_codebook()
    cb.N[2] = 2.0  # after this batch (no vector chooses it): 0.5 * 2 = 1.0, the threshold
    cb(z)
    assert cb.N[2].item() == 1.0
    # Not restarted: e_2 = z_avg_2 / N_2 = (0.5 * [0, 5]) / 1.0 (Laplace smoothing moves it by
    # ~1e-7).
    torch.testing.assert_close(cb.embeddings[2], torch.tensor([0.0, 2.5]))


def test_training_forward_reconstructs_from_the_codes_it_returns():
    """The straight-through estimator passes the codes' vectors forward: recon = decode(codes),
    exactly."""
    torch.manual_seed(0)
    model = VQVAE(tiny(downsample=(2, 4, 4)))
    x = torch.rand(2, 3, 8, 16, 16) - 0.5
    model(x)                                     # a training step initialises the codebook
    model.eval()
    out = model(x)
    torch.testing.assert_close(out["recon"], model.decode(out["codes"]), atol=1e-6, rtol=0)


def test_ema_weights_new_statistics_by_one_minus_decay():
    """decay 0.75 (not 0.5, where decay = 1 - decay): N = 0.75 N + 0.25 n, z_avg = 0.75 z_avg + 0.25
    sums."""
    cb, flat, z = hand_made_codebook()
    cb.decay = 0.75
    cb(z)
    torch.testing.assert_close(cb.N, torch.tensor([2.0, 2.0, 0.375]))
    torch.testing.assert_close(cb.z_avg, torch.tensor([[0.0, 0.5], [20.0, 0.0], [0.0, 3.75]]))
    torch.testing.assert_close(cb.embeddings[:2], torch.tensor([[0.0, 0.25], [10.0, 0.0]]))


def test_an_encoder_without_attention_sees_only_its_neighbourhood_and_the_decoder_its_depth():
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=0,
                         decoder_res_layers=1,
                         downsample=(2, 4, 4), sequence_length=4, resolution=32)
    model = VQVAE(config).eval()
    # (BN, ReLU) vs block + (BN, ReLU)
    assert len(model.encoder.res_stack) == 2 and len(model.decoder.res_stack) == 3
    assert VQVAEConfig(**config.to_dict()) == config  # saved and restored as is
    assert VQVAEConfig(n_res_layers=2).decoder_res_layers == 2  # default: the encoder's count
    # Changing the bottom-right corner of the clip leaves the latents of the top rows unchanged
    # (local codes).
    torch.manual_seed(0)
    x = torch.rand(1, 3, 4, 32, 32) - 0.5
    y = x.clone()
    y[..., 24:, 24:] = 0.5
    with torch.no_grad():
        a, b = (model.pre_vq_conv(model.encoder(v)) for v in (x, y))  # (1, 8, 2, 8, 8)
    assert torch.equal(a[..., :3, :], b[..., :3, :]) and not torch.equal(a, b)
    # With (axial) attention in the encoder, the top rows see it through the changed columns.
    with torch.no_grad():
        model = VQVAE(VQVAEConfig(**{**config.to_dict(), "n_res_layers": 1})).eval()
        a, b = (model.pre_vq_conv(model.encoder(v)) for v in (x, y))
    assert not torch.equal(a[..., :3, 6:], b[..., :3, 6:])


def test_a_local_encoder_gives_each_code_its_own_patch_only():
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=0,
                         decoder_res_layers=1,
                         downsample=(2, 4, 4), sequence_length=4, resolution=16, local_encoder=True)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 4, 16, 16) - 0.5
    y = x.clone()
    y[:, :, 2:4, 4:8, 8:12] = 0.5                      # exactly the patch of latent cell (1, 1, 2)
    for local in (True, False):
        model = VQVAE(VQVAEConfig(**{**config.to_dict(), "local_encoder": local})).eval()
        with torch.no_grad():
            encode = lambda v: model.pre_vq_conv(model.encoder(v))
            changed = (encode(x) != encode(y)).any(1)[0]                    # (2, 4, 4)
        if local:
            assert changed.nonzero().tolist() == [[1, 1, 2]]
        else:   # the original's 4-wide kernels: the neighbours see it too
            assert changed.sum() > 4 and changed[1, 1, 2]
    # Equal patches get equal codes wherever they are: an empty clip is one code throughout.
    model = VQVAE(config).eval()
    assert model.encode(torch.full((1, 3, 4, 16, 16), -0.5)).unique().numel() == 1
    assert VQVAEConfig(**config.to_dict()) == config and VQVAEConfig().local_encoder is False
    with pytest.raises(ValueError,
                       match="local_encoder needs n_res_layers=0: the encoder's attention"):
        VQVAEConfig(**{**config.to_dict(), "n_res_layers": 1})
