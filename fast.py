"""The fast paths: the same numbers as the chapters, sooner.

The chapters (attention.py, vqvae.py, gpt.py) hold one plain implementation of
each idea. What makes it fast lives here, each piece tested against the plain
one it replaces (tests/test_fast.py):

* Attention kernels. `use_fast_attention(model)` hands every attention of a
  model `fast_attention` instead of the written-out formula: PyTorch's fused
  SDPA (flash / memory-efficient kernels on CUDA, never materialising the causal
  mask), the formula itself where it is faster (bfloat16 on a CPU, up to 512
  keys), and for the
  original's strided sparse prior FlexAttention over the layout's tiles, skipping
  the 95% of scores the mask would throw away.
* The fast sampler. `generate(gpt, n, ...)` draws the codes `VideoGPT.sample`
  draws for the same generator, but each step is one fused function of plain
  tensor operations (`decode_one_token`): the norms' gains, the stacked q/k/v
  weights, the table of every code's input vector and the cross-attention keys are
  computed once per call, and attention reads only the cache's written prefix.
  `compile=True` compiles that step once per setting (CPU: inductor with frozen
  weights; CUDA: CUDA graphs over fixed shapes). `prefix` keeps given first latent
  steps (video prediction; sample.py's long videos), prefilled in one pass.
* Longer videos. `sample_long(gpt, n, frames_out)` slides the prior's window
  over latent time, drawing each next window with `generate` from the last one.

    from fast import generate, use_fast_attention
    use_fast_attention(gpt)                               # training and teacher-forced scoring
    codes = generate(gpt, 16, generator=g, compile=True)  # == gpt.sample(16, generator=g)
"""

import functools
import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from attention import MultiHeadAttention, rotate
from gpt import VideoGPT, gelu2, normalize, sample_logits, uniform_noise

# -----------------------------------------------------------------------------
# Attention kernels

# On a CPU in bfloat16, PyTorch's fused SDPA kernel costs more than the formula written out until
# about 512 keys (fixed cost per call, bf16 arithmetic): forward + backward of one layer, 4 heads of
# width 30, 4096 tokens a batch, 2 cores: 256 keys 30 ms fused vs 21 ms written out, 512 keys 40 vs
# 34 ms, 1024 keys 50 vs 99 ms. In float32 the fused kernel is as fast or faster at every length,
# the VQ-VAE's short axial sequences included (docs/measurements.md). `python bench.py --only
# attention`.
EXPLICIT_MAX_KEYS = 512


def explicit_attention(q, k, v, mask=None):
    """attention.attention without dropout, for a CPU: the mask enters as one added bias (its
    backward passes the gradient through untouched) rather than a masked fill, one pass less forward
    and backward."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))      # (B, nh, Lq, Lk)
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=mask.device)
        scores = scores + bias.masked_fill(~mask, float("-inf"))             # (B, nh, Lq, Lk)
    return torch.matmul(scores.softmax(dim=-1), v)                            # (B, nh, Lq, hv)


def fast_attention(q, k, v, mask=None, dropout_p=0.0, pattern=None, block=None):
    """attention.attention's numbers by the fastest route. `pattern` ("full" or "sparse") says what
    a square mask over the whole sequence is (a prior's self-attention; `block` its sparse tile
    size): the causal triangle runs as SDPA's is_causal (flash kernels, no mask in memory), the
    sparse layout through FlexAttention where it can (CUDA, or no gradient: its CPU kernels have no
    backward)."""
    square = mask is not None and mask.shape[-2] == mask.shape[-1] == k.shape[-2]
    whole = pattern is not None and square
    # a plain bool: traced with a free length (world.py's exported prefill) the shapes' comparison
    # is symbolic, and SDPA's is_causal takes no symbol
    causal = bool(whole and pattern == "full")
    if whole and pattern == "sparse" and dropout_p == 0.0 and flex_available() and \
            (q.device.type == "cuda" or not torch.is_grad_enabled()):
        return flex_attention(q, k, v, sparse_block_mask(mask, block))  # (B, nh, Lq, hv)
    cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
    if cpu_bf16 and dropout_p == 0.0 and k.shape[-2] <= EXPLICIT_MAX_KEYS:
        return explicit_attention(q, k, v, mask)  # (B, nh, Lq, hv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask,
                                          dropout_p=dropout_p,
                                          is_causal=causal)  # (B, nh, Lq, hv)


def use_fast_attention(model):
    """Every attention of `model` (a VQVAE or a VideoGPT) computes with `fast_attention`; returns
    the model."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.attend = fast_attention
    if isinstance(model, VideoGPT):
        c = model.config
        for block in model.blocks:
            block.attn.attend = functools.partial(fast_attention, pattern=c.attn_type,
                                                  block=c.sparse_block)
    return model


@functools.cache
def flex_available():
    """Whether this PyTorch has FlexAttention (2.5 and later); found out once."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


# id(dense mask) -> (weak reference to that mask, its BlockMask), made once per mask
_block_masks = {}


def sparse_block_mask(mask, block):
    """FlexAttention's BlockMask of a causal block-sparse mask (L, L) built from `block` x `block`
    tiles (attention.strided_sparse_layout's): the tiles' pattern read off the mask's top-left
    corners, and the causal triangle added. Kept per mask tensor, so a model's forward builds it
    once."""
    kept = _block_masks.get(id(mask))
    if kept is None or kept[0]() is not mask:      # new, or another tensor at a freed one's address
        from torch.nn.attention.flex_attention import create_block_mask   # lazy: PyTorch >= 2.5
        L = mask.shape[-1]
        layout = mask[::block, ::block].clone()                           # (L / block, L / block)

        def visible(b, h, q, kv):
            return layout[q // block, kv // block] & (kv <= q)
        kept = _block_masks[id(mask)] = (weakref.ref(mask), create_block_mask(
            visible, None, None, L, L, device=mask.device, BLOCK_SIZE=block))
        weakref.finalize(mask, _block_masks.pop, id(mask), None)          # forgotten with the mask
    return kept[1]


@functools.cache
def compiled_flex():
    """FlexAttention compiled once per process (uncompiled, it runs a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention as flex   # lazy: PyTorch >= 2.5
    return torch.compile(flex)


def flex_attention(q, k, v, block_mask):
    """softmax(q k^T / sqrt(hs)) v over the tiles of `block_mask` only."""
    # (B, nh, Lq, hv)
    return compiled_flex()(q, k, v, block_mask=block_mask, scale=q.shape[-1] ** -0.5)


# -----------------------------------------------------------------------------
# The VQ-VAE's memory layout


def use_channels_last(vq, device, dtype):
    """The VQ-VAE's weights, and so its activations, in the channels-last 3D layout where that is
    faster: on a CPU in float32 its 3D convolutions and their backward take 10-16% less time
    (train.py's step, batch 4 of 16x64x64 with 64 channels: 527-530 ms against 582-599 ms); in
    bfloat16, the digits' preset, 3-4% more, so there it stays as it is. The same numbers, up to the
    order of the sums."""
    if torch.device(device).type == "cpu" and dtype == "float32":
        vq.to(memory_format=torch.channels_last_3d)
    return vq


# -----------------------------------------------------------------------------
# Memory: activation checkpointing


def use_grad_checkpointing(gpt, enabled=True):
    """Each block of the prior recomputes its activations in backward instead of keeping them
    (train.py
    --grad_checkpointing): the same gradients, for a block's activations of memory instead of all of
    them, at the price of a second forward. The original always did this while training."""
    for block in gpt.blocks:
        block.__dict__.pop("forward", None)         # back to the class's forward
        if enabled:
            block.forward = functools.partial(checkpointed, block, type(block).forward)
    return gpt


def checkpointed(block, forward, *args, **kwargs):
    if not (block.training and torch.is_grad_enabled()):
        return forward(block, *args, **kwargs)
    return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)


# -----------------------------------------------------------------------------
# One sampling step as plain tensor operations


def sampling_dtype(gpt):
    """The activations' dtype while sampling: autocast's when it is on, else the weights'."""
    device = gpt.fc_in.weight.device
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return gpt.fc_in.weight.dtype


def cached_condition(gpt, label, frames, n, actions=None):
    """What the conditioning fixes for a whole sampling call, computed once: the conditioning, the
    cross-attention keys and values of frames and actions, every norm's gain and bias (per sample
    for conditional norms: a class, or the paper's action norms)."""
    cond = gpt.condition(label, frames, n, actions)
    vector, context = cond["vector"], cond["context"]
    cond["frame_kv"] = [b.cross_attn.keys_values(context) if context is not None else None
                        for b in gpt.blocks]
    plans = []
    for b in gpt.blocks:
        cross_norm = b.cross_norm.gain_bias(vector) if b.cross_attn is not None else None
        plans.append(dict(attn_norm=b.attn_norm.gain_bias(vector), cross_norm=cross_norm,
                          mlp_norm=b.mlp_norm.gain_bias(vector)))
    cond["plan"] = dict(norm=gpt.norm.gain_bias(vector), blocks=plans)
    return cond


def decode_weights(gpt):
    """What every step reads and only the weights decide, in the sampling dtype: every code's input
    vector, codebook @ fc_in, as one table (n_codes, hidden); every position's embedding (L,
    hidden); each block's q, k, v weights stacked into one (3 * hidden, hidden)."""
    dtype = sampling_dtype(gpt)
    inputs = gpt.fc_in(gpt.codebook.to(gpt.fc_in.weight.dtype)).to(dtype)      # (n_codes, hidden)
    pos_table = gpt.pos_embd.table().to(dtype)                                 # (L, hidden)
    qkv = [torch.cat([b.attn.w_qs.weight, b.attn.w_ks.weight, b.attn.w_vs.weight])
           for b in gpt.blocks]
    return dict(inputs=inputs, pos_table=pos_table, qkv=qkv)


def block_decode(block, x, pos, cache, mask, plan, qkv, frame_kv=None, length=None, rotary=None):
    """gpt.Block.forward for the newest token x (B, 1, D) at position pos (1,), as plain tensor
    operations: at one token per step, calling ten small modules per block costs more than their
    math. With `length` the attention reads only the cache's first `length` keys."""
    attn = block.attn
    B = x.shape[0]
    qkv_x = F.linear(normalize(x, *plan["attn_norm"]), qkv)                    # (B, 1, 3 * hidden)
    qkv_x = qkv_x.view(B, 1, 3, attn.n_head, attn.d_k)                         # (B, 1, 3, nh, hs)
    q, k, v = qkv_x.permute(2, 0, 3, 1, 4)                                     # 3 x (B, nh, 1, hs)
    if rotary is not None:
        q, k = rotate(q, *rotary), rotate(k, *rotary)
    k, v = cache.update(pos, k, v)  # (B, nh, L, hs) each
    if length is not None:
        k, v = k[:, :, :length], v[:, :, :length]  # (B, nh, length, hs)
    # Compiled, the attention is written out (inductor fuses it into one kernel, faster than calling
    # the CPU flash kernel for a single query); eager, the library kernel is the faster of the two.
    a = (explicit_attention(q, k, v, mask) if torch.compiler.is_compiling() else
         F.scaled_dot_product_attention(q, k, v, attn_mask=mask))        # (B, nh, 1, hs)
    x = x + F.linear(attn.merge_heads(a), attn.fc.weight, attn.fc.bias)  # (B, 1, D)
    if block.cross_attn is not None:
        x = x + block.cross_attn(normalize(x, *plan["cross_norm"]), kv=frame_kv)
    mlp = block.mlp
    h = F.linear(normalize(x, *plan["mlp_norm"]), mlp.up.weight, mlp.up.bias)       # (B, 1, 4D)
    return x + F.linear(gelu2(h), mlp.down.weight, mlp.down.bias)                   # (B, 1, D)


def decode_one_token(gpt, code, pos, cond, caches, length=None, weights=None):
    """Feed the code drawn at position pos-1 (B,) in at position pos, a (1,) tensor; logits (B,
    n_codes).

    With `length` = pos + 1 (a Python int, so a compiled step is made once for every length) the
    attention reads only the written prefix, which needs no mask for full attention; without it
    every step reads the whole buffer with pos's row of the mask: fixed shapes, what CUDA graphs
    replay."""
    w = weights or decode_weights(gpt)
    x = (w["inputs"][code] + w["pos_table"][pos]).unsqueeze(1)                  # (B, 1, hidden)
    mask = None
    if length is None:
        mask = gpt.mask[pos]                                                      # (1, L)
    elif gpt.config.attn_type == "sparse":
        mask = gpt.mask[pos][:, :length]                                          # (1, length)
    rotary = gpt.rotary_at(pos)
    for block, cache, p, qkv, kv in zip(gpt.blocks, caches, cond["plan"]["blocks"], w["qkv"],
                                        cond["frame_kv"]):
        x = block_decode(block, x, pos, cache, mask, p, qkv, kv, length, rotary)
    return F.linear(normalize(x, *cond["plan"]["norm"]), gpt.fc_out.weight)[:, -1]   # (B, n_codes)


def prefill(gpt, cond, caches, n, prefix=None):
    """The start vector, then the given codes `prefix` (n, P) if any, in one pass of the lesson's
    `VideoGPT.step` at positions 0..P, writing the caches. Returns the logits of position P (n,
    n_codes)."""
    x = gpt.right_shift.sos.to(gpt.fc_in.weight.dtype).expand(n, 1, -1)   # (n, 1, hidden)
    if prefix is not None and prefix.shape[1]:
        x = torch.cat([x, gpt.embed(prefix)], dim=1)  # (n, 1 + P, hidden)
    # (n, n_codes)
    return gpt.step(x, torch.arange(x.shape[1], device=x.device), cond, caches)[:, -1]


# -----------------------------------------------------------------------------
# Compiling the step


class DecodeStep(torch.nn.Module):
    """One whole sampling step as a module: the previous code in, the next code out.

    It wraps `decode_one_token` and the draw of `sample_logits` so that torch.compile turns a step
    into one graph: every block, the output layer, temperature, top-k / top-p and the Gumbel-max
    draw on the uniform noise it is given. The prior is a sub-module, so with inductor's "freezing"
    its weights become constants of the compiled code (on CPU its matmuls are then generated and
    fused, not called one by one).
    """

    def __init__(self, gpt, temperature, top_k, top_p):
        super().__init__()
        self.gpt = gpt
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        # decode_weights as buffers of this module: constants of the compiled code, too. (Not named
        # "inputs": ahead-of-time compiled code has a variable of that name.)
        w = decode_weights(gpt)
        self.register_buffer("code_table", w["inputs"], persistent=False)
        self.register_buffer("pos_table", w["pos_table"], persistent=False)
        # One buffer per block, not one stacked tensor: frozen views of a stacked constant came out
        # wrong in compiled code (the compiled samples no longer matched the eager ones).
        self.n_qkv = len(w["qkv"])
        for i, qkv in enumerate(w["qkv"]):
            self.register_buffer(f"qkv_{i}", qkv, persistent=False)

    def tables(self):
        """The buffers as decode_one_token's `weights` dict."""
        return dict(inputs=self.code_table, pos_table=self.pos_table,
                    qkv=[getattr(self, f"qkv_{i}") for i in range(self.n_qkv)])

    def forward(self, code, pos, cond, caches, noise, length=None):
        # (B, n_codes)
        logits = decode_one_token(self.gpt, code, pos, cond, caches, length, self.tables())
        return sample_logits(logits, self.temperature, self.top_k, self.top_p, noise=noise)


# Compiling the decoding step costs 10-30 s on a CPU (about a minute on a GPU) and saves about half
# a millisecond per step on a CPU (more on a GPU, where an eager step is launch-bound): it pays for
# itself over some tens of thousands of steps (e.g. 8 BAIR batches of 4096 codes), not for a handful
# of clips.
AUTO_COMPILE_STEPS = 30_000


def compile_pays_off(steps):
    """Whether a run that draws `steps` codes one after the other should compile its decoding
    step."""
    return steps >= AUTO_COMPILE_STEPS


def frozen_cpu_compile(module):
    """torch.compile for a CPU inference module whose weights stay fixed: inductor's "freezing"
    makes them constants (the matmuls become generated code next to their neighbours instead of
    library calls) and max-autotune picks those kernels. Both settings must hold whenever the module
    may be traced or compiled, which can be at any call, so every call sets them and puts them back
    (~7 us)."""
    import torch._inductor.config as inductor_config   # lazy: only when compiling
    compiled = torch.compile(module)

    def call(*args):
        saved = inductor_config.freezing, inductor_config.max_autotune
        inductor_config.freezing = inductor_config.max_autotune = True
        try:
            return compiled(*args)
        finally:
            inductor_config.freezing, inductor_config.max_autotune = saved
    return call


_compiled = weakref.WeakKeyDictionary()   # prior -> {settings: (weight versions, compiled step)}


def compiled_step(gpt, batch_size, temperature=1.0, top_k=None, top_p=None):
    """A torch.compile'd DecodeStep for these sampling settings, made once and kept.

    CPU: inductor with freezing and max-autotune, each step over the written prefix, compiled once
    for every length. CUDA: fixed shapes replayed as CUDA graphs ("reduce-overhead"). Kept per
    prior, batch size and settings, and made again when any weight has changed since (frozen weights
    would otherwise be stale): training may call it between optimizer steps.
    """
    device = gpt.fc_in.weight.device
    versions = tuple(t._version for t in (*gpt.parameters(), *gpt.buffers()))
    key = (batch_size, temperature, top_k, top_p, device.type,
           torch.is_autocast_enabled(device.type))
    kept = _compiled.setdefault(gpt, {})
    if key not in kept or kept[key][0] != versions:
        step = DecodeStep(gpt, temperature, top_k, top_p)
        kept[key] = (versions, torch.compile(step, mode="reduce-overhead") if device.type == "cuda"
                     else frozen_cpu_compile(step))
    return kept[key][1]


# -----------------------------------------------------------------------------
# The fast sampler


@torch.no_grad()
def generate(gpt, n, label=None, frames=None, actions=None, temperature=1.0, top_k=None,
             top_p=None, generator=None,
             prefix=None, compile=False, progress=False):
    """Draw n code grids (n, t, h, w): the codes gpt.sample draws for the same generator, sooner.

    `prefix` (n, k, h, w) gives the first k latent time steps (video prediction): they are prefilled
    in one pass and only the rest is drawn. `compile=True` runs every step through `compiled_step`
    (compiling costs seconds, so it pays off over many steps: `compile_pays_off`). Each position's
    draw reads uniform noise (n, n_codes) from `generator`, one position after the other, whichever
    path.
    """
    c = gpt.config
    device = gpt.fc_in.weight.device
    cond = cached_condition(gpt, label, frames, n, actions)
    caches = gpt.setup_caches(n, device, sampling_dtype(gpt))
    step = compiled_step(gpt, n, temperature, top_k, top_p) if compile else DecodeStep(gpt,
                                                                                       temperature,
                                                                                       top_k, top_p)
    # CUDA graphs replay fixed shapes: the whole cache every step. Elsewhere the written prefix.
    fixed = compile and device.type == "cuda"
    codes = torch.zeros(n, c.seq_len, dtype=torch.long, device=device)
    given = 0
    if prefix is not None:
        t, h, w = c.latent_shape
        fits = prefix.shape[0] == n and prefix.shape[1] <= t and tuple(prefix.shape[2:]) == (h, w)
        assert fits, f"prefix must be (n={n}, k <= {t}, {h}, {w}), got {tuple(prefix.shape)}"
        given = prefix.shape[1] * h * w
        codes[:, :given] = prefix.flatten(1)                                  # (n, k*h*w)
    pos = torch.arange(c.seq_len, device=device)
    positions = range(given, c.seq_len)
    if progress:
        from tqdm import tqdm  # lazy: only for the progress bar
        positions = tqdm(positions, desc="sampling", unit="code", leave=False)
    noise = uniform_noise(n, c.n_codes, c.seq_len - given, generator, device)
    for i in positions:
        u = next(noise)                                                       # (n, n_codes)
        if i == given:
            logits = prefill(gpt, cond, caches, n, codes[:, :given])
            codes[:, i] = sample_logits(logits, temperature, top_k, top_p, noise=u)
        else:
            codes[:, i] = step(codes[:, i - 1], pos[i:i + 1], cond, caches, u,
                               None if fixed else i + 1)
    return codes.view(n, *c.latent_shape)                                     # (n, t, h, w)


# -----------------------------------------------------------------------------
# Longer videos than the prior was trained on: its window slid over latent time (beyond the paper)


@torch.no_grad()
def sample_long(gpt, n, frames_out, stride=None, label=None, frames=None, actions=None, prefix=None,
                frames_fn=None, progress=False, **sampling):
    """Codes of `frames_out` frames, as many as or more than the prior was trained on.

    The prior models windows of t latent steps (sequence_length frames). The
    first window is an ordinary sample (with `prefix`, `frames`, `actions` as
    given); each next one keeps the last t - s generated steps as its
    context, prefills them in one pass (positions restart at 0, as in
    training) and draws s new steps. Default s = t // 2: half the window
    is context. Class labels condition every window; conditioning frames
    only the first: later windows need `frames_fn(context codes)` -> their
    first frames (sample.py decodes the context with the VQ-VAE); actions
    (n, frames_out, A) are cut into each window's frames. `sampling`: the
    rest of fast.generate's arguments. Returns (n, frames_out / stride_t, h, w).
    """
    c = gpt.config
    t = c.latent_shape[0]
    per_step = c.sequence_length // t                         # frames per latent time step
    if frames_out % per_step or frames_out < c.sequence_length:
        raise ValueError(f"frames_out={frames_out} must be a multiple of the VQ-VAE's temporal "
                         f"stride {per_step} and at least the trained {c.sequence_length} frames")
    s = stride or max(1, t // 2)
    if not 1 <= s <= t:
        raise ValueError(f"stride={s} must be between 1 and the window's {t} latent steps")
    steps_out = frames_out // per_step
    if c.action_dim:
        got = None if actions is None else tuple(actions.shape)
        assert actions is not None and actions.shape[1] == frames_out, (
            f"an action-conditional prior needs actions for all {frames_out} frames, got {got}")
    if c.n_cond_frames and frames_fn is None and steps_out > t:
        raise ValueError("a frame-conditional prior needs frames_fn(context codes) -> frames for "
                         "its later windows")

    def window_actions(start):
        """The actions of the window's frames; past the last given frame, the last action is
        repeated."""
        if not c.action_dim:
            return None
        idx = torch.arange(start * per_step, (start + t) * per_step, device=actions.device)
        idx = idx.clamp(max=frames_out - 1)                                           # (T,)
        return actions[:, idx]                                                        # (n, T, A)

    # The first window, then one more every s latent steps until the video is long enough.
    video = generate(gpt, n, label, frames, window_actions(0), prefix=prefix, progress=progress,
                     **sampling)                                                      # (n, t, h, w)
    starts = range(s, max(steps_out - t, 0) + s, s)
    if progress:
        starts = tqdm(starts, desc="windows", unit="window", leave=False)
    for start in starts:
        keep = video[:, start:]  # (n, t - s, h, w)
        cond_frames = frames_fn(keep)[:, :, :c.n_cond_frames] if c.n_cond_frames else None
        window = generate(gpt, n, label, cond_frames, window_actions(start), prefix=keep,
                          progress=progress,
                          **sampling)                                 # (n, t, h, w)
        video = torch.cat([video, window[:, keep.shape[1]:]], dim=1)  # (n, start + t, h, w)
    return video[:, :steps_out]                                       # (n, steps_out, h, w)
