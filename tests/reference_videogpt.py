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
        h = (attention_along(sd, f"{b}.8.attn_w", h, 4, 2) + attention_along(sd, f"{b}.8.attn_h", h, 3, 2)
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
    flat = reference_latents(sd, x, downsample, n_res_layers).movedim(1, -1)                                  # (B, t, h, w, D)
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
