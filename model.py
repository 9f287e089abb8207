"""VideoMAE: a ViT encoder that sees ~10% of a clip's tubelets and a small decoder that rebuilds the rest.

VideoMAE  pre-training model (encoder + decoder + loss), names and numerics of the reference code.
VideoViT  the same encoder over every token, mean pooling and a linear head, for fine-tuning.
"""
import math
from collections import OrderedDict

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
