"""An independent, functional re-statement of the original VideoGPT VQ-VAE's arithmetic.

It reads weights straight from an original-layout state dict (the key names of
tests/data/videogpt_vqvae_keys.txt) and uses only torch.nn.functional, explicit
matmul-softmax attention and brute-force nearest neighbours, so it shares no
code with vqvae.py. Tests compare vqvae.py against it. Eval mode throughout:
BatchNorm uses running statistics, eps 1e-5.
"""

import math

import torch
import torch.nn.functional as F


def pad_same(x, kernel, stride):
    # Total padding k - s per axis, the odd element on the left; F.pad lists W, H, T.
    pads = []
    for k, s in reversed(list(zip(kernel, stride))):
        total = k - s
        pads += [total - total // 2, total // 2]
    return F.pad(x, pads)


def conv(sd, name, x, stride=(1, 1, 1)):
    w = sd[f"{name}.weight"]
    return F.conv3d(pad_same(x, w.shape[2:], stride), w, sd.get(f"{name}.bias"), stride=stride)


def conv_t(sd, name, x, stride):
    w = sd[f"{name}.weight"]
    k = w.shape[2:]
    return F.conv_transpose3d(pad_same(x, k, stride), w, sd[f"{name}.bias"], stride=stride,
                              padding=tuple(n - 1 for n in k))


def bn(sd, name, x):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"],
                        sd[f"{name}.weight"], sd[f"{name}.bias"], training=False, eps=1e-5)


def attention_along(sd, name, x, axis, n_head):
    # x: (B, C, T, H, W); attend along `axis` (2, 3 or 4), every other position separately.
    xl = x.movedim(1, -1).movedim(axis - 1, -2)           # (..., L, C)
    q, k, v = (xl @ sd[f"{name}.{n}.weight"].t() for n in ("w_qs", "w_ks", "w_vs"))
    d = q.shape[-1] // n_head
    heads = lambda t: t.unflatten(-1, (n_head, d)).movedim(-2, -3)   # (..., nh, L, d)
    q, k, v = heads(q), heads(k), heads(v)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    a = (w @ v).movedim(-3, -2).flatten(-2)                # (..., L, C)
    a = a @ sd[f"{name}.fc.weight"].t() + sd[f"{name}.fc.bias"]
    return a.movedim(-2, axis - 1).movedim(-1, 1)          # (B, C, T, H, W)


def res_stack(sd, prefix, x, n_layers):
    for i in range(n_layers):
        b = f"{prefix}.res_stack.{i}.block"
        h = F.relu(bn(sd, f"{b}.0", x))
        h = F.relu(bn(sd, f"{b}.3", conv(sd, f"{b}.2.conv", h)))
        h = F.relu(bn(sd, f"{b}.6", conv(sd, f"{b}.5.conv", h)))
        h = (attention_along(sd, f"{b}.8.attn_w", h, 4, 2)
             + attention_along(sd, f"{b}.8.attn_h", h, 3, 2)
             + attention_along(sd, f"{b}.8.attn_t", h, 2, 2))
        x = x + h
    return F.relu(bn(sd, f"{prefix}.res_stack.{n_layers}", x))


def strides(downsample):
    todo = [int(math.log2(d)) for d in downsample]
    return [tuple(2 if n > i else 1 for n in todo) for i in range(max(todo))]


def reference_latents(sd, x, downsample, n_res_layers):
    """Encoder output before quantization, (B, D, t, h, w)."""
    h = x
    for i, s in enumerate(strides(downsample)):
        h = F.relu(conv(sd, f"encoder.convs.{i}.conv", h, s))
    h = res_stack(sd, "encoder", conv(sd, "encoder.conv_last.conv", h), n_res_layers)
    return conv(sd, "pre_vq_conv.conv", h)                  # (B, D, t, h, w)


def reference_encode(sd, x, downsample, n_res_layers):
    flat = reference_latents(sd, x, downsample, n_res_layers).movedim(1, -1)   # (B, t, h, w, D)
    dist = ((flat.unsqueeze(-2) - sd["codebook.embeddings"]) ** 2).sum(-1)
    return dist.argmin(-1)


def reference_decode(sd, codes, downsample, n_res_layers):
    h = sd["codebook.embeddings"][codes].movedim(-1, 1)     # (B, D, t, h, w)
    h = res_stack(sd, "decoder", conv(sd, "post_vq_conv.conv", h), n_res_layers)
    steps = strides(downsample)
    for i, s in enumerate(steps):
        h = conv_t(sd, f"decoder.convts.{i}.convt", h, s)
        if i < len(steps) - 1:
            h = F.relu(h)
    return h


# -----------------------------------------------------------------------------
# The prior, teacher-forced (same rules: only the state dict and torch.nn.functional)


def original_layer_norm(sd, name, x, onehot):
    """The original's LayerNorm: float32, (x - mean) * (1e-5 + rsqrt(var)), with an optional
    class gain and bias."""
    if f"{name}.w.weight" in sd:
        g = 1 + onehot @ sd[f"{name}.w.weight"].t()
        b = onehot @ sd[f"{name}.wb.weight"].t()
        g, b = g[:, None, :], b[:, None, :]
    else:
        g, b = sd[f"{name}.g"], sd[f"{name}.b"]
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) * (1e-5 + torch.rsqrt(var)) * g + b


def dense_attention(sd, name, x, ctx, n_head, causal):
    q = x @ sd[f"{name}.w_qs.weight"].t()
    k = ctx @ sd[f"{name}.w_ks.weight"].t()
    v = ctx @ sd[f"{name}.w_vs.weight"].t()
    B, Lq, Lk = x.shape[0], x.shape[1], ctx.shape[1]
    q = q.view(B, Lq, n_head, -1).permute(0, 2, 1, 3)
    k = k.view(B, Lk, n_head, -1).permute(0, 2, 1, 3)
    v = v.view(B, Lk, n_head, -1).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal is not None:
        scores = scores.masked_fill(~causal, float("-inf"))
    a = (torch.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(B, Lq, -1)
    return a @ sd[f"{name}.fc.weight"].t() + sd[f"{name}.fc.bias"]


def position_table(sd, prefix, shape):
    parts = []
    for i, s in enumerate(shape):
        e = sd[f"{prefix}.emb.d_{i}"]
        idx = torch.arange(math.prod(shape)).view(shape)
        coord = (idx // math.prod(shape[i + 1:])) % s              # coordinate along axis i
        parts.append(e[coord.flatten()])
    return torch.cat(parts, -1)                                    # (L, dim)


def channel_ln(sd, name, x):
    w = sd[f"{name}.norm.norm.weight"]
    b = sd[f"{name}.norm.norm.bias"]
    return F.layer_norm(x.movedim(1, -1), w.shape, w, b, 1e-5).movedim(-1, 1)


def res_block(sd, name, x, stride, projection):
    conv = lambda key, v, **kw: F.conv3d(v, sd[f"{name}.{key}.weight"], **kw)
    short = channel_ln(sd, f"{name}.proj_bnr", conv("proj_conv", x, stride=stride)) \
        if projection else x
    h = F.relu(channel_ln(sd, f"{name}.bnr1", conv("conv1", x, stride=stride, padding=1)))
    h = F.relu(channel_ln(sd, f"{name}.bnr2", conv("conv2", h, padding=1)))
    return F.relu(h + short)


def reference_resnet(sd, frames):
    stem = F.conv3d(frames, sd["resnet.stem.0.weight"], padding=1)
    x = F.relu(channel_ln(sd, "resnet.stem.1", stem))
    for g, (n, stride) in enumerate([(3, 1), (4, (1, 2, 2)), (6, (1, 2, 2)), (3, 1)], start=1):
        x = res_block(sd, f"resnet.group{g}.start_block", x, stride, True)
        for i in range(n - 1):
            x = res_block(sd, f"resnet.group{g}.blocks.{i}", x, 1, False)
    return x.movedim(1, -1)                                         # (B, k, H/4, W/4, 240)


def reference_prior_logits(sd, codes, n_head, mask, onehot=None, frames=None):
    """Teacher-forced logits (B, L, n_codes) of an original-layout prior state dict."""
    B = codes.shape[0]
    shape = tuple(codes.shape[1:])
    x = sd["vqvae.codebook.embeddings"][codes.flatten(1)] @ sd["fc_in.weight"].t()  # (B, L, hidden)
    sos = sd["attn_stack.right_shift.sos"].expand(B, 1, -1)
    x = torch.cat([sos, x[:, :-1]], 1) + position_table(sd, "attn_stack.pos_embd", shape)
    ctx = None
    if frames is not None:
        feats = reference_resnet(sd, frames)
        ctx = feats.flatten(1, 3) + position_table(sd, "cond_pos_embd", feats.shape[1:4])
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("attn_stack.attn_nets.")})
    for i in range(n_layers):
        p = f"attn_stack.attn_nets.{i}"
        h = original_layer_norm(sd, f"{p}.pre_attn_norm", x, onehot)
        x = x + dense_attention(sd, f"{p}.attn", h, h, n_head, mask)
        if ctx is not None:
            h = original_layer_norm(sd, f"{p}.pre_enc_norm", x, onehot)
            x = x + dense_attention(sd, f"{p}.enc_attn", h, ctx, n_head, None)
        h = original_layer_norm(sd, f"{p}.pre_fc_norm", x, onehot)
        h = h @ sd[f"{p}.fc_block.0.weight"].t() + sd[f"{p}.fc_block.0.bias"]
        h = torch.sigmoid(1.702 * h) * h
        x = x + h @ sd[f"{p}.fc_block.2.weight"].t() + sd[f"{p}.fc_block.2.bias"]
    return original_layer_norm(sd, "norm", x, onehot) @ sd["fc_out.weight"].t()
