# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # VideoGPT in one sitting: a walkthrough
#
# Run it as a script (`python docs/walkthrough.py`, a few minutes on a CPU) or open it as a notebook
# (`jupytext --to notebook docs/walkthrough.py`, or Jupyter with the jupytext extension). It trains
# a tiny VQ-VAE and a tiny prior on the built-in moving digits and shows each chapter at work. The
# pictures land in `runs/walkthrough/` (or `$WALKTHROUGH_OUT`). Each cell names the file and
# function it shows: read those next. `$WALKTHROUGH_STEPS` sets the training steps of each stage.

# %%
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if "__file__" in globals():
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
else:   # a notebook, started in the repository's root
    ROOT = os.getcwd()
sys.path.insert(0, ROOT)
from attention import causal_mask, strided_sparse_layout  # noqa: E402
from checkpoints import save_png, video_grid  # noqa: E402
from data import MovingDigitsDataset, to_uint8  # noqa: E402
from gpt import GPTConfig, VideoGPT  # noqa: E402
from vqvae import VQVAE, VQVAEConfig  # noqa: E402

OUT = os.environ.get("WALKTHROUGH_OUT", os.path.join(ROOT, "runs", "walkthrough"))
STEPS = int(os.environ.get("WALKTHROUGH_STEPS", "1500"))
os.makedirs(OUT, exist_ok=True)
torch.manual_seed(0)

# %% [markdown]
# ## 1. A clip (data.py)
#
# Inside the models a video is float `(B, C, T, H, W)` with values in [-0.5, 0.5]; at the edges it
# is uint8 `(T, H, W, 3)`. `MovingDigitsDataset` draws two coloured digits bouncing in a black
# frame.

# %%
data = MovingDigitsDataset(512, sequence_length=8, resolution=32)
clip = data[0]["video"]
print("one clip:", tuple(clip.shape), "(C, T, H, W), values in",
      (round(clip.min().item(), 2), round(clip.max().item(), 2)))
# (n, 3, T, H, W)
batch = lambda n, start: torch.stack([data[(start + i) % len(data)]["video"] for i in range(n)])
save_png(video_grid(to_uint8(batch(4, 0)).numpy()), os.path.join(OUT, "1_clips.png"))

# %% [markdown]
# ## 2. The VQ-VAE compresses a clip into a grid of codes (vqvae.py, Section 3.1)
#
# The encoder's strided 3D convolutions shrink (T, H, W) by `downsample`; the codebook replaces each
# latent vector by its nearest entry (`Codebook.forward`); the decoder maps the codes back to
# pixels. Training minimises the normalized MSE plus the commitment loss; the codebook follows by
# moving averages (`Codebook.ema_update`). This VQ-VAE is the Quick start's shape, smaller.

# %%
vq = VQVAE(VQVAEConfig(embedding_dim=32, n_codes=64, n_hiddens=32, n_res_layers=0,
                       decoder_res_layers=1,
                       local_encoder=True, downsample=(2, 4, 4), sequence_length=8, resolution=32,
                       dead_code_threshold=0.05))
opt = torch.optim.Adam(vq.parameters(), lr=2e-3)
for step in range(STEPS):
    out = vq(batch(8, 8 * step))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    if step % max(1, STEPS // 4) == 0 or step == STEPS - 1:
        print(f"vq step {step}: normalized MSE {out['recon_loss'].item():.3f}, perplexity "
              f"{out['perplexity'].item():.1f}")
vq.eval()
x = batch(4, 0)
codes = vq.encode(x)                                   # (4, t, h, w) int64
print("codes of one clip:", tuple(codes.shape[1:]), "(t, h, w): 8x32x32x3 numbers become",
      codes[0].numel(), "codes")
print(codes[0, 0])        # the first latent time step: mostly the empty patch's code
recon = vq.decode(codes)  # (4, 3, T, H, W)
# (8, 3, T, H, W): clip, then its reconstruction
pairs = torch.stack([x, recon], dim=1).flatten(0, 1)
save_png(video_grid(to_uint8(pairs).numpy()), os.path.join(OUT, "2_reconstructions.png"))

# %% [markdown]
# ## 3. Attention patterns (attention.py)
#
# The prior reads a clip's codes in raster order and each code may look only at codes before it: the
# causal mask (`causal_mask`). The original's sparse prior looks at fewer (`strided_sparse_layout`:
# blocks of 32 codes, a few local blocks and the same block on earlier rows and frames). The
# VQ-VAE's axial attention (`AxialAttention`) lets a position see its own time line, row and column.

# %%
t, h, w = codes.shape[1:]
L = t * h * w
sparse = strided_sparse_layout((4, 8, 8), block=16, num_local_blocks=1)
axial = torch.zeros(t, h, w)
pt, ph, pw = 1, h // 2, w // 3  # one position, and the three lines it attends along
axial[:, ph, pw] = axial[pt, :, pw] = axial[pt, ph, :] = 1.0
axial[pt, ph, pw] = 2.0


def frames_side_by_side(grid):
    """(t, h, w) -> (h, t * (w + 1)): the latent steps side by side, a blank column between them."""
    padded = F.pad(grid, (0, 1), value=float("nan"))   # (t, h, w + 1)
    return padded.permute(1, 0, 2).reshape(grid.shape[1], -1)   # (h, t * (w + 1))


fig, axes = plt.subplots(1, 3, figsize=(13, 4), gridspec_kw=dict(width_ratios=[1, 1, 1.4]))
axes[0].imshow(causal_mask(L), cmap="Greys")
axes[0].set_title(f"causal: {L} codes of the prior")
axes[1].imshow(sparse, cmap="Greys")
axes[1].set_title(f"strided sparse, 256 codes ({sparse.float().mean():.0%} of all pairs)")
axes[2].imshow(frames_side_by_side(axial), cmap="Greys")
axes[2].set_title("axial: what one position (darkest) sees:\nits row and column, its place in "
                  "every step")
for ax, (xl, yl) in zip(axes,
                        [("key", "query"), ("key", "query"),
                         ("latent steps, side by side", "height")]):
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "3_attention_masks.png"), dpi=80)
plt.close(fig)

# %% [markdown]
# ## 4. The prior learns the codes (gpt.py, Section 3.2)
#
# `VideoGPT.forward` is teacher forcing: the codes shifted right behind a start vector, position
# embeddings per axis (`BroadcastPosEmbed`; `rope=True` adds rotary embeddings, as the Quick start
# does), causal blocks, and the cross-entropy of every code given the ones before it. The codes
# come from the frozen VQ-VAE.

# %%
gpt = VideoGPT(GPTConfig(latent_shape=(t, h, w), n_codes=64, embedding_dim=32, hidden_dim=48,
                         heads=4, layers=2,
                         dropout=0.0, attn_dropout=0.0, sequence_length=8, rope=True))
gpt.set_codebook(vq.codebook.embeddings)
opt = torch.optim.Adam(gpt.parameters(), lr=3e-3)
for step in range(STEPS):
    with torch.no_grad():
        c = vq.encode(batch(8, 8 * step))               # (8, t, h, w)
    loss = F.cross_entropy(gpt(c).flatten(0, -2), c.flatten())    # (8*t*h*w, n_codes) vs (8*t*h*w,)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % max(1, STEPS // 4) == 0 or step == STEPS - 1:
        print(f"prior step {step}: {loss.item() / 0.6931:.3f} bits per code")

# %% [markdown]
# ## 5. Sampling through the KV cache (gpt.VideoGPT.sample)
#
# Sampling draws one code at a time. The KV cache (`attention.KVCache`) keeps every layer's keys and
# values, so each new code costs one pass of one position: the start vector goes in first (the
# prefill), then each drawn code at the next position. Here the loop of `VideoGPT.sample` runs by
# hand to watch the cache fill: after k steps, the first k positions hold keys, the rest zeros.

# %%
gpt.eval()
n = 4
cond = gpt.condition(None, None, n)
caches = gpt.setup_caches(n, "cpu")
drawn = torch.zeros(n, L, dtype=torch.long)
x_in = gpt.right_shift.sos.expand(n, 1, -1)  # (n, 1, hidden): the prefill
snapshots = {L // 4: None, L // 2: None, 3 * L // 4: None, L: None}
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    for i in range(L):
        logits = gpt.step(x_in, torch.tensor([i]), cond, caches)[:, 0]        # (n, n_codes)
        drawn[:, i] = torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
        x_in = gpt.embed(drawn[:, i:i + 1])                                     # (n, 1, hidden)
        # the size of every cached key of layer 0, sample 0, laid out on the grid
        if i + 1 in snapshots:
            snapshots[i + 1] = caches[0].k[0].norm(dim=-1).mean(0).view(t, h, w)   # (t, h, w)
fig, axes = plt.subplots(len(snapshots), 1, figsize=(7, 6))
top = max(float(keys.max()) for keys in snapshots.values())
for ax, (k, keys) in zip(axes, snapshots.items()):
    ax.imshow(frames_side_by_side(keys), cmap="viridis", vmin=0, vmax=top)
    ax.set_title(f"after {k} of {L} codes", fontsize=9)
    ax.axis("off")
fig.suptitle("the KV cache fills in raster order\n(size of each cached key; latent steps side by "
             "side)")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "5_kv_cache.png"), dpi=80)
plt.close(fig)
# the same loop, as the chapter writes it
samples = gpt.sample(n, generator=torch.Generator().manual_seed(0))
video = vq.decode(samples)                                               # (n, 3, T, H, W)
save_png(video_grid(to_uint8(video.clamp(-0.5, 0.5)).numpy()), os.path.join(OUT, "6_samples.png"))
print("sampled", tuple(samples.shape), "codes ->", tuple(video.shape), "video; pictures in", OUT)
