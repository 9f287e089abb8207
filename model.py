"""VideoMAE: a ViT encoder that sees ~10% of a clip's tubelets and a small decoder that rebuilds the rest.

VideoMAE  pre-training model (encoder + decoder + loss), names and numerics of the reference code.
VideoViT  the same encoder over every token, mean pooling and a linear head, for fine-tuning.
load_checkpoint  weights from this project, the reference code (pre-training or fine-tuned) or HuggingFace.
"""
import argparse
import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Encoder width/depth/heads and decoder width/depth/heads. Released S and B runs used decoder depth 4.
PRESETS = {
    "mini": dict(embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3),  # demo
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=96, decoder_depth=4, decoder_num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3),
    "base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=12, decoder_num_heads=8),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=640, decoder_depth=12, decoder_num_heads=8),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TUBELET_SIZE, PATCH_SIZE = 2, 16  # the cube embedding: 2 frames x 16 x 16 pixels per token (Sec. 3.3)


# ----------------------------------------------------------------------------- the paper's math, as pure functions

def sinusoid_table(num_tokens, dim, device=None):
    """Fixed 1-D sine-cosine positions over the flattened token index: channel j uses the angle
    pos / 10000^(2*floor(j/2)/dim), sin on even j, cos on odd j. Returns (1, num_tokens, dim)."""
    pos = torch.arange(num_tokens, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(dim, device=device)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def patchify(video, tubelet_size, patch_size):
    """(B, C, T, H, W) -> (B, N, tubelet*patch*patch*C): one row per token, in the cube embedding's token order
    (t-major, then h, then w), each row's pixels in (t, h, w, c) order, channel fastest."""
    B, C, T, H, W = video.shape
    t, h, w = T // tubelet_size, H // patch_size, W // patch_size
    x = video.reshape(B, C, t, tubelet_size, h, patch_size, w, patch_size)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, t, h, w, pt, ph, pw, C)
    return x.reshape(B, t * h * w, tubelet_size * patch_size * patch_size * C)


def unpatchify(x, grid, tubelet_size, patch_size, channels=3):
    """Inverse of patchify: (B, N, tubelet*patch*patch*C) -> (B, C, T, H, W)."""
    (t, h, w), B = grid, x.shape[0]
    x = x.reshape(B, t, h, w, tubelet_size, patch_size, patch_size, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, pt, h, ph, w, pw)
    return x.reshape(B, channels, t * tubelet_size, h * patch_size, w * patch_size)


def reconstruction_target(patches, norm_pix_loss=True, channels=3):
    """Sec. 3.3: the pixels to rebuild, from patchified ImageNet-normalised tokens (B, n, P*C).
    The reference undoes the normalisation (pixels in [0, 1]) and, with norm_pix_loss, normalises each token per
    channel over its P pixels: (y - mean) / (unbiased std + 1e-6). For y = std_c * x + mean_c that equals
    (x - mean) / (std + 1e-6 / std_c) on the normalised pixels x. Two passes (mean, then squared deviations)
    over a (P, C) view: no transposed copies, and much faster on CPUs than torch.var_mean's one-pass kernel."""
    B, n, D = patches.shape
    x = patches.view(B, n, D // channels, channels)  # (B, n, P, C), channel fastest as patchify lays it out
    mean, std = (x.new_tensor(v[:channels]) for v in (IMAGENET_MEAN, IMAGENET_STD))
    if norm_pix_loss:
        x = x - x.mean(dim=2, keepdim=True)
        var = x.pow(2).sum(dim=2, keepdim=True) / (x.shape[2] - 1)  # unbiased, as the reference
        x = x / (var.sqrt() + 1e-6 / std)
    else:
        x = x * std + mean
    return x.view(B, n, D)


def select(x, keep):
    """The tokens of x (B, N, D) where keep (B, N) is True, in order: (B, n, D). Masks keep n tokens in every clip."""
    return x[keep].view(x.shape[0], -1, x.shape[-1])


def drop_path(x, p, training):
    """Stochastic depth: drop a block's residual branch for a whole sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def blocks_flops(blocks, num_tokens, queries=None):
    """Forward matmul FLOPs of transformer blocks on one sequence (2 per multiply-add): every Linear, plus
    the two attention products q k^T and attn v; with `queries`, the last block as run_blocks computes it."""
    total = 0
    for i, b in enumerate(blocks):
        n, q = num_tokens, queries if queries and i == len(blocks) - 1 else num_tokens
        rest = sum(m.weight.numel() for m in b.modules() if isinstance(m, nn.Linear) and m is not b.attn.qkv)
        total += 2 * n * b.attn.qkv.weight.numel() + 2 * q * rest + 4 * q * n * b.norm1.normalized_shape[0]
    return total


# ----------------------------------------------------------------------------- the transformer

class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv matrix, learned q and v biases and no k bias."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, queries=None):
        """queries: attend from the last `queries` tokens only (every token is still a key and a value)."""
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        q = q[:, :, -queries:] if queries else q
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = drop_path

    def forward(self, x, queries=None):
        """queries: outputs for the last `queries` tokens only, as if computed for all and sliced."""
        h = self.attn(self.norm1(x), queries)
        x = (x[:, -queries:] if queries else x) + drop_path(h, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def run_blocks(blocks, x, grad_checkpointing, queries=None):
    """The blocks in turn; with `queries`, the last one computes only the last `queries` tokens' outputs."""
    for i, blk in enumerate(blocks):
        q = queries if i == len(blocks) - 1 else None
        x = checkpoint(blk, x, q, use_reentrant=False) if grad_checkpointing and x.requires_grad else blk(x, q)
    return x


def init_weights(module, linear_init):
    """Reference init: Linear by `linear_init` with zero bias, LayerNorm 1/0. Conv3d keeps torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            linear_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Cube embedding: a Conv3d with kernel = stride = (tubelet, patch, patch), one token per tubelet.
    Since kernel = stride, it is a linear map of each patchified tubelet; applying it to the patchify()
    rows lets the encoder embed only the visible tubelets and share the patchified clip with the loss."""

    def __init__(self, in_chans, embed_dim, tubelet_size, patch_size):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, (tubelet_size, patch_size, patch_size),
                              stride=(tubelet_size, patch_size, patch_size))

    def forward(self, patches):  # (B, n, pt*ph*pw*C) in patchify's (t, h, w, c) order -> (B, n, embed_dim)
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).flatten(1)  # (D, C, pt, ph, pw) -> (D, pt*ph*pw*C)
        return F.linear(patches, weight, self.proj.bias)


class Encoder(nn.Module):
    """Cube embedding + fixed positions + transformer blocks, over the visible tokens only when given a mask."""

    def __init__(self, img_size=224, num_frames=16, patch_size=PATCH_SIZE, tubelet_size=TUBELET_SIZE, in_chans=3, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.0, final_norm=True):
        super().__init__()
        for name, size, unit in [("img_size", img_size, patch_size), ("num_frames", num_frames, tubelet_size)]:
            if size % unit:
                raise ValueError(f"{name} {size} is not a multiple of the {'patch' if unit == patch_size else 'tubelet'} size {unit}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.patch_embed = PatchEmbed(in_chans, embed_dim, tubelet_size, patch_size)
        self.register_buffer("pos_embed", sinusoid_table(math.prod(self.grid), embed_dim), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # drop path rises linearly over depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.grad_checkpointing = False

    def token_grid(self, video):
        """(t, h, w) token grid of a clip; a clip of another size than built for is fine (see positions)."""
        _, C, T, H, W = video.shape
        if C != self.in_chans or T % self.tubelet_size or H % self.patch_size or W % self.patch_size:
            raise ValueError(f"clip of shape {tuple(video.shape[1:])} does not fit in_chans {self.in_chans}, "
                             f"tubelet {self.tubelet_size}, patch {self.patch_size}")
        return T // self.tubelet_size, H // self.patch_size, W // self.patch_size

    def positions(self, num_tokens, table):
        """The fixed sinusoid table; for clips of another size (e.g. 8 frames or 112 px) it is simply rebuilt for
        the new number of tokens, as the reference code does: it is not learned, so nothing is lost."""
        return table if table.shape[1] == num_tokens else sinusoid_table(num_tokens, table.shape[2], table.device)

    def flops(self, num_tokens):
        """Forward matmul FLOPs of embedding and blocks on num_tokens tokens of one clip."""
        return 2 * num_tokens * self.patch_embed.proj.weight.numel() + blocks_flops(self.blocks, num_tokens)

    def forward(self, patches, mask=None, final_norm=True):
        """patches (B, N, P*C) from patchify; mask (B, N) True = hidden. Returns (B, N_visible, embed_dim)."""
        B, N, _ = patches.shape
        pos = self.positions(N, self.pos_embed).expand(B, -1, -1)
        if mask is not None:  # keep the visible tokens, in their original order
            patches, pos = select(patches, ~mask), select(pos, ~mask)
        x = self.patch_embed(patches) + pos  # (B, N_vis, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x) if final_norm else x

    def features(self, video):
        """Whole clips (B, 3, T, H, W) -> the last block's outputs, mean-pooled over tokens: (B, embed_dim). No final
        norm, so a pre-training encoder and a classifier loaded from it give the same features (k-NN probe)."""
        self.token_grid(video)
        return Encoder.forward(self, patchify(video, self.tubelet_size, self.patch_size), final_norm=False).mean(dim=1)


class VideoMAE(nn.Module):
    """Pre-training model (Fig. 1): an encoder over the visible tokens, a narrow decoder that rebuilds pixels.

    forward(video, mask, decode_mask=None) -> (loss, pred)
      video (B, 3, T, H, W), ImageNet-normalised; mask (B, N) True = hidden from the encoder;
      decode_mask (B, N) True = not rebuilt (VideoMAE V2 dual masking); None = rebuild every hidden token.
      pred (B, N_pred, tubelet*patch*patch*3): the rebuilt tokens in token order, pixels in (t, h, w, c) order.
      loss: mean squared error against reconstruction_target() over tokens that are hidden and rebuilt.
    """

    def __init__(self, img_size=224, num_frames=16, patch_size=PATCH_SIZE, tubelet_size=TUBELET_SIZE, in_chans=3, embed_dim=768,
                 depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4, decoder_num_heads=6,
                 mlp_ratio=4.0, norm_pix_loss=True, drop_path_rate=0.0):
        super().__init__()
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {decoder_embed_dim} is not a multiple of decoder_num_heads {decoder_num_heads}")
        self.norm_pix_loss = norm_pix_loss
        self.encoder = Encoder(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim, depth,
                               num_heads, mlp_ratio, drop_path_rate)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder = nn.Module()
        self.decoder.blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                            for _ in range(decoder_depth))
        self.decoder.norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder.head = nn.Linear(decoder_embed_dim, tubelet_size * patch_size * patch_size * in_chans)
        self.register_buffer("decoder_pos_embed", sinusoid_table(self.encoder.pos_embed.shape[1], decoder_embed_dim),
                             persistent=False)
        init_weights(self, nn.init.xavier_uniform_)  # qkv initialised as one matrix, as in the reference
        # The reference initialises only inside its encoder and decoder: the bridge keeps torch's default init
        # (uniform, std 1/sqrt(3 * embed_dim)), and mask_token is cut at +-0.02 (timm's bounds are absolute).
        self.encoder_to_decoder.reset_parameters()
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, video, mask, decode_mask=None):
        enc = self.encoder
        grid = enc.token_grid(video)
        patches = patchify(video, enc.tubelet_size, enc.patch_size)  # (B, N, P*C), shared by encoder and loss
        B, N, _ = patches.shape
        if mask.shape != (B, N):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {B} clips of {N} tokens (grid {grid})")
        rebuild = mask if decode_mask is None else ~decode_mask  # tokens the decoder is asked for
        with torch.no_grad():  # the target first, while little memory is in use
            target = reconstruction_target(select(patches, rebuild).float(), self.norm_pix_loss, enc.in_chans)
        if target.shape[1] == 0:  # (the decoder's last block would read queries=0 as "every token")
            raise ValueError("the masks leave no token to rebuild (none hidden, or none asked of the decoder); "
                             "raise the mask ratio")
        x = self.encoder_to_decoder(enc(patches, mask))  # (B, N_vis, D_dec)
        del patches  # not needed by the decoder: free it before the decoder's activations pile up
        pos = enc.positions(N, self.decoder_pos_embed).expand(B, -1, -1)
        n_pred = target.shape[1]
        x = torch.cat([x + select(pos, ~mask), self.mask_token + select(pos, rebuild)], dim=1)  # visible, then queries
        # the visible tokens' outputs are never read: the last block computes the queries' only
        x = run_blocks(self.decoder.blocks, x, enc.grad_checkpointing, queries=n_pred)
        pred = self.decoder.head(self.decoder.norm(x))  # (B, N_pred, P*C)
        if decode_mask is None:
            loss = F.mse_loss(pred.float(), target)
        else:  # V2: visible tokens may be among the rebuilt ones; they are not scored
            err = F.mse_loss(pred.float(), target, reduction="none").mean(dim=-1)  # (B, N_pred)
            scored = mask[rebuild].view(B, n_pred)
            loss = (err * scored).sum() / scored.sum().clamp(min=1)
        return loss, pred

    def flops_per_clip(self, n_visible, n_pred, training=True):
        """Matmul FLOPs for one clip with n_visible encoder tokens and n_pred decoder queries; x3 for training."""
        f = self.encoder.flops(n_visible) + 2 * n_visible * self.encoder_to_decoder.weight.numel()
        f += blocks_flops(self.decoder.blocks, n_visible + n_pred, queries=n_pred)
        f += 2 * n_pred * self.decoder.head.weight.numel()
        return 3 * f if training else f


class VideoViT(Encoder):
    """Fine-tuning model: the encoder over all tokens, mean pooling, fc_norm and a linear head."""

    def __init__(self, num_classes=400, img_size=224, num_frames=16, patch_size=PATCH_SIZE, tubelet_size=TUBELET_SIZE, in_chans=3,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.0, head_drop_rate=0.0,
                 init_scale=0.001):
        super().__init__(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim, depth, num_heads,
                         mlp_ratio, drop_path_rate, final_norm=False)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        init_weights(self, lambda w: nn.init.trunc_normal_(w, std=0.02))  # the reference's fine-tuning init
        with torch.no_grad():
            self.head.weight.mul_(init_scale)  # a small head: early gradients do not wreck the pre-trained encoder
            self.head.bias.mul_(init_scale)

    def forward(self, video):
        return self.head(self.head_drop(self.fc_norm(self.features(video))))  # (B, num_classes)


def build_model(kind, preset, **kwargs):
    """VideoMAE ('pretrain') or VideoViT ('finetune') from a preset name, with any constructor argument overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model '{preset}'; choose one of {', '.join(PRESETS)}")
    if kind == "pretrain":
        return VideoMAE(**{**PRESETS[preset], **kwargs})
    sizes = {k: v for k, v in PRESETS[preset].items() if not k.startswith("decoder_")}
    return VideoViT(**{**sizes, **kwargs})


# ----------------------------------------------------------------------------- loading weights people already have

_HF_TOP = [  # the start of a HuggingFace key <-> the same tensor's key in the reference's pre-training layout
    ("videomae.embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
    ("videomae.encoder.layer.", "encoder.blocks."), ("videomae.layernorm.", "encoder.norm."),
    ("decoder.decoder_layers.", "decoder.blocks."), ("classifier.", "head."),
]
_HF_BLOCK = [  # inside one transformer layer, after its index; the first pair matching a name wins
    ("attention.attention.q_bias", "attn.q_bias"), ("attention.attention.v_bias", "attn.v_bias"),
    ("attention.attention.query.bias", "attn.q_bias"), ("attention.attention.value.bias", "attn.v_bias"),  # v5 names
    ("attention.output.dense.", "attn.proj."), ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
]
_HF_QKV = ("attention.attention.query.weight", "attention.attention.key.weight", "attention.attention.value.weight")
_DECODER_KEYS = ("decoder.", "encoder_to_decoder.", "mask_token")


def _rename(key, to_hf):
    """One key from HuggingFace's names to the reference's, or back (to_hf), by the two tables above."""
    src, dst = (1, 0) if to_hf else (0, 1)
    for pair in _HF_TOP:
        if key.startswith(pair[src]):
            key = pair[dst] + key[len(pair[src]):]
            break
    layer = re.fullmatch(r"(.*?\.\d+\.)(.*)", key)  # ('encoder.blocks.3.', 'attn.proj.weight')
    for pair in _HF_BLOCK if layer else []:
        if layer[2].startswith(pair[src]):
            return layer[1] + pair[dst] + layer[2][len(pair[src]):]
    return key


def _convert(sd, to_hf):
    """HuggingFace VideoMAE names -> the reference's, or back (to_hf). The reference's one qkv matrix is
    HuggingFace's query, key and value matrices stacked in rows. Biases are written as the files on the hub
    spell them (q_bias, v_bias), which transformers 4 and 5 both read."""
    if not to_hf:  # a VideoMAEModel's keys lack the 'videomae.' prefix
        sd = {("videomae." + k if k.startswith(("embeddings.", "encoder.layer.", "layernorm.")) else k): v for k, v in sd.items()}
    out = {}
    for key, value in sd.items():
        if to_hf and key.endswith("attn.qkv.weight"):
            stem = _rename(key.removesuffix("attn.qkv.weight"), to_hf)
            out.update({stem + name: part.contiguous() for name, part in zip(_HF_QKV, value.chunk(3))})
        elif not to_hf and key.endswith(_HF_QKV[0]):
            stem = key.removesuffix(_HF_QKV[0])
            out[_rename(stem, to_hf) + "attn.qkv.weight"] = torch.cat([sd[stem + name] for name in _HF_QKV])
        elif to_hf or not key.endswith(_HF_QKV[1:]):
            out[_rename(key, to_hf)] = value.contiguous()
    return out


def canonical_weights(ckpt):
    """The weights of a checkpoint in any known format, named as in the reference's pre-training checkpoint
    (encoder weights under 'encoder.'). Fixed positions are dropped: they are rebuilt, never loaded."""
    # weights under 'model' (this project, reference pre-training), 'module' (reference fine-tuning), 'state_dict'
    sd = next((ckpt[k] for k in ("model", "module", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    sd = {k.replace("module.", "", 1).replace("_orig_mod.", ""): v for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in sd):
        sd = _convert(sd, to_hf=False)
    return {k if k.startswith(("encoder.", "fc_norm.", "head.") + _DECODER_KEYS) else "encoder." + k: v
            for k, v in sd.items() if "pos_embed" not in k}


def read_file(path):
    """A checkpoint file as saved, tensors memory-mapped; never runs code (weights_only). The reference code
    stores its flags as an argparse.Namespace, which is allowed; .safetensors files need that package."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise RuntimeError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in torch's legacy (pre-1.6) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(model, path_or_state_dict, verbose=True):
    """Load weights into a VideoMAE or VideoViT; returns (missing, unexpected) key lists.

    Accepts this project's checkpoints, the reference's pre-training ('model': encoder./decoder. names) and
    fine-tuned ('module') checkpoints, and HuggingFace VideoMAE weights (pytorch_model.bin, model.safetensors).
    A pre-training checkpoint fills a VideoViT's encoder (its decoder is ignored, fc_norm and head start fresh);
    a head of another class count is dropped. Any other shape mismatch is an error naming the tensor.
    """
    from_file = not isinstance(path_or_state_dict, dict)
    ckpt = read_file(path_or_state_dict) if from_file else path_or_state_dict
    source = str(path_or_state_dict) if from_file else "state dict"
    sd = canonical_weights(ckpt)
    own, notes = model.state_dict(), []
    if isinstance(model, VideoViT):
        if any(k.startswith(_DECODER_KEYS) for k in sd):
            notes.append("pre-training decoder ignored")
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if not k.startswith(_DECODER_KEYS)}
        sd.pop("norm.weight", None), sd.pop("norm.bias", None)  # mean pooling uses fc_norm, not the final norm
    if "head.weight" in sd and "head.weight" in own and sd["head.weight"].shape != own["head.weight"].shape:
        notes.append(f"head for {sd['head.weight'].shape[0]} classes dropped (model has {own['head.weight'].shape[0]})")
        del sd["head.weight"], sd["head.bias"]
    for key, value in sd.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(f"{source}: tensor '{key}' has shape {tuple(value.shape)} but the model expects "
                             f"{tuple(own[key].shape)}; was it saved from another model size (--model)?")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if not set(own) & set(sd):
        raise ValueError(f"{source}: no tensor matches this model; is it a VideoMAE checkpoint?")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if verbose:
        fresh = [k for k in missing if k.startswith(("fc_norm.", "head."))]
        print(f"loaded {len(own) - len(missing)}/{len(own)} tensors from {source}"
              + "".join(f"; {n}" for n in notes)
              + (f"; starting fresh as expected: {', '.join(fresh)}" if fresh else "")
              + (f"; MISSING: {', '.join(k for k in missing if k not in fresh)}" if len(missing) > len(fresh) else "")
              + (f"; ignored: {', '.join(unexpected)}" if unexpected else ""))
    return missing, unexpected


# ----------------------------------------------------------------------------- sharing weights: the HuggingFace layout

_HF_SIZES = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
             "decoder_embed_dim": "decoder_hidden_size", "decoder_depth": "decoder_num_hidden_layers",
             "decoder_num_heads": "decoder_num_attention_heads"}  # a preset's sizes -> config.json's names


def checkpoint_config(path):
    """The run configuration a checkpoint carries: this project's 'config', else what HuggingFace's config.json
    beside the weights says (preset, input size, frames, class names), else {}."""
    saved, beside = read_file(path).get("config"), Path(path).parent / "config.json"
    if saved or not beside.is_file():
        return saved or {}
    hf = json.loads(beside.read_text())
    labels = hf.get("id2label", {})
    presets = [name for name, p in PRESETS.items() if all(hf.get(_HF_SIZES[k]) == p[k] for k in ("embed_dim", "depth", "num_heads"))]
    config = {"model": presets[0] if presets else None, "input_size": hf.get("image_size"),
              "num_frames": hf.get("num_frames"), "classes": [labels[str(i)] for i in range(len(labels))]}
    return {k: v for k, v in config.items() if v}


def export_huggingface(path, out_dir):
    """Write a checkpoint (any format load_checkpoint reads) to out_dir as transformers' VideoMAEForPreTraining or,
    with a head, VideoMAEForVideoClassification saves itself: config.json, and model.safetensors (pytorch_model.bin
    without the safetensors package). The inverse of load_checkpoint. Returns the paths written."""
    from pretrain import atomic_write  # the shared writer (pretrain.py imports this module, so not at the top)
    config, sd = checkpoint_config(path), canonical_weights(read_file(path))
    width = sd["encoder.patch_embed.proj.weight"].shape[0]
    preset = config.get("model") or next((name for name, p in PRESETS.items() if p["embed_dim"] == width), "base")
    kind = "finetune" if "head.weight" in sd else "pretrain"
    img_size, num_frames = config.get("input_size", 224), config.get("num_frames", 16)
    norm_pix_loss = not config.get("no_norm_pix_loss")
    extra = dict(num_classes=len(sd["head.bias"])) if kind == "finetune" else dict(norm_pix_loss=norm_pix_loss)
    net = build_model(kind, preset, img_size=img_size, num_frames=num_frames, **extra)
    missing, _ = load_checkpoint(net, sd, verbose=False)  # checks every shape against the preset
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}; only a complete model can be exported")
    sizes = PRESETS[preset]
    hf = dict(architectures=["VideoMAEForVideoClassification" if kind == "finetune" else "VideoMAEForPreTraining"],
              model_type="videomae", image_size=img_size, num_frames=num_frames, patch_size=PATCH_SIZE,
              tubelet_size=TUBELET_SIZE, intermediate_size=4 * sizes["embed_dim"], layer_norm_eps=1e-6,
              decoder_intermediate_size=4 * sizes["decoder_embed_dim"], norm_pix_loss=norm_pix_loss,
              use_mean_pooling=kind == "finetune", **{hf_name: sizes[k] for k, hf_name in _HF_SIZES.items()})
    if kind == "finetune":  # classifiers pool into fc_norm; pre-training models end in a layernorm
        names = config.get("classes") or [f"class {i}" for i in range(len(sd["head.bias"]))]
        hf.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
    weights = _convert(canonical_weights(net.state_dict()), to_hf=True)
    try:
        from safetensors.torch import save_file
        name, save = "model.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"})
    except ImportError:  # transformers reads either file
        name, save = "pytorch_model.bin", lambda tmp: torch.save(weights, tmp)
    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.join(out_dir, "config.json"), os.path.join(out_dir, name)]
    atomic_write(files[0], lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2) + "\n"))
    atomic_write(files[1], save)
    print(f"wrote {' and '.join(files)}: {hf['architectures'][0]}, {preset}, {img_size} px, {num_frames} frames"
          + (f", {len(names)} classes" if kind == "finetune" else ""))
    return files


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Export a checkpoint in the layout of HuggingFace transformers.")
    parser.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), required=True,
                        help="write OUT_DIR/config.json and the weights, for from_pretrained(OUT_DIR)")
    source, out = parser.parse_args().export
    if not os.path.isfile(source):
        parser.error(f"--export {source} is not a file")
    export_huggingface(source, out)
