"""The GPT prior: causality, the KV cache, conditioning, original checkpoints, overfitting.

python -m pytest tests/test_gpt.py
"""

import itertools
import math

import numpy as np
import pytest
import torch

from attention import strided_sparse_layout
from conftest import VARIANTS, inputs, naive_sample, tiny_prior
from gpt import GPTConfig, VideoGPT, load_gpt, sample_logits
from originals import ORIGINAL_ARGS, PRIOR_KEYS, original_state_dict, save_like_lightning
from reference_videogpt import reference_prior_logits
from vqvae import VQVAE, VQVAEConfig

@pytest.mark.parametrize("variant", VARIANTS)
def test_causality(variant):
    gpt = tiny_prior(**VARIANTS[variant]).eval()
    codes, cond = inputs(gpt)
    L = gpt.config.seq_len
    base = gpt(codes, **cond).view(3, L, -1)
    for j in (0, 5, L - 1):
        changed = codes.clone().view(3, L)
        changed[:, j] = (changed[:, j] + 1) % gpt.config.n_codes
        out = gpt(changed.view_as(codes), **cond).view(3, L, -1)
        # Nothing at or before j may change; in full attention, j + 1 must.
        assert torch.equal(out[:, : j + 1], base[:, : j + 1]), f"position <= {j} saw code {j}"
        if j < L - 1 and variant != "sparse":
            assert not torch.allclose(out[:, j + 1], base[:, j + 1])


def layout_by_loops(shape, block, num_local_blocks):
    """The strided pattern spelled out block by block, as the original describes it (causal)."""
    L = math.prod(shape)
    # Block grid: trailing axes merged until they hold more than one block.
    cum = 1
    for i in range(len(shape) - 1, -1, -1):
        cum *= shape[i]
        if cum > block:
            break
    grid = (*shape[:i], cum // block)
    n = L // block
    coords = list(itertools.product(*[range(g) for g in grid]))
    layout = torch.zeros(n, n, dtype=torch.bool)
    for row in range(n):
        for col in range(max(0, row - num_local_blocks), row + 1):
            layout[row, col] = True
        for d in range(len(grid) - 1):
            for i in range(coords[row][d] + 1):
                other = list(coords[row])
                other[d] = i
                layout[row, coords.index(tuple(other))] = True
    mask = torch.zeros(L, L, dtype=torch.bool)
    for r in range(n):
        for c in range(n):
            if layout[r, c]:
                mask[r * block:(r + 1) * block, c * block:(c + 1) * block] = True
    return mask & torch.ones(L, L, dtype=torch.bool).tril()


@pytest.mark.parametrize("shape, block, local",
                         [((4, 8, 8), 32, 4), ((4, 32, 32), 32, 4), ((2, 4, 4), 8, 1),
                                                 ((8, 8, 8), 16, 2)])
def test_strided_sparse_layout_matches_the_block_rules(shape, block, local):
    mask = strided_sparse_layout(shape, block, local)
    assert torch.equal(mask, layout_by_loops(shape, block, local))
    assert mask.diagonal().all() and not mask.triu(1).any()
    if math.prod(shape) // block > local + 1:
        assert not mask.tril().all()          # really sparse


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_kv_cached_sampler_draws_the_naive_samplers_codes(variant):
    """gpt.sample runs one position at a time through the KV cache; the naive sampler recomputes the
    whole teacher-forced forward at every position. The same noise gives the same codes, filtering
    on or off."""
    gpt = tiny_prior(**VARIANTS[variant]).eval()
    _, given = inputs(gpt)
    # Filtering on every variant would only repeat the same draw; the ResNet of the frame variants
    # is slow.
    settings = ((dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8))
                if variant in ("full", "rope") else (dict(),))
    for kw in settings:
        a = gpt.sample(3, **given, generator=torch.Generator().manual_seed(3), **kw)
        b = naive_sample(gpt, 3, **given, generator=torch.Generator().manual_seed(3), **kw)
        assert a.shape == (3, *gpt.config.latent_shape) and torch.equal(a, b), kw


def test_each_cached_step_gives_the_teacher_forced_logits():
    gpt = tiny_prior(**VARIANTS["frames+actions"]).eval()
    codes, given = inputs(gpt)
    B, L = 3, gpt.config.seq_len
    full = gpt(codes, **given).view(B, L, -1)
    cond = gpt.condition(given["label"], given["frames"], B, given["actions"])
    caches = gpt.setup_caches(B, "cpu")
    x = gpt.right_shift(gpt.embed(codes.view(B, L)))               # (B, L, hidden), shifted
    steps = [gpt.step(x[:, i:i + 1], torch.tensor([i]), cond, caches)[:, 0] for i in range(L)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_parameter(variant):
    gpt = tiny_prior(**VARIANTS[variant]).train()
    codes, cond = inputs(gpt)
    logits = gpt(codes, **cond)
    assert logits.shape == (3, 2, 4, 4, 16)
    torch.nn.functional.cross_entropy(logits.flatten(0, 3), codes.flatten()).backward()
    for name, p in gpt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert "codebook" not in dict(gpt.named_parameters())  # the VQ-VAE's codes are a frozen buffer


def test_a_tiny_prior_overfits_one_batch():
    gpt = tiny_prior(seed=0)
    codes, _ = inputs(gpt, B=2)
    opt = torch.optim.Adam(gpt.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(gpt(codes).flatten(0, 3), codes.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()       # from ln(16) = 2.77


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert (sample_logits(logits, top_k=1, generator=g) == 1).all()
    assert (sample_logits(logits, top_p=0.01, generator=g) == 1).all()
    assert set(sample_logits(logits, top_k=2, generator=g).tolist()) == {1, 3}
    assert (sample_logits(logits, temperature=1e-4, generator=g) == 1).all()
    assert set(sample_logits(logits, temperature=100.0, generator=g).tolist()) == {0, 1, 2, 3}


def test_the_nucleus_keeps_the_code_at_its_boundary():
    """top_p keeps every code whose more likely codes hold at most top_p of the mass: a code whose
    predecessors hold exactly top_p is kept, the next one is not (pins `>`, not `>=`)."""
    # already in descending order
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log().repeat(4000, 1)
    probs = logits[:1].softmax(-1)
    before = probs.cumsum(-1) - probs  # the mass of the codes before each, as sampled
    top_p = float(before[0, 2])  # exactly the mass before the third code
    g = torch.Generator().manual_seed(0)
    drawn = set(sample_logits(logits, top_p=top_p, generator=g).tolist())
    assert drawn == {0, 1, 2}


def test_the_gumbel_max_draw_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(40000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample_logits(logits, temperature=0.8, generator=g)
    counts = torch.bincount(drawn, minlength=4).float()
    torch.testing.assert_close(counts / counts.sum(), (logits[0] / 0.8).softmax(-1), atol=0.01,
                               rtol=0)
    # The draw is a function of the noise: u decides, the generator only supplies it.
    u = torch.rand(5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_logits(logits[:5], noise=u),
                       sample_logits(logits[:5], generator=torch.Generator().manual_seed(1)))
    assert torch.equal(sample_logits(logits[:5], noise=u),
                       (logits[:5] - torch.log(-torch.log(u))).argmax(-1))


def test_config_errors():
    with pytest.raises(ValueError, match="hidden_dim=100 is not divisible by 3"):
        GPTConfig(hidden_dim=100)
    with pytest.raises(ValueError, match="hidden_dim=576 is not divisible by heads=5"):
        GPTConfig(hidden_dim=576, heads=5)
    with pytest.raises(ValueError, match="sparse attention needs t\\*h\\*w=48"):
        GPTConfig(latent_shape=(3, 4, 4), attn_type="sparse")


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_original_prior_checkpoint_gives_the_original_logits(tmp_path, kind):
    sd = original_state_dict(seed=0, keys=PRIOR_KEYS[kind])
    args = dict(ORIGINAL_ARGS, hidden_dim=60, heads=2, layers=2, dropout=0.2, attn_dropout=0.3,
                attn_type="full",
                n_cond_frames=1 if kind == "cond" else 0, class_cond=kind == "cond",
                vqvae="vqvae.ckpt")
    save_like_lightning(tmp_path / f"{kind}.ckpt", sd, args)
    gpt, vq = load_gpt(tmp_path / f"{kind}.ckpt")
    c = gpt.config
    assert (c.latent_shape, c.n_codes, c.hidden_dim, c.layers) == ((4, 8, 8), 64, 60, 2)
    assert (vq.config.downsample == (2, 4, 4) and vq.config.n_hiddens == 32
            and vq.config.n_res_layers == 2)
    assert (c.n_classes, c.n_cond_frames) == ((5, 1) if kind == "cond" else (0, 0))
    torch.manual_seed(0)
    codes = torch.randint(64, (2, 4, 8, 8))
    label = torch.tensor([1, 4]) if kind == "cond" else None
    frames = torch.rand(2, 3, 1, 32, 32) - 0.5 if kind == "cond" else None
    ours = gpt(codes, label, frames).view(2, 256, 64)
    onehot = torch.nn.functional.one_hot(label, 5).float() if label is not None else None
    causal = torch.ones(256, 256, dtype=torch.bool).tril()
    ref = reference_prior_logits(sd, codes, n_head=2, mask=causal, onehot=onehot, frames=frames)
    assert ref.abs().mean() > 0.1                                    # logits worth comparing
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # The VQ-VAE inside decodes the prior's samples.
    samples = gpt.sample(2, label, frames, generator=torch.Generator().manual_seed(0))
    assert vq.decode(samples).shape == (2, 3, 8, 32, 32)


def test_the_key_table_names_every_original_parameter_in_the_models_order(tmp_path):
    """checkpoints.PRIOR_RENAMES maps the original's keys (which this project's earlier checkpoints
    share) one to one onto today's, in the order the model registers its parameters: the order an
    optimizer's saved state is indexed by. Muon picks the same matrices as under the old names."""
    import muon
    from checkpoints import current_prior_keys
    sd = original_state_dict(seed=0, keys=PRIOR_KEYS["cond"])
    args = dict(ORIGINAL_ARGS, hidden_dim=60, heads=2, layers=2, n_cond_frames=1, class_cond=True,
                vqvae="vqvae.ckpt")
    save_like_lightning(tmp_path / "cond.ckpt", sd, args)
    gpt, _ = load_gpt(tmp_path / "cond.ckpt")
    old = [k for k in sd if not k.startswith("vqvae.") and not k.endswith(".attn.attn.mask")]
    new = list(current_prior_keys(dict.fromkeys(old)))
    assert len(set(new)) == len(old)
    assert new == [n for n, _ in gpt.named_parameters()]       # every parameter, in order
    assert current_prior_keys(dict.fromkeys(new)).keys() == dict.fromkeys(new).keys()   # settled
    # Muon's rule under the old names: the blocks' attention, cross-attention and MLP matrices.
    old_rule = [k for k in old if k.startswith("attn_stack.attn_nets.") and k.endswith(".weight")
                and any(f".{part}." in k for part in ("attn", "enc_attn", "fc_block"))
                and sd[k].ndim == 2]
    names = {id(p): n for n, p in gpt.named_parameters()}
    picked = [names[id(p)] for p in muon.hidden_matrices(gpt)]
    assert picked == list(current_prior_keys(dict.fromkeys(old_rule))) and len(picked) == 2 * 10


def test_load_gpt_refuses_a_vqvae_checkpoint(tmp_path):
    save_like_lightning(tmp_path / "vq.ckpt", original_state_dict(), ORIGINAL_ARGS)
    with pytest.raises(ValueError, match="vq.ckpt: is a 'vqvae' checkpoint, not a prior"):
        load_gpt(tmp_path / "vq.ckpt")


def test_weights_that_do_not_fit_give_one_line_naming_the_file(tmp_path):
    args = dict(ORIGINAL_ARGS, hidden_dim=60, heads=2, layers=2, attn_type="full",
                vqvae="vqvae.ckpt")
    # An original prior with a weight missing that the config is read from, and one with a weight
    # cut short.
    sd = original_state_dict(seed=0, keys=PRIOR_KEYS["uncond"])
    save_like_lightning(tmp_path / "nocodebook.ckpt",
                        {k: v for k, v in sd.items() if k != "vqvae.codebook.embeddings"}, args)
    with pytest.raises(ValueError, match="nocodebook.ckpt: incomplete VideoGPT prior checkpoint: "
                                         "no vqvae.codebook.embeddings in its state_dict"):
        load_gpt(tmp_path / "nocodebook.ckpt")
    save_like_lightning(tmp_path / "cut.ckpt",
                        dict(sd, **{"fc_in.weight": sd["fc_in.weight"][:, :5]}), args)
    with pytest.raises(ValueError,
                       match=r"cut.ckpt: weights do not fit the prior's config: size mismatch for "
                                         r"fc_in.weight: .*torch.Size\(\[60, 5\]\)"):
        load_gpt(tmp_path / "cut.ckpt")
    # Ours: the prior's own state dict lacks a key; then the VQ-VAE inside it does.
    gpt = tiny_prior()  # latent (2, 4, 4), 16 codes of width 8
    vq_config = dict(embedding_dim=8, n_codes=16, n_hiddens=16, n_res_layers=1,
                     downsample=[2, 4, 4], sequence_length=4, resolution=16)
    vq_state = VQVAE(VQVAEConfig(**vq_config)).state_dict()
    state = gpt.state_dict()
    ours = dict(stage="gpt", config=gpt.config.to_dict(),
                vqvae=dict(config=vq_config, model=vq_state))
    torch.save(dict(ours, model={k: v for k, v in state.items() if k != "fc_out.weight"}),
               tmp_path / "a.pt")
    with pytest.raises(ValueError,
                       match="a.pt: weights do not fit the prior's config: Missing "
                             "key.*fc_out.weight"):
        load_gpt(tmp_path / "a.pt")
    del vq_state["decoder.convts.0.convt.bias"]
    torch.save(dict(ours, model=state), tmp_path / "b.pt")
    with pytest.raises(ValueError,
                       match="b.pt: weights do not fit the VQ-VAE's config: Missing "
                             "key.*convts.0.convt.bias"):
        load_gpt(tmp_path / "b.pt")


def test_initialisation_follows_the_original_table():
    """Each parameter group's init, from VideoGPT.init_weights and MultiHeadAttention.init_weights,
    measured."""
    torch.manual_seed(0)
    c = GPTConfig(latent_shape=(4, 32, 32), n_codes=64, embedding_dim=256, hidden_dim=576, heads=4,
                  layers=2, n_classes=9)
    gpt = VideoGPT(c)
    std = lambda t: t.float().std().item()
    assert not gpt.fc_out.weight.any()  # uniform logits at the start
    assert std(gpt.fc_in.weight) == pytest.approx(0.02, rel=0.02)
    # sos has only 576 numbers: a looser bound, still far from any other scale.
    assert std(gpt.right_shift.sos) == pytest.approx(0.02, rel=0.15)
    for table in gpt.pos_embd.emb.values():
        assert table.shape[1] == 192
    assert std(torch.cat([t.flatten() for t in gpt.pos_embd.emb.values()])) == pytest.approx(0.01,
                                                                                             rel=0.05)
    attn = gpt.blocks[0].attn
    for w in (attn.w_qs.weight, attn.w_ks.weight, attn.w_vs.weight):
        assert std(w) == pytest.approx(1 / math.sqrt(576), rel=0.02)
    # shrinks with depth
    assert std(attn.fc.weight) == pytest.approx(1 / math.sqrt(576 * 2), rel=0.02)
    norm = gpt.blocks[0].attn_norm
    assert torch.equal(norm.to_gain.weight, torch.full((576, 9), 1 / 3))  # 1 / sqrt(n_classes)


def commanded_squares(n, rng, T=4, cells=3):
    """Codes (n, T, cells, cells) of one square per frame, at the cell its action commands; actions
    are one-hot (n, T, cells*cells): the action decides where the square goes."""
    target = rng.integers(cells * cells, size=(n, T))
    codes = np.zeros((n, T, cells * cells), np.int64)
    np.put_along_axis(codes, target[..., None], 1, axis=-1)
    actions = np.eye(cells * cells, dtype=np.float32)[target]
    return torch.from_numpy(codes).view(n, T, cells, cells), torch.from_numpy(actions), target


@pytest.mark.parametrize("norms", [False, True], ids=["tokens", "norms"])
def test_an_action_conditional_prior_learns_to_follow_its_actions(norms):
    """Either way in: per-frame tokens to cross-attend to, or the paper's conditional norms."""
    torch.manual_seed(0)
    gpt = VideoGPT(GPTConfig(latent_shape=(4, 3, 3), n_codes=2, embedding_dim=4, hidden_dim=48,
                             heads=4, layers=2,
                             dropout=0.0, attn_dropout=0.0, action_dim=9, sequence_length=4,
                             action_norms=norms))
    gpt.codebook.copy_(torch.eye(2, 4))  # code 1: the square, code 0: background
    opt = torch.optim.Adam(gpt.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        codes, actions, _ = commanded_squares(32, rng)
        loss = torch.nn.functional.cross_entropy(gpt(codes, actions=actions).flatten(0, 3),
                                                 codes.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Sampled with the KV cache for new action sequences: the square goes where it is told.
    codes, actions, target = commanded_squares(64, np.random.default_rng(1))
    with torch.no_grad():
        sampled = gpt.eval().sample(64, actions=actions, generator=torch.Generator().manual_seed(0))
    followed = (sampled.flatten(2).argmax(-1).numpy() == target).mean()
    assert followed > 0.5, followed                          # chance: 1/9


