"""VideoMAE (Tong et al., 2022, arXiv 2203.12602): a ViT encoder that sees a tenth of a clip's
tubelets and a narrow decoder that rebuilds the rest. In the order of the paper's Sec. 3.3: cube
embedding and positions, the encoder on the visible tokens, the decoder with its mask tokens, the
target and the loss; then the classifier that fine-tuning trains. Names and numerics are the
reference code's (github.com/MCG-NJU/VideoMAE).

VideoMAE  pre-training: forward(video, mask) -> (loss, rebuilt pixels)
VideoViT  fine-tuning: the same encoder over every token, mean pooling and a linear head
"""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Sizes: encoder width, depth, heads; decoder width, depth, heads. Released S and B runs used
# decoder depth 4.
_SIZES = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads")
PRESETS = {
    "mini": dict(zip(_SIZES, (192, 6, 3, 96, 2, 3))),  # the demo's
    "tiny": dict(zip(_SIZES, (192, 12, 3, 96, 4, 3))),
    "small": dict(zip(_SIZES, (384, 12, 6, 192, 4, 3))),
    "base": dict(zip(_SIZES, (768, 12, 12, 384, 4, 6))),
    "large": dict(zip(_SIZES, (1024, 24, 16, 512, 12, 8))),
    "huge": dict(zip(_SIZES, (1280, 32, 16, 640, 12, 8))),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # clips come in normalised with these; the loss undoes it
IMAGENET_STD = (0.229, 0.224, 0.225)
TUBELET_SIZE = 2  # Sec. 3.3, cube embedding: one token per 2 frames x 16 x 16 pixels
PATCH_SIZE = 16
_STATS = {}  # (device, channels) -> ImageNet mean and std as tensors there


def imagenet_stats(device, channels=3):
    """IMAGENET_MEAN and IMAGENET_STD as tensors (channels,) on `device`, built once: a tensor
    built from Python numbers is a copy from the host, which on a GPU waits for the queued work."""
    key = (torch.device(device), channels)
    if key not in _STATS:
        _STATS[key] = tuple(torch.tensor(v[:channels], device=device)
                            for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _STATS[key]


# -------------------------------------------------------------- Sec. 3.3: cube embedding, positions

def patchify(video, tubelet_size, patch_size):
    """(B, C, T, H, W) -> (B, N, tubelet*patch*patch*C): one row per token, in the cube embedding's
    token order (t-major, then h, then w), each row's pixels in (t, h, w, c) order, channel fastest."""
    B, C, T, H, W = video.shape
    t, h, w = T // tubelet_size, H // patch_size, W // patch_size
    x = video.reshape(B, C, t, tubelet_size, h, patch_size, w, patch_size)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, t, h, w, pt, ph, pw, C)
    return x.reshape(B, t * h * w, tubelet_size * patch_size * patch_size * C)


def unpatchify(x, grid, tubelet_size, patch_size, channels=3):
    """Inverse of patchify: (B, N, tubelet*patch*patch*C) -> (B, C, T, H, W)."""
    t, h, w = grid
    B = x.shape[0]
    x = x.reshape(B, t, h, w, tubelet_size, patch_size, patch_size, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, t, pt, h, ph, w, pw)
    return x.reshape(B, channels, t * tubelet_size, h * patch_size, w * patch_size)


class PatchEmbed(nn.Module):
    """Cube embedding: a Conv3d with kernel = stride = (tubelet, patch, patch), one token per
    tubelet. Since kernel = stride, it is a linear map of each patchified tubelet; applying it to
    the patchify() rows lets the encoder embed only the visible tubelets and share the patchified
    clip with the loss."""

    def __init__(self, in_chans, embed_dim, tubelet_size, patch_size):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel, stride=kernel)

    def forward(self, patches):
        """(B, n, pt*ph*pw*C) in patchify's (t, h, w, c) order -> (B, n, embed_dim)."""
        # (D, C, pt, ph, pw) -> (D, pt*ph*pw*C), the order of patchify's rows
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).flatten(1)
        return F.linear(patches, weight, self.proj.bias)


def sinusoid_table(num_tokens, dim, device=None):
    """Fixed 1-D sine-cosine positions over the flattened token index: channel j uses the angle
    pos / 10000^(2*floor(j/2)/dim), sin on even j, cos on odd j. Returns (1, num_tokens, dim)."""
    pos = torch.arange(num_tokens, dtype=torch.float64, device=device).unsqueeze(1)
    j = torch.arange(dim, device=device)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def positions(table, num_tokens):
    """The fixed table, rebuilt for clips of another size than built for (e.g. 8 frames or 112 px),
    as the reference does: it is not learned, so nothing is lost."""
    if table.shape[1] == num_tokens:
        return table
    return sinusoid_table(num_tokens, table.shape[2], table.device)


# ---------------------------------------------------------------------- the transformer block (ViT)

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
        """queries: attend from the last `queries` tokens only (all tokens stay keys and values)."""
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        if queries:
            q = q[:, :, -queries:]
        if x.is_cpu:  # in fp32 under autocast: torch's bf16 attention backward on CPUs is 7x slower
            with torch.autocast("cpu", enabled=False):  # (it would cast q, k, v back to bf16)
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C))


def drop_path(x, p, training):
    """Stochastic depth: drop a block's residual branch for a whole sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        layers = OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(layers)
        self.drop_path = drop_path

    def forward(self, x, queries=None):
        """queries: outputs for the last `queries` tokens only, as if computed for all and sliced."""
        h = self.attn(self.norm1(x), queries)
        if queries:
            x = x[:, -queries:]
        x = x + drop_path(h, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def run_blocks(blocks, x, grad_checkpointing, queries=None):
    """The blocks in turn; with `queries`, the last one computes the last `queries` tokens' only."""
    for i, block in enumerate(blocks):
        q = queries if i == len(blocks) - 1 else None
        if grad_checkpointing and x.requires_grad:  # recomputed in backward: less memory
            x = checkpoint(block, x, q, use_reentrant=False)
        else:
            x = block(x, q)
    return x


def init_weights(module, linear_init):
    """Reference init: Linear by `linear_init`, zero bias; LayerNorm 1/0; Conv3d keeps torch's."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            linear_init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def blocks_flops(blocks, num_tokens, queries=None):
    """Forward matmul FLOPs of transformer blocks on one sequence (2 per multiply-add): every
    Linear, plus the two attention products q k^T and attn v; with `queries`, the last block as
    run_blocks computes it."""
    total = 0
    for i, b in enumerate(blocks):
        q = queries if queries and i == len(blocks) - 1 else num_tokens
        linears = [m for m in b.modules() if isinstance(m, nn.Linear) and m is not b.attn.qkv]
        rest = sum(m.weight.numel() for m in linears)  # out projection and MLP: the queries only
        width = b.norm1.normalized_shape[0]
        total += 2 * num_tokens * b.attn.qkv.weight.numel() + 2 * q * rest
        total += 4 * q * num_tokens * width  # q k^T and attn v
    return total


# ---------------------------------------------------------------------------- Sec. 3.3: the encoder

def split_tokens(mask, num_true=None):
    """Token indices of each clip where mask (B, N) is False, (B, N - num_true), and where it is
    True, (B, num_true), in token order (MAE's ids_keep): a stable sort of the 0/1 values puts the
    False ones first. Every mask hides as many tokens in every clip (mask.hidden_per_clip): with
    num_true given, shapes are fixed and no mask value is read on the host, where x[mask] has a
    shape that depends on the values (a GPU waits, torch.compile breaks its graph there)."""
    if num_true is None:
        num_true = int(mask[0].sum())  # one host sync
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # (B, N): False tokens, then True
    num_false = mask.shape[1] - num_true
    return order[:, :num_false], order[:, num_false:]


def gather(x, ids):
    """The tokens of x (B, N, D) at ids (B, n), in that order: (B, n, D), copied as whole rows."""
    B, N, D = x.shape
    rows = ids + N * torch.arange(B, device=ids.device).unsqueeze(1)  # row numbers in (B * N, D)
    return x.reshape(B * N, D).index_select(0, rows.flatten()).view(B, ids.shape[1], D)


class Encoder(nn.Module):
    """Cube embedding, fixed positions and transformer blocks: over the visible tokens only, given a
    mask. This asymmetry is what makes VideoMAE cheap: at 90% masking the encoder sees 160 of 1568
    tokens."""

    def __init__(self, img_size=224, num_frames=16, patch_size=PATCH_SIZE, tubelet_size=TUBELET_SIZE,
                 in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, drop_path_rate=0.0,
                 final_norm=True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not a multiple of the tubelet size "
                             f"{tubelet_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        side = img_size // patch_size
        self.grid = (num_frames // tubelet_size, side, side)  # (t, h, w) tokens
        self.patch_embed = PatchEmbed(in_chans, embed_dim, tubelet_size, patch_size)
        table = sinusoid_table(math.prod(self.grid), embed_dim)
        self.register_buffer("pos_embed", table, persistent=False)  # fixed: not in checkpoints
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # drop path rises over depth
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if final_norm else nn.Identity()
        self.grad_checkpointing = False

    def patches(self, video):
        """A clip (B, C, T, H, W) cut into tokens (B, N, P*C); any multiple of tubelet and patch."""
        _, C, T, H, W = video.shape
        pt, p = self.tubelet_size, self.patch_size
        if C != self.in_chans or T % pt or H % p or W % p:
            raise ValueError(f"clip of shape {tuple(video.shape[1:])} does not fit in_chans "
                             f"{self.in_chans}, tubelet {pt}, patch {p}")
        return patchify(video, self.tubelet_size, self.patch_size)

    def forward(self, patches, visible=None, final_norm=True):
        """patches (B, N, P*C) from patchify; visible (B, N_vis) the indices of the tokens to
        encode (split_tokens), None for all. Returns (B, N_vis, embed_dim)."""
        B, N, _ = patches.shape
        pos = positions(self.pos_embed, N).expand(B, -1, -1)
        if visible is not None:  # keep the visible tokens only
            patches = gather(patches, visible)
            pos = gather(pos, visible)
        x = self.patch_embed(patches) + pos  # (B, N_vis, D)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x) if final_norm else x

    def features(self, video):
        """Whole clips (B, 3, T, H, W) -> the last block's outputs, mean-pooled over tokens: (B,
        embed_dim). No final norm, so a pre-training encoder and a classifier loaded from it give
        the same features."""
        return Encoder.forward(self, self.patches(video), final_norm=False).mean(dim=1)

    def flops(self, num_tokens):
        """Forward matmul FLOPs of embedding and blocks on num_tokens tokens of one clip."""
        embedding = 2 * num_tokens * self.patch_embed.proj.weight.numel()
        return embedding + blocks_flops(self.blocks, num_tokens)


# ---------------------------------------------------------------------------- Sec. 3.3: the decoder

class Decoder(nn.Module):
    """A narrow transformer over the visible tokens' codes followed by one mask token per token to
    rebuild, each with its position; a linear head turns each mask token's output into its tubelet's
    pixels."""

    def __init__(self, dim, depth, num_heads, num_tokens, pixels_per_token, mlp_ratio=4.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, pixels_per_token)
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, dim), persistent=False)

    def forward(self, x, num_queries, grad_checkpointing=False):
        """x (B, N_vis + num_queries, dim), the queries last -> their pixels (B, num_queries, P*C)."""
        x = run_blocks(self.blocks, x, grad_checkpointing, queries=num_queries)
        return self.head(self.norm(x))


# ---------------------------------------------------------------- Sec. 3.3: the target and the loss

def reconstruction_target(patches, norm_pix_loss=True, channels=3):
    """The pixels to rebuild, from patchified ImageNet-normalised tokens (B, n, P*C). The reference
    undoes the normalisation (pixels in [0, 1]) and, with norm_pix_loss, normalises each token per
    channel over its P pixels: (y - mean) / (unbiased std + 1e-6). For y = std_c * x + mean_c that
    equals (x - mean) / (std + 1e-6 / std_c) on the normalised pixels x. Two passes (mean, then
    squared deviations) over a (P, C) view: no transposed copies, and much faster on CPUs than
    torch.var_mean's one-pass kernel."""
    B, n, D = patches.shape
    x = patches.view(B, n, D // channels, channels)  # (B, n, P, C): channel fastest, as patchify
    mean, std = imagenet_stats(x.device, channels)
    if not norm_pix_loss:
        return (x * std + mean).view(B, n, D)
    x = x - x.mean(dim=2, keepdim=True)
    var = x.pow(2).sum(dim=2, keepdim=True) / (x.shape[2] - 1)  # unbiased, as the reference
    return (x / (var.sqrt() + 1e-6 / std)).view(B, n, D)


class VideoMAE(nn.Module):
    """Pre-training model (Fig. 1): an encoder over the visible tokens, a narrow decoder that
    rebuilds pixels.

    forward(video, mask, decode_mask=None, num_hidden=None, num_not_rebuilt=None) -> (loss, pred)
      video (B, 3, T, H, W), ImageNet-normalised; mask (B, N) True = hidden from the encoder;
      decode_mask (B, N) True = not rebuilt (VideoMAE V2 dual masking); None = every hidden token.
      num_hidden, num_not_rebuilt: True entries per clip of mask and decode_mask (the same in
        every clip: mask.hidden_per_clip); given, shapes are fixed and no mask value is read back.
      pred (B, N_pred, tubelet*patch*patch*3): the rebuilt tokens in token order, their pixels in
        (t, h, w, c) order.
      loss: mean squared error against reconstruction_target() over the hidden, rebuilt tokens.
"""

    def __init__(self, img_size=224, num_frames=16, patch_size=PATCH_SIZE, tubelet_size=TUBELET_SIZE,
                 in_chans=3, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=384, decoder_depth=4,
                 decoder_num_heads=6, mlp_ratio=4.0, norm_pix_loss=True, drop_path_rate=0.0):
        super().__init__()
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {decoder_embed_dim} is not a multiple of "
                             f"decoder_num_heads {decoder_num_heads}")
        self.norm_pix_loss = norm_pix_loss
        self.encoder = Encoder(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim,
                               depth, num_heads, mlp_ratio, drop_path_rate)
        self.encoder_to_decoder = nn.Linear(embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pixels_per_token = tubelet_size * patch_size * patch_size * in_chans
        self.decoder = Decoder(decoder_embed_dim, decoder_depth, decoder_num_heads,
                               math.prod(self.encoder.grid), pixels_per_token, mlp_ratio)
        init_weights(self, nn.init.xavier_uniform_)  # qkv as one matrix, as the reference
        # The reference initialises only inside its encoder and decoder: the bridge keeps
        # torch's default init (uniform, std 1/sqrt(3 * embed_dim)), and mask_token is cut
        # at +-0.02 (timm's bounds are absolute).
        self.encoder_to_decoder.reset_parameters()
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, video, mask, decode_mask=None, num_hidden=None, num_not_rebuilt=None):
        patches = self.encoder.patches(video)  # (B, N, P*C), shared by the encoder and the loss
        B, N, _ = patches.shape
        if mask.shape != (B, N):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {B} clips of {N} "
                             f"tokens (grid {self.encoder.grid})")
        visible, hidden = split_tokens(mask, num_hidden)  # token indices, (B, N_vis), (B, N_hid)
        # the tokens asked of the decoder, (B, N_pred)
        rebuild = hidden if decode_mask is None else split_tokens(decode_mask, num_not_rebuilt)[0]
        num_queries = rebuild.shape[1]
        if num_queries == 0:  # (the decoder's last block would read queries=0 as "every token")
            raise ValueError("the masks leave no token to rebuild (none hidden, or none asked of the "
                             "decoder); raise the mask ratio")
        with torch.no_grad():  # the target first, while little memory is in use
            target = reconstruction_target(gather(patches, rebuild).float(), self.norm_pix_loss,
                                           self.encoder.in_chans)

        # The encoder sees the visible tokens only.
        x = self.encoder_to_decoder(self.encoder(patches, visible))  # (B, N_vis, D_dec)
        del patches  # not needed by the decoder: free it before the decoder's activations pile up
        # The decoder: the visible tokens' codes, then a mask token for each token to
        # rebuild, all with positions.
        pos = positions(self.decoder.pos_embed, N).expand(B, -1, -1)
        queries = self.mask_token + gather(pos, rebuild)  # (B, N_pred, D_dec)
        x = torch.cat([x + gather(pos, visible), queries], dim=1)
        pred = self.decoder(x, num_queries, self.encoder.grad_checkpointing)  # (B, N_pred, P*C)

        # The loss: mean squared error over the hidden tokens' pixels.
        if decode_mask is None:
            return F.mse_loss(pred.float(), target), pred
        # VideoMAE V2: visible tokens may be among the rebuilt ones; they are not scored
        err = F.mse_loss(pred.float(), target, reduction="none").mean(dim=-1)  # (B, N_pred)
        scored = mask.gather(1, rebuild)  # (B, N_pred): True where hidden
        return (err * scored).sum() / scored.sum().clamp(min=1), pred

    def flops_per_clip(self, n_visible, n_pred, training=True):
        """Matmul FLOPs of a clip: n_visible encoder tokens, n_pred decoder queries; x3 to train."""
        f = self.encoder.flops(n_visible) + 2 * n_visible * self.encoder_to_decoder.weight.numel()
        f += blocks_flops(self.decoder.blocks, n_visible + n_pred, queries=n_pred)
        f += 2 * n_pred * self.decoder.head.weight.numel()
        return 3 * f if training else f


# ---------------------------------------------------------------------- fine-tuning: the classifier

class VideoViT(Encoder):
    """Fine-tuning model: the encoder over all tokens, mean pooling, fc_norm and a linear head."""

    def __init__(self, num_classes=400, img_size=224, num_frames=16, patch_size=PATCH_SIZE,
                 tubelet_size=TUBELET_SIZE, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.0, head_drop_rate=0.0, init_scale=0.001):
        super().__init__(img_size, num_frames, patch_size, tubelet_size, in_chans, embed_dim, depth,
                         num_heads, mlp_ratio, drop_path_rate, final_norm=False)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        init_weights(self, lambda w: nn.init.trunc_normal_(w, std=0.02))  # the reference's
        with torch.no_grad():  # a small head: early gradients do not wreck a pre-trained encoder
            self.head.weight.mul_(init_scale)
            self.head.bias.mul_(init_scale)

    def forward(self, video):
        return self.head(self.head_drop(self.fc_norm(self.features(video))))  # (B, num_classes)


def build_model(kind, preset, **kwargs):
    """VideoMAE ('pretrain') or VideoViT ('finetune') of a preset, any constructor argument set."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model '{preset}'; choose one of {', '.join(PRESETS)}")
    if kind == "pretrain":
        return VideoMAE(**{**PRESETS[preset], **kwargs})
    sizes = {k: v for k, v in PRESETS[preset].items() if not k.startswith("decoder_")}
    return VideoViT(**{**sizes, **kwargs})


# ---------------------------------------------- the optimizer's groups: decay, layer-wise lr (BEiT)

def param_groups(model, weight_decay, layer_decay=None):
    """AdamW groups: decay only on matrices (dim >= 2; not biases, norms, mask_token); with
    layer_decay, lr scale layer_decay^(L+1-k): k = 0 for the patch embedding, i+1 for block i, L+1
    for fc_norm and head."""
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and name != "mask_token"
        layer = 0 if name.startswith("patch_embed") else depth + 1  # fc_norm, head: after the blocks
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        new = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        groups.setdefault((decay, scale), new)["params"].append(p)
    return list(groups.values())
