"""The fast paths against the lesson's: attention kernels, the fused and compiled sampler, long
videos.

python -m pytest tests/test_fast.py

Every fast path in fast.py (and fast.sample_long) is checked here against
the plain implementation it stands in for: the same outputs and gradients,
the same codes for the same generator.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention import attention, causal_mask
from conftest import VARIANTS, inputs, tiny_prior
from fast import (EXPLICIT_MAX_KEYS, cached_condition, compiled_step, decode_one_token,
                  explicit_attention, fast_attention, flex_available, generate, prefill,
                  sparse_block_mask, use_fast_attention, sample_long, use_channels_last,
                  use_grad_checkpointing)
from gpt import GPTConfig, VideoGPT
from vqvae import VQVAE, VQVAEConfig

# -----------------------------------------------------------------------------
# Attention kernels


def test_fast_attention_writes_short_bfloat16_cpu_attention_out_and_leaves_the_rest_to_sdpa():
    g = torch.Generator().manual_seed(0)
    L = 80
    q, k, v = (torch.randn(2, 3, L, 8, generator=g, requires_grad=True) for _ in range(3))
    causal = causal_mask(L)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # float32, a prior's whole causal mask: SDPA's is_causal kernel itself (no mask in memory).
    assert torch.equal(fast_attention(q, k, v, causal, pattern="full"), fused)
    # The lesson's formula agrees to float32 rounding.
    torch.testing.assert_close(attention(q, k, v, causal), fused, atol=1e-5, rtol=1e-5)
    # bfloat16: the formula written out with the causal mask, which agrees with the fused kernel to
    # bfloat16 precision, gradients included.
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = fast_attention(qb, kb, vb, causal, pattern="full")
    assert torch.equal(out, explicit_attention(qb, kb, vb, causal))
    torch.testing.assert_close(out.float(), fused, atol=3e-2, rtol=0)
    out.float().pow(2).sum().backward()
    fused.pow(2).sum().backward()
    torch.testing.assert_close(qb.grad.float(), q.grad, atol=0.1, rtol=0.05)
    # A boolean mask is honoured the same way.
    mask = torch.rand(L, L, generator=g) < 0.5
    mask[:, 0] = True                                            # every query sees at least one key
    torch.testing.assert_close(fast_attention(qb, kb, vb, mask).float(),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=3e-2,
                               rtol=0)
    # float32 without a pattern (the VQ-VAE's axial attention, cross-attention): SDPA, the lesson's
    # numbers.
    qs, ks, vs = (t[:, :, :16].detach() for t in (q, k, v))
    assert torch.equal(fast_attention(qs, ks, vs), F.scaled_dot_product_attention(qs, ks, vs))
    torch.testing.assert_close(fast_attention(qs, ks, vs), attention(qs, ks, vs), atol=1e-6,
                               rtol=1e-5)
    # Dropout, or more keys than EXPLICIT_MAX_KEYS: SDPA (same seed, same draws).
    torch.manual_seed(1)
    a = fast_attention(qb, kb, vb, causal, dropout_p=0.5, pattern="full")
    torch.manual_seed(1)
    assert torch.equal(a, F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, dropout_p=0.5))
    L = EXPLICIT_MAX_KEYS + 1
    ql, kl, vl = (torch.randn(1, 1, L, 8, generator=g).bfloat16() for _ in range(3))
    assert torch.equal(fast_attention(ql, kl, vl, causal_mask(L), pattern="full"),
                       F.scaled_dot_product_attention(ql, kl, vl, is_causal=True))


def same_losses_and_gradients(plain, other, loss, atol):
    """`loss(model)` and every parameter's gradient agree between two models holding the same
    weights (float32: only the order of sums differs between the two routes)."""
    out = [loss(m) for m in (plain, other)]
    torch.testing.assert_close(out[1], out[0], atol=atol, rtol=1e-5)
    for o in out:
        o.backward()
    for (name, a), b in zip(plain.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", ["full", "sparse", "frames+actions", "rope"])
def test_a_prior_with_fast_attention_gives_the_lessons_logits_and_gradients(variant):
    plain = tiny_prior(**VARIANTS[variant])
    fast = use_fast_attention(tiny_prior(**VARIANTS[variant]))
    codes, given = inputs(plain)
    torch.testing.assert_close(fast(codes, **given), plain(codes, **given), atol=1e-5, rtol=1e-5)
    same_losses_and_gradients(plain, fast,
                              lambda m: F.cross_entropy(m(codes, **given).flatten(0, 3),
                                                        codes.flatten()),
                              atol=1e-5)


def tiny_vqvae_pair(make_other):
    """A small VQ-VAE in eval mode and `make_other(VQVAE)` with the same weights; a clip."""
    config = VQVAEConfig(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1,
                         downsample=(2, 4, 4), sequence_length=4, resolution=16)
    torch.manual_seed(0)
    plain = VQVAE(config).eval()
    other = make_other(VQVAE(config).eval())
    other.load_state_dict(plain.state_dict())
    return (plain, other,
            torch.rand(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1)) - 0.5)


def test_a_vqvae_with_fast_attention_gives_the_lessons_reconstruction_and_gradients():
    plain, fast, x = tiny_vqvae_pair(use_fast_attention)
    same_losses_and_gradients(plain, fast, lambda m: m(x)["loss"], atol=1e-6)


def test_a_channels_last_vqvae_gives_the_same_loss_and_gradients_and_only_in_cpu_float32():
    plain, last, x = tiny_vqvae_pair(lambda vq: use_channels_last(vq, "cpu", "float32"))
    weight = last.encoder.convs[0].conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    same_losses_and_gradients(plain, last, lambda m: m(x)["loss"], atol=1e-6)
    # bfloat16 (slower so on a CPU) and other devices keep the layout PyTorch makes.
    for device, dtype in (("cpu", "bfloat16"), ("cuda", "float32")):
        kept = use_channels_last(VQVAE(plain.config), device, dtype).encoder.convs[0].conv.weight
        assert kept.is_contiguous()


@pytest.mark.skipif(not flex_available(), reason="FlexAttention needs PyTorch >= 2.5")
def test_flex_attention_visits_the_sparse_tiles_and_gives_the_dense_masks_logits():
    gpt = tiny_prior(latent_shape=(2, 8, 8), attn_type="sparse", sparse_block=16,
                     sparse_local_blocks=1).eval()
    assert gpt.mask.float().mean() < 0.3                                   # really sparse
    # The block mask's own rule, evaluated everywhere, is the dense mask; it is made once per mask.
    block_mask = sparse_block_mask(gpt.mask, 16)
    assert sparse_block_mask(gpt.mask, 16) is block_mask
    L = gpt.config.seq_len
    q, kv = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
    assert torch.equal(block_mask.mask_mod(0, 0, q, kv), gpt.mask)
    codes = torch.randint(16, (2, 2, 8, 8), generator=torch.Generator().manual_seed(0))
    dense = gpt(codes)
    use_fast_attention(gpt)
    calls = []
    import fast
    real = fast.flex_attention
    fast.flex_attention = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            flex = gpt(codes)
        assert len(calls) == gpt.config.layers  # every block went through the tiles
        # Training on a CPU keeps the dense mask: FlexAttention's CPU kernels have no backward.
        calls.clear()
        gpt(codes)
        assert not calls
    finally:
        fast.flex_attention = real
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients():
    gpt = tiny_prior(n_cond_frames=1, resolution=16).train()
    codes, cond = inputs(gpt)
    frames = cond["frames"]
    calls = []
    gpt.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    grads = []
    for flag in (False, True):
        gpt.zero_grad()
        calls.clear()
        use_grad_checkpointing(gpt, flag)
        F.cross_entropy(gpt(codes, frames=frames).flatten(0, 3), codes.flatten()).backward()
        grads.append([p.grad.clone() for p in gpt.parameters()])
        assert len(calls) == (2 if flag else 1)  # the block's forward ran again in backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():                                          # evaluation is not checkpointed
        calls.clear()
        gpt(codes, frames=frames)
        assert len(calls) == 1


# -----------------------------------------------------------------------------
# The fast sampler


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_steps_give_the_teacher_forced_logits_and_generate_draws_the_lessons_codes(variant):
    gpt = tiny_prior(**VARIANTS[variant]).eval()
    codes, given = inputs(gpt)
    B, L = 3, gpt.config.seq_len
    full = gpt(codes, **given).view(B, L, -1)
    # Feed the same codes through prefill + decode_one_token: every step's logits match, attending
    # over the whole cache with a mask (fixed shapes, for CUDA graphs) or over the written prefix.
    cond = cached_condition(gpt, given["label"], given["frames"], B, given["actions"])
    flat = codes.view(B, L)
    for prefix_only in (False, True):
        caches = gpt.setup_caches(B, "cpu")
        steps = [prefill(gpt, cond, caches, B)]
        for i in range(1, L):
            steps.append(decode_one_token(gpt, flat[:, i - 1], torch.tensor([i]), cond, caches,
                                          length=i + 1 if prefix_only else None))
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    # Same generator, same codes, for the fast and the lesson's sampler, with filtering on (on two
    # variants: the draw is the same function everywhere).
    filters = [dict()]
    if variant in ("full", "rope"):
        filters += [dict(temperature=0.7, top_k=5), dict(top_p=0.8)]
    for kw in filters:
        a = generate(gpt, B, **given, generator=torch.Generator().manual_seed(3), **kw)
        b = gpt.sample(B, **given, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(a, b), kw


def test_compiled_sampling_draws_the_eager_codes_and_is_made_once():
    gpt = tiny_prior(layers=1).eval()   # one block: half the code to compile, twice
    eager = generate(gpt, 2, temperature=0.9, top_k=8, generator=torch.Generator().manual_seed(5))
    compiled = generate(gpt, 2, temperature=0.9, top_k=8,
                        generator=torch.Generator().manual_seed(5), compile=True)
    assert torch.equal(compiled, eager)
    first = compiled_step(gpt, 2, 0.9, 8, None)
    assert compiled_step(gpt, 2, 0.9, 8, None) is first
    # A weight changed since (a training step): the frozen code would be stale, so it is made again.
    with torch.no_grad():
        gpt.fc_out.weight.mul_(-1.0)
    again = generate(gpt, 2, temperature=0.9, top_k=8, generator=torch.Generator().manual_seed(5),
                     compile=True)
    assert compiled_step(gpt, 2, 0.9, 8, None) is not first
    assert torch.equal(again,
                       gpt.sample(2, temperature=0.9, top_k=8,
                                  generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(again, eager)


def test_prefilled_prefix_gives_the_teacher_forced_logits_and_keeps_the_given_codes():
    gpt = tiny_prior(**VARIANTS["class"]).eval()
    codes, given = inputs(gpt)
    B, L = 3, gpt.config.seq_len
    full = gpt(codes, **given).view(B, L, -1)
    P = 16  # the first latent time step, 4x4 codes
    cond = cached_condition(gpt, given["label"], None, B)
    caches = gpt.setup_caches(B, "cpu")
    flat = codes.view(B, L)
    # one pass over the start vector and P codes
    steps = [prefill(gpt, cond, caches, B, flat[:, :P])]
    for i in range(P + 1, L):
        steps.append(decode_one_token(gpt, flat[:, i - 1], torch.tensor([i]), cond, caches,
                                      length=i + 1))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, P:], atol=1e-5, rtol=1e-5)
    drawn = generate(gpt, B, given["label"], prefix=codes[:, :1],
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn[:, :1], codes[:, :1])


# -----------------------------------------------------------------------------
# Longer videos: the prior's window slid over latent time (fast.sample_long)


@pytest.mark.parametrize("variant", ["full", "sparse", "class"])
def test_a_long_sample_starts_with_the_ordinary_sample_and_slides_its_window(variant):
    # latent t = 2: 2 frames per latent step
    gpt = tiny_prior(**VARIANTS[variant], sequence_length=4).eval()
    _, given = inputs(gpt)
    ordinary = gpt.sample(3, given["label"], generator=torch.Generator().manual_seed(5))
    same = sample_long(gpt, 3, 4, label=given["label"], generator=torch.Generator().manual_seed(5))
    assert torch.equal(ordinary, same)  # a window equal to the trained length: the same sample
    long = sample_long(gpt, 3, 10, 1, label=given["label"],
                       generator=torch.Generator().manual_seed(5))
    assert long.shape == (3, 5, 4, 4) and torch.equal(long[:, :2], ordinary)
    # Each later window is the prior's sample given the previous step as its prefix (positions
    # restarted).
    g = torch.Generator().manual_seed(5)
    gpt.sample(3, given["label"], generator=g)
    nxt = generate(gpt, 3, given["label"], prefix=long[:, 1:2], generator=g)
    assert torch.equal(nxt[:, 1], long[:, 2])


def test_a_long_sample_slides_by_half_its_window_by_default():
    # t = 4 latent steps, 2 frames each
    gpt = tiny_prior(latent_shape=(4, 2, 2), sequence_length=8).eval()
    draw = lambda **kw: sample_long(gpt, 2, 16, generator=torch.Generator().manual_seed(1), **kw)
    default = draw()
    assert torch.equal(default, draw(stride=2))                # t // 2 new latent steps per window
    assert not torch.equal(default, draw(stride=3))


def test_long_sampling_refuses_lengths_it_cannot_make():
    gpt = tiny_prior(sequence_length=4).eval()
    for frames_out, what in ((7, "multiple of the VQ-VAE's temporal stride 2"),
                             (2, "at least the trained 4 frames")):
        with pytest.raises(ValueError, match=what):
            sample_long(gpt, 1, frames_out)
    with pytest.raises(ValueError,
                       match="stride=3 must be between 1 and the window's 2 latent steps"):
        sample_long(gpt, 1, 8, 3)
    with pytest.raises(ValueError, match="needs frames_fn"):
        sample_long(tiny_prior(**VARIANTS["frames"], sequence_length=4).eval(), 1, 8,
                    frames=torch.zeros(1, 3, 1, 8, 8))


def moving_dots(n, rng, steps=4, cells=8):
    """Codes (n, steps, 1, cells) of a dot moving one cell right per step around a ring; its start
    cells (n,)."""
    start = rng.integers(cells, size=n)
    where = (start[:, None] + np.arange(steps)) % cells                       # (n, steps)
    codes = np.zeros((n, steps, cells), np.int64)
    np.put_along_axis(codes, where[..., None], 1, axis=-1)
    return torch.from_numpy(codes).view(n, steps, 1, cells), start


def test_a_sliding_window_continues_periodic_motion_past_the_trained_length():
    torch.manual_seed(0)
    gpt = VideoGPT(GPTConfig(latent_shape=(4, 1, 8), n_codes=2, embedding_dim=4, hidden_dim=48,
                             heads=4, layers=2, dropout=0.0, attn_dropout=0.0, sequence_length=4))
    gpt.codebook.copy_(torch.eye(2, 4))
    opt = torch.optim.Adam(gpt.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        codes, _ = moving_dots(32, rng)
        loss = torch.nn.functional.cross_entropy(gpt(codes).flatten(0, 3), codes.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        # 4x the window
        video = sample_long(gpt.eval(), 32, 16, generator=torch.Generator().manual_seed(0))
    where = video[:, :, 0].argmax(-1).numpy()  # (32, 16) dot cell per step
    expected = (where[:, :1] + np.arange(16)) % 8
    # distance on the ring, per step
    error = np.minimum(abs(where - expected), 8 - abs(where - expected))
    # A dot placed at random is 2 cells off on average; past the trained 4 steps it stays on track.
    assert error[:, 4:].mean() < 0.5 and error.mean(0).max() < 1.0, error.mean(0)


def test_later_windows_of_a_frame_conditional_prior_take_their_frames_from_the_context():
    gpt = tiny_prior(**VARIANTS["frames"], sequence_length=4).eval()
    _, given = inputs(gpt)
    seen = []

    def frames_fn(context):  # what sample.py does: decode the context codes
        seen.append(context.clone())
        return torch.zeros(3, 3, 2, 8, 8)                     # (n, 3, frames of the context, H, W)
    video = sample_long(gpt, 3, 8, 1, frames=given["frames"], frames_fn=frames_fn,
                        generator=torch.Generator().manual_seed(0))
    assert video.shape == (3, 4, 4, 4) and len(seen) == 2
    assert torch.equal(seen[0], video[:, 1:2]) and torch.equal(seen[1], video[:, 2:3])
