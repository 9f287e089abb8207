"""Tests: masks, model numerics, checkpoint formats, data, and the scripts end to end on generated videos."""
import functools
import json
import math
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import mask as M
import model as MD
import weights as W
import plots
import evaluate

TINY = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=48, depth=2, num_heads=3,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
GRID = (2, 4, 4)  # tokens of a TINY clip


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MD.VideoMAE(**{**TINY, **kw})


def mask_counts(grid, ratio, kind="tube", decoder_ratio=0.5):
    """Tokens hidden per clip by the encoder's and the decoder's masks, as pretrain.py gives them to the model."""
    return dict(num_hidden=M.hidden_per_clip(kind, grid, ratio),
                num_not_rebuilt=M.hidden_per_clip("run_cell", grid, decoder_ratio))


def tiny_vit(num_classes=5, **kw):
    torch.manual_seed(0)
    sizes = {k: v for k, v in TINY.items() if not k.startswith("decoder_")}
    return MD.VideoViT(num_classes=num_classes, **{**sizes, **kw})


# -------------------------------------------------------------------------------------------- masks

def test_tube_mask_hides_the_same_positions_in_every_slice():
    m = M.tube_mask(64, (8, 14, 14), 0.9, generator=torch.Generator().manual_seed(1))
    assert m.shape == (64, 1568) and m.dtype == torch.bool
    assert (m.sum(1) == 8 * int(0.9 * 196)).all()  # 160 visible of 1568
    slices = m.view(64, 8, 196)
    assert (slices == slices[:, :1]).all()
    assert len({tuple(row.tolist()) for row in slices[:, 0]}) == 64  # each clip draws its own tubes
    again = M.tube_mask(64, (8, 14, 14), 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(m, again)


def test_random_mask_counts_and_is_not_a_tube():
    m = M.random_mask(16, (8, 14, 14), 0.75, generator=torch.Generator().manual_seed(0))
    assert (m.sum(1) == int(0.75 * 1568)).all()
    slices = m.view(16, 8, 196)
    assert not (slices == slices[:, :1]).all()
    assert len({tuple(row) for row in m.tolist()}) == 16  # each clip draws its own


def test_running_cell_mask_matches_the_rolled_cell():
    t, h, w, ratio = 4, 4, 6, 0.5
    m = M.running_cell_mask(200, (t, h, w), ratio, generator=torch.Generator().manual_seed(0)).view(200, t, h, w)
    hidden = int(4 * ratio)
    queue = [1] * hidden + [0] * (4 - hidden)
    expected = []
    for start in range(4):  # V2: at slice i the cell pointer is start+i+1; cell[j] = queue[(j + ptr) % 4]
        maps = [torch.tensor([queue[(j + start + i + 1) % 4] for j in range(4)]).view(2, 2).repeat(h // 2, w // 2)
                for i in range(t)]
        expected.append(torch.stack(maps).bool())
    seen = set()
    for clip in m:
        matches = [s for s in range(4) if torch.equal(clip, expected[s])]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}  # every start is drawn
    assert (m.float().mean(1) == ratio).all()  # each token rebuilt in half of the slices
    with pytest.raises(ValueError, match="even"):
        M.running_cell_mask(1, (2, 3, 4), 0.5)


def test_every_mask_hides_a_count_known_in_advance_and_split_tokens_selects_as_a_boolean_mask():
    g = torch.Generator().manual_seed(0)
    for grid in [(2, 4, 4), (8, 14, 14), (3, 6, 10)]:
        for ratio in (0.25, 0.5, 0.75, 0.9):
            for kind, draw in [*M.MASKS.items(), ("run_cell", M.running_cell_mask)]:
                m = draw(5, grid, ratio, generator=g)
                n = M.hidden_per_clip(kind, grid, ratio)
                assert (m.sum(1) == n).all(), (kind, grid, ratio)
                shown, hidden = MD.split_tokens(m, n)
                assert shown.shape == (5, math.prod(grid) - n) and hidden.shape == (5, n)
                x = torch.randn(5, math.prod(grid), 3, generator=g)
                assert torch.equal(MD.gather(x, shown), x[~m].view(5, -1, 3))  # the same tokens, in token order
                assert torch.equal(MD.gather(x, hidden), x[m].view(5, -1, 3))
                assert all(torch.equal(a, b) for a, b in zip(MD.split_tokens(m), (shown, hidden)))  # counted
    with pytest.raises(ValueError, match="unknown mask kind"):
        M.hidden_per_clip("cube", (2, 4, 4), 0.5)


# ----------------------------------------------------------------------------------- model numerics

def test_sdpa_attention_equals_plain_softmax_attention():
    torch.manual_seed(0)
    attn = MD.Attention(48, 3)
    with torch.no_grad():
        attn.q_bias.normal_(), attn.v_bias.normal_()
    x = torch.randn(2, 10, 48)
    q, k, v = F.linear(x, attn.qkv.weight).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias
    heads = lambda z: z.view(2, 10, 3, 16).transpose(1, 2)
    a = (heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(16)).softmax(-1)
    plain = attn.proj((a @ heads(v)).transpose(1, 2).reshape(2, 10, 48))
    torch.testing.assert_close(attn(x), plain, atol=1e-5, rtol=1e-5)
    block = MD.Block(48, 3).eval()  # the decoder's last block: outputs for the last 4 tokens only, the same values
    torch.testing.assert_close(block(x, queries=4), block(x)[:, -4:], atol=1e-6, rtol=1e-6)


def test_attention_on_a_cpu_runs_in_fp32_under_bf16_autocast(monkeypatch):
    # torch's CPU attention backward in bf16 is 7x slower than in fp32; CPU autocast would cast q, k, v back to bf16
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v: seen.append(q.dtype) or sdpa(q, k, v))
    torch.manual_seed(0)
    attn, x = MD.Attention(48, 3), torch.randn(2, 10, 48)
    with torch.autocast("cpu", torch.bfloat16):
        out = attn(x)
    assert seen == [torch.float32] and out.dtype == torch.bfloat16  # the projection after it: bf16 again
    torch.testing.assert_close(out.float(), attn(x), atol=0.05, rtol=0.05)  # bf16's rounding of the same values


def test_the_demo_pretrains_in_bf16_on_cpus_with_bf16_instructions(tmp_path, monkeypatch):
    flags = {"avx512_bf16": True, "amx_bf16": True, "avx512f": False, "avx512_bf16x": False}
    for flag, has in flags.items():
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flag} fma\n")
        assert engine.cpu_has_bf16(tmp_path / "cpuinfo") is has, flag
    assert engine.cpu_has_bf16(tmp_path / "none") is False  # no /proc/cpuinfo (macOS, Windows): fp32
    assert pretrain.DEMO["dtype"] == ("bf16" if engine.cpu_has_bf16() else None)  # read at import
    monkeypatch.setattr(plots, "make_demo_dataset", lambda path: tmp_path)
    assert finetune.parse_args([]).dtype == "fp32"  # fine-tuning's demo: fp32 on every CPU
    for has, dtype in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setitem(pretrain.DEMO, "dtype", "bf16" if has else None)  # as at import, by engine.cpu_has_bf16()
        assert pretrain.parse_args([]).dtype == dtype and pretrain.parse_args(["--dtype", "fp16"]).dtype == "fp16"
        assert pretrain.parse_args(["--data_path", str(tmp_path), "--data_set", "list"]).dtype == "fp32"  # real data

def scratch_target(video, tubelet, patch, norm=True):
    """The reference's target, by the letter: unnormalise, cut tubelets, normalise each channel, flatten (t,h,w,c)."""
    mean = torch.tensor(MD.IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(MD.IMAGENET_STD).view(1, 3, 1, 1, 1)
    px = video * std + mean
    B, C, T, H, W = px.shape
    rows = []
    for ti in range(T // tubelet):
        for hi in range(H // patch):
            for wi in range(W // patch):
                cube = px[:, :, ti * tubelet:(ti + 1) * tubelet, hi * patch:(hi + 1) * patch,
                          wi * patch:(wi + 1) * patch]
                cube = cube.permute(0, 2, 3, 4, 1).reshape(B, -1, C)  # (B, t*h*w pixels, C)
                if norm:
                    std = cube.var(1, unbiased=True, keepdim=True).sqrt()
                    cube = (cube - cube.mean(1, keepdim=True)) / (std + 1e-6)
                rows.append(cube.reshape(B, -1))
    return torch.stack(rows, 1)  # (B, N, t*h*w*C)


@pytest.mark.parametrize("norm", [True, False])
def test_loss_is_the_reference_formula_on_hidden_tokens(norm):
    net = tiny_mae(norm_pix_loss=norm)
    video = torch.randn(3, 3, 4, 32, 32)
    m = M.tube_mask(3, GRID, 0.75, generator=torch.Generator().manual_seed(0))
    loss, pred = net(video, m)
    assert pred.shape == (3, 2 * 12, 2 * 8 * 8 * 3)
    target = scratch_target(video, 2, 8, norm)[m].view(3, -1, 384)
    torch.testing.assert_close(loss, F.mse_loss(pred, target), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(MD.unpatchify(MD.patchify(video, 2, 8), GRID, 2, 8), video)


def test_trivial_predictions_on_a_hand_made_clip():
    grid = (2, 2, 2)  # 8 tokens of one pixel and 3 channels; token k holds (3k, 3k+1, 3k+2)
    target = torch.arange(24, dtype=torch.float).view(1, 8, 3)
    hidden = torch.tensor([[True, False, False, True, True, True, True, False]])  # visible: 1, 2 and 7
    mean_visible, nearest_visible = M.trivial_predictions(target, hidden, grid)
    assert torch.equal(mean_visible, torch.tensor([[10.0, 11.0, 12.0]]).expand(1, 5, 3))  # (3+6+21)/3, ...
    # slice 0: tokens 0 and 3 are one step from 1 and from 2 (the first wins); slice 1 shows only token 7
    assert torch.equal(nearest_visible, target[:, [1, 1, 7, 7, 7]])
    empty = torch.tensor([[False, False, False, False, True, True, True, True]])  # slice 1 shows nothing
    assert torch.equal(M.trivial_predictions(target, empty, grid)[1], target[:, [0, 1, 2, 3]])


def test_loss_ignores_visible_tokens():
    net = tiny_mae()
    with torch.no_grad():
        net.encoder_to_decoder.weight.zero_()  # the decoder no longer sees the encoder: pred is fixed
    video = torch.randn(2, 3, 4, 32, 32)
    m = M.tube_mask(2, GRID, 0.75, generator=torch.Generator().manual_seed(0))
    changed = MD.patchify(video, 2, 8).clone()
    changed[~m] = torch.randn_like(changed[~m])  # new pixels in every visible tubelet
    changed = MD.unpatchify(changed, GRID, 2, 8)
    assert not torch.equal(changed, video)
    torch.testing.assert_close(net(video, m)[0], net(changed, m)[0])


def test_decode_mask_selects_the_rebuilt_tokens():
    net = tiny_mae()
    video = torch.randn(2, 3, 4, 32, 32)
    g = torch.Generator().manual_seed(0)
    m, d = M.tube_mask(2, GRID, 0.75, generator=g), M.running_cell_mask(2, GRID, 0.5, generator=g)
    loss, pred = net(video, m, d)
    assert pred.shape == (2, 16, 384)  # half of the 32 tokens are rebuilt
    target = scratch_target(video, 2, 8)[~d].view(2, 16, 384)
    scored = m[~d].view(2, 16)
    err = (pred - target).pow(2).mean(-1)
    torch.testing.assert_close(loss, err[scored].mean())


def test_tiny_model_overfits_one_clip():
    net = tiny_mae()
    video = torch.randn(1, 3, 4, 32, 32).repeat(4, 1, 1, 1, 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    m = M.tube_mask(4, GRID, 0.5, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(100):
        loss, _ = net(video, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_sizes_positions_and_errors():
    vit = tiny_vit()
    assert vit(torch.randn(2, 3, 4, 32, 32)).shape == (2, 5)
    assert vit(torch.randn(1, 3, 8, 16, 16)).shape == (1, 5)  # another grid: the fixed table is rebuilt
    assert "pos_embed" not in " ".join(vit.state_dict())
    with pytest.raises(ValueError, match="num_frames 5 is not a multiple of the tubelet size 2"):
        MD.VideoMAE(**{**TINY, "num_frames": 5})
    with pytest.raises(ValueError, match="img_size 30 is not a multiple of the patch size 8"):
        MD.VideoMAE(**{**TINY, "img_size": 30})
    with pytest.raises(ValueError, match="does not fit"):
        vit(torch.randn(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="unknown model"):
        MD.build_model("pretrain", "giant")
    table = MD.sinusoid_table(7, 6)[0]
    j = 3
    assert math.isclose(table[5, j].item(), math.cos(5 / 10000 ** (2 * (j // 2) / 6)), abs_tol=1e-6)


def test_constructor_and_mask_errors():
    with pytest.raises(ValueError, match="embed_dim 50 is not a multiple of num_heads 3"):
        MD.VideoMAE(**{**TINY, "embed_dim": 50})
    with pytest.raises(ValueError, match="decoder_embed_dim 24 is not a multiple of decoder_num_heads 5"):
        MD.VideoMAE(**{**TINY, "decoder_num_heads": 5})
    with pytest.raises(ValueError, match=r"mask of shape \(2, 31\) does not fit 2 clips of 32 tokens"):
        tiny_mae()(torch.randn(2, 3, 4, 32, 32), torch.ones(2, 31, dtype=torch.bool))


def test_patch_embedding_of_patchified_rows_is_the_conv3d_on_the_clip():
    torch.manual_seed(0)
    embed = MD.PatchEmbed(3, 48, 2, 8)
    video = torch.randn(2, 3, 4, 32, 32)
    conv = embed.proj(video).flatten(2).transpose(1, 2)  # (B, D, t, h, w) -> (B, t*h*w, D), token order t, h, w
    torch.testing.assert_close(embed(MD.patchify(video, 2, 8)), conv, atol=1e-5, rtol=1e-5)


def test_encoder_output_ignores_hidden_pixels():
    enc = randomised(tiny_mae()).encoder
    patches = MD.patchify(torch.randn(2, 3, 4, 32, 32), 2, 8)
    m = M.tube_mask(2, GRID, 0.75, generator=torch.Generator().manual_seed(0))
    changed = patches.clone()
    changed[m] = torch.randn_like(changed[m])  # new pixels in every hidden tubelet
    visible = MD.split_tokens(m)[0]  # the indices of the visible tokens, in token order
    with torch.no_grad():
        assert enc(patches, visible).shape == (2, 8, 48)
        torch.testing.assert_close(enc(patches, visible), enc(changed, visible), rtol=0, atol=0)
        assert not torch.allclose(enc(patches), enc(changed))  # the same change, seen without the mask


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    x = torch.ones(2000, 3, 4)
    dropped = MD.drop_path(x, 0.3, training=True)
    per_sample = dropped.flatten(1)
    kept = (per_sample == 1 / 0.7).all(1)
    assert ((per_sample == 0).all(1) | kept).all()  # a whole sample's branch, never part of it
    assert abs(kept.float().mean().item() - 0.7) < 0.04
    assert torch.equal(MD.drop_path(x, 0.3, training=False), x)
    vit = tiny_vit(drop_path_rate=0.2, depth=3)
    assert [b.drop_path for b in vit.blocks] == pytest.approx([0.0, 0.1, 0.2])  # rising over depth
    video = torch.randn(8, 3, 4, 32, 32)
    with torch.no_grad():
        assert not torch.equal(vit(video), vit(video))  # training: each call drops other samples' branches
        vit.eval()
        assert torch.equal(vit(video), vit(video))


def test_flops_count_matches_a_hand_count():
    net = tiny_mae()
    enc = 2 * (2 * 8 * 48 * 48 * (3 + 1 + 8) + 4 * 8 * 8 * 48) + 2 * 8 * 384 * 48
    # the decoder's one block: qkv for all 32 tokens; proj, MLP and attention rows for the 24 queries only
    dec = 2 * 32 * 24 * 24 * 3 + 2 * 24 * 24 * 24 * 9 + 4 * 24 * 32 * 24 + 2 * 8 * 48 * 24 + 2 * 24 * 24 * 384
    assert net.flops_per_clip(8, 24, training=False) == enc + dec
    assert net.flops_per_clip(8, 24) == 3 * (enc + dec)  # training: forward and twice as much backward
    assert tiny_vit().flops(32) == 2 * (2 * 32 * 48 * 48 * 12 + 4 * 32 * 32 * 48) + 2 * 32 * 384 * 48


@pytest.mark.parametrize("kind, decode", [("tube", False), ("random", False), ("tube", True), ("classifier", False)])
def test_the_pretraining_forward_and_the_classifier_compile_to_one_graph(kind, decode):
    # torch._dynamo.explain traces as torch.compile does: a boolean-mask selection (x[mask]) would split the
    # pre-training forward at every use (data-dependent shapes); fixed-count gathers keep one graph.
    torch._dynamo.reset()
    video = torch.randn(2, 3, 4, 32, 32)
    if kind == "classifier":
        explained = torch._dynamo.explain(tiny_vit())(video)
    else:
        g = torch.Generator().manual_seed(0)
        m = M.MASKS[kind](2, GRID, 0.75, generator=g)
        d = M.running_cell_mask(2, GRID, 0.5, generator=g) if decode else None
        explained = torch._dynamo.explain(tiny_mae())(video, m, d, **mask_counts(GRID, 0.75, kind))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_training_step_reads_nothing_back_from_the_device_and_builds_no_constant():
    # What a GPU would wait for, seen on the CPU as the ops torch dispatches: a value read back (.item(), int(),
    # a boolean mask's nonzero inside aten.index) or a tensor built from Python numbers (a copy from the host).
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    net, g = tiny_mae(), torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    counts = mask_counts(GRID, 0.75)
    for step in range(2):  # the first builds the per-device constants
        m, d = M.tube_mask(2, GRID, 0.75, generator=g), M.running_cell_mask(2, GRID, 0.5, generator=g)
        with Ops() as ops:
            net(data.normalize(clips), m, d, **counts)[0].backward()
    assert "gather" in ops.seen and not ops.seen & {"_local_scalar_dense", "item", "nonzero", "index", "lift_fresh"}


# ------------------------------------------------------------------------------- checkpoint formats

HF_PIECES = [("blocks.", "encoder.layer."), ("attn.proj.", "attention.output.dense."), ("norm1.", "layernorm_before."),
             ("norm2.", "layernorm_after."), ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
             ("patch_embed.proj.", "embeddings.patch_embeddings.projection.")]


def to_huggingface(sd, bias_spelling="q_bias"):
    """Our names -> HuggingFace's, written independently of the loader (qkv split into rows q, k, v)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("decoder.norm", "decoder.head", "encoder_to_decoder", "mask_token", "fc_norm.")):
            out[key] = value
            continue
        if key.startswith("head."):
            out["classifier." + key.removeprefix("head.")] = value
            continue
        if key.startswith("decoder.blocks."):
            new = "decoder.decoder_layers." + key.removeprefix("decoder.blocks.")
        else:
            new = ("videomae." + key.removeprefix("encoder.")).replace("videomae.norm.", "videomae.layernorm.")
        for ours, theirs in HF_PIECES:
            new = new.replace(ours, theirs)
        if new.endswith("attn.qkv.weight"):
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                out[new.replace("attn.qkv.weight", f"attention.attention.{name}.weight")] = part
        elif new.endswith(("attn.q_bias", "attn.v_bias")):
            which = "query" if new.endswith("q_bias") else "value"
            name = f"{which}.bias" if bias_spelling == "query.bias" else new[-6:]
            out[new[:-len("attn.q_bias")] + "attention.attention." + name] = value
        else:
            out[new] = value
    return out


def randomised(net):
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def outputs(net, video, m):
    with torch.no_grad():
        return net(video, m) if isinstance(net, MD.VideoMAE) else (net(video),)


@pytest.mark.parametrize("fmt", ["ours", "reference_pretrain", "hf_q_bias", "hf_query_bias"])
def test_pretraining_checkpoints_round_trip(fmt, tmp_path):
    src = randomised(tiny_mae())
    sd = src.state_dict()
    files = {"ours": {"model": sd, "config": {"model": "tiny"}, "epoch": 3},
             "reference_pretrain": {"model": sd, "optimizer": {}, "epoch": 3,
                                    "args": __import__("argparse").Namespace(mask_ratio=0.9, batch_size=32)},
             "hf_q_bias": to_huggingface(sd), "hf_query_bias": to_huggingface(sd, "query.bias")}
    path = tmp_path / "ckpt.pth"
    torch.save(files[fmt], path)
    dst = tiny_mae()
    dst.load_state_dict({k: torch.zeros_like(v) for k, v in dst.state_dict().items()})
    missing, unexpected = W.load_checkpoint(dst, path)
    assert missing == [] and unexpected == []
    video, m = torch.randn(2, 3, 4, 32, 32), M.tube_mask(2, GRID, 0.75)
    for a, b in zip(outputs(src, video, m), outputs(dst, video, m)):
        torch.testing.assert_close(a, b)
    # the same file fills a classifier's encoder; fc_norm and head start fresh
    vit = tiny_vit()
    missing, _ = W.load_checkpoint(vit, path)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    torch.testing.assert_close(vit.blocks[1].attn.qkv.weight, src.encoder.blocks[1].attn.qkv.weight)


@pytest.mark.parametrize("fmt", ["reference_finetuned", "hf_classifier", "ours", "safetensors"])
def test_finetuned_checkpoints_round_trip(fmt, tmp_path):
    src = randomised(tiny_vit())
    sd = src.state_dict()
    path = tmp_path / ("model.safetensors" if fmt == "safetensors" else "ckpt.pth")
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError:  # without the optional package the loader must say what to install
            path.write_bytes(b"")
            with pytest.raises(RuntimeError, match="pip install safetensors"):
                W.load_checkpoint(tiny_vit(), path)
            return
        save_file({k: v.contiguous() for k, v in to_huggingface(sd).items()}, str(path))
    else:
        torch.save({"reference_finetuned": {"module": sd, "args": __import__("argparse").Namespace(nb_classes=5)},
                    "hf_classifier": to_huggingface(sd),
                    "ours": {"model": sd, "epoch": 1}}[fmt], path)
    dst = tiny_vit()
    assert W.load_checkpoint(dst, path) == ([], [])
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src(video), dst(video))
    other = tiny_vit(num_classes=9)  # another class count: the head is dropped, the rest loads
    missing, _ = W.load_checkpoint(other, path)
    assert sorted(missing) == ["head.bias", "head.weight"]


@pytest.mark.parametrize("wrapping", ["state_dict", "module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_wrappings_and_prefixes(wrapping, tmp_path):
    src = randomised(tiny_vit())
    sd = src.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 2} if wrapping == "state_dict" else  # other trainers; DDP; torch.compile
               {"model": {wrapping + k: v for k, v in sd.items()}}, path)
    dst = tiny_vit()
    assert W.load_checkpoint(dst, path) == ([], [])
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src(video), dst(video))


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": MD.VideoMAE(**{**TINY, "embed_dim": 96}).state_dict()}, path)
    with pytest.raises(W.CheckpointError, match=r"small.pth holds a custom encoder \(96 wide, 2 blocks\), the model is "
                                                r"custom \(48 wide, 2 blocks\); no --model has that size"):
        W.load_checkpoint(tiny_mae(), path)
    torch.save({"model": MD.VideoMAE(**{**TINY, "decoder_embed_dim": 12}).state_dict()}, path)
    with pytest.raises(W.CheckpointError, match=r"small.pth: tensor 'mask_token' is \(1, 1, 12\), the model's \(1, 1"):
        W.load_checkpoint(tiny_mae(), path)
    torch.save({"model": {"resnet.conv1.weight": torch.zeros(3)}}, path)
    with pytest.raises(W.CheckpointError, match="no tensor matches"):
        W.load_checkpoint(tiny_mae(), path)


class Optimizer:
    """Any class of the user's, pickled in a checkpoint: a safe load (weights_only) refuses to run its code."""


@pytest.mark.parametrize("kind, message", [
    ("missing", "nothing.pth is not a file; give a checkpoint file"),
    ("folder", "folder is not a file; give a checkpoint file"),
    ("empty", "empty.pth is empty (0 bytes)"),
    ("text", "text.pth is no checkpoint: not written by torch.save, or cut short"),
    ("cut short", "cut.pth is no checkpoint: not written by torch.save, or cut short"),
    ("an object", "object.pth is no checkpoint: it holds a test_videomae.Optimizer object, which a safe load refuses"),
    ("no dict", "list.pth holds a list, not a checkpoint's dict"),
])
def test_files_that_are_no_checkpoint_are_named_in_one_line(kind, message, tmp_path):
    (tmp_path / "folder").mkdir()
    torch.save({"model": tiny_vit().state_dict()}, tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("epoch 3, loss 0.1\n")
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])  # a copy that did not finish
    torch.save({"model": tiny_vit().state_dict(), "optimizer": Optimizer()}, tmp_path / "object.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(W.CheckpointError) as error:
        W.load_checkpoint(tiny_vit(), tmp_path / message.split()[0])
    assert message in str(error.value) and "\n" not in str(error.value) and "weights_only" not in str(error.value)


def test_a_checkpoint_that_would_leave_the_encoder_partly_random_is_refused(tmp_path, capsys):
    # the demo's mini (6 blocks) into tiny (12): blocks 6-11 would start at random
    mini = MD.build_model("pretrain", "mini", img_size=32, num_frames=4)
    torch.save({"model": mini.state_dict(), "config": {"model": "mini"}, "epoch": 0}, tmp_path / "mini.pth")
    tiny = MD.build_model("finetune", "tiny", img_size=32, num_frames=4, num_classes=2)
    with pytest.raises(W.CheckpointError) as error:
        W.load_checkpoint(tiny, tmp_path / "mini.pth")
    assert str(error.value) == (f"{tmp_path / 'mini.pth'} holds a mini encoder (192 wide, 6 blocks), the model is "
                                f"tiny (192 wide, 12 blocks); give --model mini, or leave --model out to let the "
                                f"checkpoint choose")
    # a tensor of the encoder missing: refused, the first ones named; a fresh classifier is expected, in one line
    sd = tiny_mae().state_dict()
    del sd["encoder.blocks.1.mlp.fc2.weight"], sd["encoder.blocks.1.mlp.fc2.bias"]
    with pytest.raises(W.CheckpointError, match=r"lacks 2 tensors of the model, which would start at random "
                                                r"\(blocks.1.mlp.fc2.weight, blocks.1.mlp.fc2.bias\)"):
        W.load_checkpoint(tiny_vit(), {"model": sd})
    W.load_checkpoint(tiny_vit(), {"model": tiny_mae().state_dict()})
    line = capsys.readouterr().out.strip()
    assert line == ("loaded 28/32 tensors from state dict; pre-training decoder ignored; starting fresh as "
                    "expected: fc_norm.weight, fc_norm.bias, head.weight, head.bias")


def exported(kind, tmp_path):
    """A tiny-preset model with random weights, saved as this project's checkpoint and exported."""
    torch.manual_seed(0)
    extra = dict(num_classes=3) if kind == "finetune" else dict(norm_pix_loss=True)
    net = MD.build_model(kind, "tiny", img_size=32, num_frames=4, **extra)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    config = {"model": "tiny", "input_size": 32, "num_frames": 4, "classes": ["run", "jump", "swim"]}
    tmp_path.mkdir(exist_ok=True)
    torch.save({"model": net.state_dict(), "config": config, "epoch": 0}, tmp_path / "checkpoint.pth")
    return net.eval(), W.export_huggingface(tmp_path / "checkpoint.pth", tmp_path / "hf")


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_export_to_huggingface_round_trips_every_tensor(kind, weights_file, tmp_path, monkeypatch):
    if weights_file == "pytorch_model.bin":
        monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)  # as if not installed
    elif __import__("importlib").util.find_spec("safetensors") is None:
        pytest.skip("pip install safetensors")
    src, files = exported(kind, tmp_path)
    assert [f.split("/")[-1] for f in files] == ["config.json", weights_file]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    weights = W.read_file(files[1])
    expected = to_huggingface(src.state_dict())  # HuggingFace's layout, as written independently above
    assert sorted(weights) == sorted(expected) and all(torch.equal(weights[k], v) for k, v in expected.items())
    if kind == "finetune":
        assert config["architectures"] == ["VideoMAEForVideoClassification"] and config["use_mean_pooling"]
        assert config["id2label"] == {"0": "run", "1": "jump", "2": "swim"}
        assert W.checkpoint_config(files[1]) == {"model": "tiny", "input_size": 32, "num_frames": 4,
                                                  "classes": ["run", "jump", "swim"]}
    else:
        assert config["architectures"] == ["VideoMAEForPreTraining"] and not config["use_mean_pooling"]
    dst = __import__("copy").deepcopy(src)
    dst.load_state_dict({k: torch.zeros_like(v) for k, v in dst.state_dict().items()})
    assert W.load_checkpoint(dst, files[1]) == ([], [])
    for key, value in src.state_dict().items():
        assert torch.equal(value, dst.state_dict()[key]), key


def test_exported_models_compute_what_ours_do_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    video = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    m = M.tube_mask(2, (2, 2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    ours, _ = exported("pretrain", tmp_path / "p")
    theirs = transformers.VideoMAEForPreTraining.from_pretrained(tmp_path / "p" / "hf").eval()
    with torch.no_grad():  # transformers takes clips as (B, T, C, H, W)
        loss, pred = ours(video, m)
        out = theirs(pixel_values=video.transpose(1, 2), bool_masked_pos=m)
    torch.testing.assert_close(out.loss, loss)  # float32 rounding: rtol 1.3e-6, atol 1e-5
    torch.testing.assert_close(out.logits, pred)
    ours, _ = exported("finetune", tmp_path / "f")
    theirs = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "f" / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=video.transpose(1, 2)).logits, ours(video))
    assert theirs.config.id2label == {0: "run", 1: "jump", 2: "swim"}


# ---------------------------------------------------------------------------------- training pieces

def test_param_groups_layer_decay_and_no_decay_on_biases():
    from model import param_groups
    vit = tiny_vit()
    groups = param_groups(vit, 0.05, layer_decay=0.5)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    depth = len(vit.blocks)  # 2: patch embedding 0.5^3, block i 0.5^(2-i), head 1
    assert scale_of[id(vit.patch_embed.proj.weight)] == (0.5 ** 3, 0.05)
    assert scale_of[id(vit.blocks[0].attn.qkv.weight)] == (0.5 ** 2, 0.05)
    assert scale_of[id(vit.blocks[1].norm1.weight)] == (0.5, 0.0)
    assert scale_of[id(vit.blocks[1].attn.q_bias)] == (0.5, 0.0)
    assert scale_of[id(vit.head.weight)] == (1.0, 0.05) and scale_of[id(vit.fc_norm.bias)] == (1.0, 0.0)
    assert len(scale_of) == len(list(vit.parameters())) and depth == 2
    net = tiny_mae()
    no_decay = {id(p) for g in param_groups(net, 0.05) if g["weight_decay"] == 0 for p in g["params"]}
    assert id(net.mask_token) in no_decay and id(net.encoder.patch_embed.proj.bias) in no_decay
    assert id(net.encoder.patch_embed.proj.weight) not in no_decay


def test_lr_schedule_warmup_then_cosine():
    from types import SimpleNamespace
    from engine import lr_at
    a = SimpleNamespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert lr_at(0, a) == 0 and lr_at(1, a) == 0.5 and lr_at(2, a) == 1.0
    assert math.isclose(lr_at(6, a), 0.55) and math.isclose(lr_at(10, a), 0.1)


def test_mixup_and_cutmix_targets_sum_to_one():
    from types import SimpleNamespace
    from finetune import mix, soft_cross_entropy
    torch.manual_seed(0)
    video, labels = torch.rand(6, 3, 4, 32, 32), torch.tensor([0, 1, 2, 3, 4, 0])
    for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0), (0.0, 0.0)]:
        a = SimpleNamespace(smoothing=0.1, mixup=mixup, cutmix=cutmix, mixup_prob=1.0, mixup_switch_prob=0.5)
        for seed in range(4):
            out, target = mix(video, labels, 5, a, torch.Generator().manual_seed(seed))
            assert out.shape == video.shape and target.shape == (6, 5)
            torch.testing.assert_close(target.sum(1), torch.ones(6))
            assert (target >= 0.1 / 5 - 1e-6).all()  # smoothing leaves every class its share
            if cutmix and not mixup:  # the box is cut from the partner clip, the same in every frame
                changed = (out != video).any(dim=(0, 1, 2))
                assert ((out != video).any(dim=(0, 1)) == changed).all()
    plain, target = mix(video, labels, 5, SimpleNamespace(smoothing=0.0, mixup=0, cutmix=0, mixup_prob=1,
                                                           mixup_switch_prob=0), torch.Generator())
    logits = torch.randn(6, 5)
    torch.testing.assert_close(soft_cross_entropy(logits, target), F.cross_entropy(logits, labels))


def test_mixup_and_cutmix_mix_clips_and_targets_by_one_share():
    from types import SimpleNamespace
    from finetune import mix
    video, labels = torch.arange(1.0, 5.0).view(4, 1, 1, 1, 1).expand(4, 3, 2, 16, 16), torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0)]:
        a = SimpleNamespace(smoothing=0.0, mixup=mixup, cutmix=cutmix, mixup_prob=1.0, mixup_switch_prob=0.5)
        for seed in range(6):
            torch.manual_seed(seed)  # the Beta draw
            out, target = mix(video, labels, 4, a, torch.Generator().manual_seed(seed))
            for b in range(4):  # clip b is mixed with clip 3 - b (the batch reversed)
                own, partner = b + 1.0, 4.0 - b
                if cutmix:  # the share of pixels kept from its own clip
                    kept = (out[b] == own).float().mean().item()
                    assert ((out[b] == own) | (out[b] == partner)).all()
                else:  # every pixel lam * own + (1 - lam) * partner
                    kept = ((out[b] - partner) / (own - partner)).mean().item()
                    torch.testing.assert_close(out[b], own * kept + partner * (1 - kept) + 0 * out[b])
                assert target[b].sum().item() == pytest.approx(1)
                assert target[b, b].item() == pytest.approx(kept, abs=1e-6)
                assert target[b, 3 - b].item() == pytest.approx(1 - kept, abs=1e-6)
    a = SimpleNamespace(smoothing=0.1, mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5)
    _, target = mix(video, labels, 4, a, torch.Generator())
    torch.testing.assert_close(target, torch.full((4, 4), 0.025) + 0.9 * torch.eye(4))  # 1 - 0.1 + 0.1 / 4 on the label


def test_each_step_sets_the_schedules_lr_times_each_groups_layer_decay():
    from types import SimpleNamespace
    vit = tiny_vit()  # 2 blocks: scales 0.5^3 (patch embedding), 0.5^2, 0.5 (blocks), 1 (fc_norm, head)
    optimizer = torch.optim.AdamW(MD.param_groups(vit, 0.05, layer_decay=0.5))
    assert engine.Run.set_lr(SimpleNamespace(optimizer=optimizer), 0.08) == 0.08
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.01, 0.02, 0.04, 0.08]
    assert all(g["lr"] == 0.08 * g["lr_scale"] for g in optimizer.param_groups)


def test_each_epoch_and_process_draws_its_own_shuffle_masks_and_augmentations():
    from types import SimpleNamespace
    from torch.utils.data import DistributedSampler
    args = SimpleNamespace(seed=0, batch_size=2, num_workers=0, accum_iter=1)
    draws = {}
    for epoch, rank in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0)]:
        sampler = DistributedSampler(range(20), 2, rank, shuffle=True, seed=0)
        ctx = SimpleNamespace(rank=rank, device=torch.device("cpu"))
        g = engine.start_epoch(epoch, sampler, args, ctx)
        draw = (tuple(sampler), tuple(torch.rand(4, generator=g).tolist()), tuple(torch.rand(4).tolist()))
        assert draws.setdefault((epoch, rank), draw) == draw  # the same epoch and rank: the same draws (resume)
    assert all(len({d[k] for d in draws.values()}) == 4 for k in (1, 2))  # masks, workers' RNG: each its own
    assert draws[0, 0][0] != draws[1, 0][0] and not set(draws[0, 0][0]) & set(draws[0, 1][0])  # shuffles; shares
    ctx = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))

    class Items(torch.utils.data.Dataset):  # 7 videos of one view each; the sampler hands (index, epoch)
        views = 1

        def __len__(self):
            return 7

        def __getitem__(self, item):
            return item[0]
    args.num_sample = 1
    train, sampler = data.make_loader(Items(), args, ctx, train=True)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        orders.append(torch.cat(list(train)).tolist())
    assert len(orders[0]) == 6 and orders[0] != orders[1] and orders[0] != sorted(orders[0])  # whole batches
    test, _ = data.make_loader(Items(), args, ctx, train=False)
    assert torch.cat(list(test)).tolist() == list(range(7))  # every test video, in order


def test_merge_views_averages_each_video_once():
    from evaluate import merge_views
    # 3 videos x 2 views; rows of video 0 repeated, as a distributed sampler's padding does
    idx = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1], [0, 0], [0, 1]])
    probs = torch.tensor([[1., 0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1], [1., 0], [0, 1]])
    merged, seen = merge_views(idx, probs, 4)
    torch.testing.assert_close(merged[:3].float(), torch.tensor([[.5, .5], [1., 0], [0, 1.]]))
    assert seen.tolist() == [True, True, True, False]


class FlatViews(torch.utils.data.Dataset):
    """Test-mode items (views, label, index, substituted, truncated) of V flat views: view v of video i is
    the grey level 40 i + 10 v; labels alternate 0, 1."""

    def __init__(self, num_videos, V):
        self.samples = [(f"video{i}.avi", i % 2) for i in range(num_videos)]
        self.segments, self.crops, self.views = V, 1, V

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        i = item[0]  # (index, epoch), as data.EpochSampler hands them
        views = [torch.full((2, 8, 8, 3), 40 * i + 10 * v, dtype=torch.uint8) for v in range(self.segments)]
        return torch.stack(views), self.samples[i][1], i, 0, 0


def grey_of(clips):
    """The grey level of ImageNet-normalised flat clips (B, 3, T, H, W): (B,)."""
    return (clips[:, 0, 0, 0, 0] * MD.IMAGENET_STD[0] + MD.IMAGENET_MEAN[0]) * 255


def test_multi_view_scores_average_the_softmax_of_every_view():
    from types import SimpleNamespace
    args = SimpleNamespace(batch_size=6, num_sample=1, num_workers=0, seed=0, dtype="fp32")  # 2 videos a batch
    ctx = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    merged, seen, unreadable = evaluate.per_video(lambda clips: grey_of(clips)[:, None], FlatViews(3, 3), args, ctx)
    torch.testing.assert_close(merged[:, 0], torch.tensor([10.0, 50.0, 90.0], dtype=torch.float64), atol=1e-3, rtol=0)
    assert seen.all() and not unreadable.any()

    class Net(torch.nn.Module):  # video 0: one sure view of class 1, two less sure views of class 0
        def forward(self, clips):
            logits = {0: [0.0, 20.0], 10: [3.0, 0.0], 20: [3.0, 0.0], 40: [0.0, 1.0], 50: [0.0, 1.0], 60: [0.0, 1.0]}
            return torch.tensor([logits[round(g)] for g in grey_of(clips).tolist()])

    # softmax averaged: video 0 is class 0 (0.64); averaged logits (2, 6.7) or its first view alone say class 1
    scores, pred, labels = evaluate.predict_and_score(Net(), FlatViews(2, 3), args, ctx, want_probs=True)
    assert pred.tolist() == [0, 1] and labels.tolist() == [0, 1]
    assert scores["top1"] == 1.0 and scores["views"] == 3 and scores["num_videos"] == 2


def test_reconstruction_scores_are_the_losses_of_the_model_and_of_the_trivial_predictors(two_classes):
    from types import SimpleNamespace
    samples = data.load_samples(two_classes / "val.txt")[0]  # 5 videos: batches of 2, 2 and 1
    args = SimpleNamespace(batch_size=2, num_sample=1, num_workers=0, seed=0, dtype="fp32", num_frames=4,
                           sampling_rate=2, input_size=32, mask_type="tube", mask_ratio=0.75)
    ctx = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"), main=True)
    net = tiny_mae()  # norm_pix_loss: the yardsticks are scored in the loss's target space too
    got = evaluate.reconstruction_scores(net, samples, args, ctx)
    assert net.training
    # clip by clip: each video's centre clip, the masks drawn batch after batch from a generator seeded 0
    ds = data.VideoDataset(samples, "test", 4, 2, 32, test_num_segment=1, test_num_crop=1)
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([M.tube_mask(B, GRID, 0.75, generator=g) for B in (2, 2, 1)])
    losses = []  # (model, mean visible, nearest visible) of each clip
    net.eval()
    for i, m in enumerate(masks[:, None]):
        video = data.normalize(ds[i][0])  # (1, 3, 4, 32, 32)
        target = scratch_target(video, 2, 8, norm=True)
        hidden = target[m].view(1, -1, 384)
        mean_visible, nearest_visible = M.trivial_predictions(target, m, GRID)
        with torch.no_grad():
            losses.append([net(video, m)[0].item(), F.mse_loss(mean_visible, hidden).item(),
                           F.mse_loss(nearest_visible, hidden).item()])
    expected = np.mean(losses, axis=0)
    assert [got[k] for k in ("recon_val", "recon_val_mean_visible", "recon_val_nearest_visible")] == pytest.approx(
        expected.tolist(), rel=1e-5)
    assert min(abs(expected[a] - expected[b]) for a, b in [(0, 1), (0, 2), (1, 2)]) > 0.01  # three figures apart


def test_scores_top1_top5_and_mean_class_accuracy():
    from evaluate import score
    # 5 videos, 7 classes; each row lists the classes from the highest score down
    order = [[0, 1, 2, 3, 4, 5, 6],  # label 0 first: top-1
             [4, 5, 1, 0, 2, 3, 6],  # label 1 third: top-5 only
             [0, 1, 3, 4, 5, 2, 6],  # label 2 sixth: neither
             [3, 0, 1, 2, 4, 5, 6],  # label 3 first, but not scored
             [1, 0, 2, 3, 4, 5, 6]]  # label 0 second: top-5 only
    probs = torch.zeros(5, 7)
    for v, classes in enumerate(order):
        probs[v, classes] = torch.arange(7, 0, -1.0) / 28
    labels = torch.tensor([0, 1, 2, 3, 0])
    got = score(probs, labels, torch.tensor([True, True, True, False, True]))
    assert got["num_videos"] == 4 and got["top1"] == 1 / 4 and got["top5"] == 3 / 4
    assert got["mean_class_acc"] == pytest.approx((1 / 2 + 0 + 0) / 3)  # classes 0 (1 of 2), 1 and 2 (none)


def test_curves_png_draws_each_logged_figure_on_round_ticks(tmp_path):
    from plots import nice_ticks
    for lo, hi in [(0.0114, 0.429), (4e-5, 0.0156), (0.41, 0.41), (4.51, 4.62), (0, 29)]:
        ticks = nice_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        assert ticks[0] <= lo + 1e-12 and ticks[-1] >= hi - 1e-12 and 2 <= len(ticks) <= 7  # up to float rounding
        assert any(math.isclose(step, m * 10.0 ** k) for m in (1, 2, 5) for k in range(-8, 4))
    log = tmp_path / "log.jsonl"
    rows = [{"config": {}}] + [{"epoch": e, "loss": 1 / (e + 1), "lr": 0.01, "knn_top1": 0.2 * e} for e in range(4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"test": {"top1": 0.5}}]))
    W.RunFolder(str(tmp_path)).draw_curves()  # log.jsonl -> curves.png
    img = cv2.imread(str(tmp_path / "curves.png"))
    assert img.shape == (250, 3 * 360, 3)  # loss, lr, k-NN probe: one panel each
    curve = (img == (170, 80, 20)).all(-1)  # the curves' colour
    assert all(curve[:, k * 360:(k + 1) * 360].sum() > 50 for k in range(3))
    # each panel is the chart of its own figure, with its own title
    for k, (key, title) in enumerate([("loss", "training loss"), ("lr", "learning rate"),
                                      ("knn_top1", "k-NN probe top-1, frozen encoder")]):
        chart = plots.line_chart([(r["epoch"], r[key]) for r in rows[1:]], title, percent=key == "knn_top1")
        assert np.array_equal(img[:, k * 360:(k + 1) * 360], chart), key
    # the chart draws the values: k-NN top-1 0, 20, 40, 60% at epochs 0-3 on a 0-100% axis (rows 210 to 34,
    # epochs 0-4 at columns 62 to 342); the falling loss starts high and ends low
    knn = curve[:, 720:]
    for epoch in range(4):
        rows_at = np.nonzero(knn[:, 62 + 70 * epoch])[0]
        assert abs(rows_at.mean() - (210 - 176 * 0.2 * epoch)) <= 2, (epoch, rows_at)
    loss_rows = [np.nonzero(curve[:, col])[0].mean() for col in (62, 62 + 70 * 3)]
    assert loss_rows[0] < loss_rows[1] - 100
    # the title states the last value: charts that differ in their first value only share the title's band
    title_band = [plots.line_chart(points, "loss")[:27] for points in ([(0, 9), (1, 2)], [(0, 5), (1, 2)],
                                                                       [(0, 9), (1, 3)])]
    assert np.array_equal(title_band[0], title_band[1]) and not np.array_equal(title_band[0], title_band[2])


def test_efficiency_study_summarises_its_runs(tmp_path, capsys):
    # Fine-tuning logs as the README's study leaves them: two starts x two label counts x two seeds,
    # one run from a numbered checkpoint, one unfinished; the pre-training log with its k-NN probe.
    study = tmp_path / "study"

    def run(name, finetune, per_class, seed, top1):
        rows = [{"config": {"finetune": finetune, "per_class": per_class, "seed": seed}}, {"epoch": 0}]
        rows += [{"test": {"top1": top1}}] if top1 is not None else []
        (study / name).mkdir(parents=True)
        (study / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    top1 = {("none", 10): [0.5, 0.7], ("pre/checkpoint-latest.pth", 10): [0.9, 1.0],
            ("none", 2): [0.2, 0.2], ("pre/checkpoint-latest.pth", 2): [0.4, 0.6]}
    for (init, n), values in top1.items():
        for seed, value in enumerate(values):
            run(f"{n}-{seed}-{init[:4]}", init, n, seed, value)
    run("epoch-49", "pre/checkpoint-0049.pth", 10, 0, 0.8)
    run("unfinished", "none", 5, 0, None)
    (tmp_path / "pre").mkdir()
    knn = [{"config": {}}, {"epoch": 49, "knn_top1": 0.3}, {"epoch": 99, "knn_top1": 0.4}]
    (tmp_path / "pre" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in knn))
    plots.efficiency(study, tmp_path / "pre")
    out = capsys.readouterr().out
    assert "| 10 | 50.0% / 70.0% | 60.0% | 90.0% / 100.0% | 95.0% |" in out  # scratch, then VideoMAE
    assert "| 2 | 20.0% / 20.0% | 20.0% | 40.0% / 60.0% | 50.0% |" in out
    assert "| 5 |" not in out  # the unfinished run
    assert "| 50 | 30.0% | 80.0% |" in out and "| 100 | 40.0% | - |" in out  # checkpoint-0049: 50 epochs
    img = cv2.imread(str(study / "efficiency.png"))
    assert img.shape == (250, 2 * 360, 3)
    for colour in plots.SERIES_COLOURS[:2]:  # each start's line in the first panel, the probe's in the second
        assert (img[:, :360] == colour).all(-1).sum() > 50
    assert (img[:, 360:] == plots.SERIES_COLOURS[0]).all(-1).sum() > 50


def test_confusion_png_prints_each_share_in_its_cell():
    from evaluate import confusion_png
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        # true 0 0 1 1 2 2 -> predicted 0 0 1 2 2 2: rows share 1, 0.5/0.5, 1
        confusion_png(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 0, 1, 1, 2, 2]), ["a", "b", "c"], f"{d}/c.png")
        img = cv2.imread(f"{d}/c.png")
        full, half = ((img == colour).all(-1).sum() for colour in [(255, 105, 40), (255, 180, 147)])
        assert 2 * 50 ** 2 < full < 2 * 64 ** 2 and 2 * 50 ** 2 < half < 2 * 64 ** 2  # two cells each, 64 px
        labels = torch.arange(101).repeat_interleave(3)
        confusion_png(labels.roll(1), labels, [f"class name {c}" for c in range(101)], f"{d}/c101.png")
        img = cv2.imread(f"{d}/c101.png")
        assert 101 * 18 < img.shape[0] < 2200 and 101 * 18 < img.shape[1] < 2600  # 18-pixel cells for UCF101


def test_confusion_png_prints_each_cells_share_where_its_classes_are_named(monkeypatch, tmp_path):
    # true 0 0 0 0 1 1 1 1 1 2 2 -> predicted 0 0 0 2 0 1 1 1 1 2 2: counts [[3, 0, 1], [1, 4, 0], [0, 0, 2]]
    labels, pred = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 2, 0, 1, 1, 1, 1, 2, 2])
    drawn = []
    monkeypatch.setattr(plots, "confusion", lambda *a: drawn.append(a) or np.zeros((4, 4, 3), np.uint8))
    evaluate.confusion_png(pred, labels, ["ant", "bumblebee", "cat"], str(tmp_path / "c.png"), listed=1)
    share, counts, names, pairs = drawn[0]
    assert counts.tolist() == [[3, 0, 1], [1, 4, 0], [0, 0, 2]]  # row: true class, column: predicted
    np.testing.assert_allclose(share, [[0.75, 0, 0.25], [0.2, 0.8, 0], [0, 0, 1]])  # of each true class's videos
    assert [tuple(map(int, tp)) for tp in pairs] == [(0, 2)]  # the most confused first (25% > 20%), `listed` of them
    monkeypatch.undo()
    names = ["ant", "bumblebee", "cat"]
    pairs = [(0, 2), (1, 0)]
    cells, title, lines = plots.confusion_text(share, counts, names, pairs)
    assert cells == {(0, 0): "75", (0, 2): "25", (1, 0): "20", (1, 1): "80", (2, 2): "100"}
    assert title == "confusion on 11 test videos, top-1 81.8%"
    assert lines == [" 25%  ant -> cat (1 of 4)", " 20%  bumblebee -> ant (1 of 5)"]
    img = plots.confusion(share, counts, names, pairs)
    centre = {}  # each cell's middle, found by its colour (every share here has its own)
    for (t, p) in cells:
        ys, xs = np.nonzero((img == np.array(plots._cell_colour(share[t, p])).astype(np.uint8)).all(-1))
        assert len(ys) > 0.8 * 64 ** 2  # a whole cell (3 classes: 64 pixels a side) but its number
        centre[t, p] = (np.median(ys), np.median(xs))
    y = {t: centre[t, p][0] for t, p in centre}
    x = {p: centre[t, p][1] for t, p in centre}
    assert all(abs(centre[t, p][0] - y[t]) <= 2 and abs(centre[t, p][1] - x[p]) <= 2 for t, p in centre)
    assert 60 < y[1] - y[0] < 68 and 60 < y[2] - y[1] < 68  # true classes down, a cell apart
    assert 60 < x[1] - x[0] < 68 and 60 < x[2] - x[1] < 68  # predicted classes across
    rows = {t: (y[t] - 32, y[t] + 32) for t in y}
    columns = {p: (x[p] - 32, x[p] + 32) for p in x}
    # the first class renamed: only its row's name, its column's name and the pairs that name it change
    renamed = plots.confusion(share, counts, ["elk"] + names[1:], pairs)
    ys, xs = np.nonzero((renamed != img).any(-1))
    left, top, right = columns[0][0], rows[0][0], columns[2][1]
    beside, above = xs < left, (ys < top) & (xs >= left) & (xs <= right)
    assert beside.any() and above.any()
    assert (ys[beside] >= rows[0][0] - 1).all() and (ys[beside] <= rows[0][1] + 1).all()
    assert (xs[above] >= columns[0][0] - 1).all() and (xs[above] <= columns[0][1] + 1).all()


# --------------------------------------------------------------------------------------------- data


def frames_of(n, size=(64, 48), seed=0):
    """BGR frames that all differ: a noise texture panning smoothly, and the frame number."""
    rng = np.random.default_rng(seed)
    W, H = size
    tex = cv2.GaussianBlur(rng.integers(0, 256, (H + 64, W + 128, 3)).astype(np.uint8), (0, 0), 2)
    for t in range(n):
        frame = np.ascontiguousarray(tex[t % 64:t % 64 + H, t % 128:t % 128 + W])
        cv2.putText(frame, str(t), (2, H - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
        yield frame


def write_video(path, n=120, size=(64, 48), fourcc='XVID', seed=0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, size)
    assert writer.isOpened(), fourcc
    for frame in frames_of(n, size, seed):
        writer.write(frame)
    writer.release()
    return str(path)


def sequential(path):
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return np.stack(frames)[..., ::-1]  # RGB
        frames.append(frame)


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp('videos')
    return {'avi': write_video(d / 'a.avi', 150), 'mp4': write_video(d / 'b.mp4', 150, fourcc='mp4v'),
            'mjpg': write_video(d / 'c.avi', 80, fourcc='MJPG'), 'short': write_video(d / 'short.avi', 20)}


def test_h264_with_b_frames_is_exact(tmp_path):
    # H.264 with B-frames (decode order differs from display order), as most downloaded datasets are; OpenCV's
    # pip build cannot write it, PyAV can.
    import av
    path = str(tmp_path / 'h264.mp4')
    with av.open(path, 'w') as container:
        stream = container.add_stream('libx264', rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
        stream.options = {'x264-params': 'b-adapt=0:bframes=3:keyint=12'}
        for frame in frames_of(100):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='bgr24')))
        container.mux(stream.encode())
    with av.open(path) as container:  # older PyAV names the picture type 'B', newer ones give its number, 3
        types = [str(getattr(f.pict_type, 'name', f.pict_type)) for f in container.decode(video=0)]
    assert types.count('B') + types.count('3') >= 20, types
    ref = sequential(path)
    assert len(ref) == data.video_length(path) == 100
    cases = [[99, 3, 50, 50, 40, 98], sorted([33, 47, 61, 62, 75, 88, 99]), [95, 96, 97, 98, 99], [99, 99, 0],
             [70, 35, 70, 35], list(range(data.SEEK_MIN, 100, 5))] + [[s] for s in range(data.SEEK_MIN, 100)]
    for idx in cases:  # a single index from SEEK_MIN on lands on every I, P and B frame after a seek
        assert np.array_equal(data.read_frames(path, idx), ref[idx]), idx
    assert path not in data._SEEK_UNSAFE  # every seek landed on its frame: none fell back to decoding from 0


@pytest.mark.parametrize('kind', ['avi', 'mp4', 'mjpg'])
def test_read_frames_exact(videos, kind):
    path = videos[kind]
    ref = sequential(path)
    n = len(ref)
    assert data.video_length(path) == n
    rng = np.random.default_rng(0)
    cases = [[0], [n - 1], [n - 1, 0, n - 1], list(range(n - 5, n)), list(range(30, 40)), [33, 33, 7, 90 % n, 7],
             sorted(rng.integers(0, n, 12)), list(rng.integers(0, n, 12))]
    for idx in cases + [[s + 4 * k for k in range(16) if s + 4 * k < n] for s in range(0, n - 60, 13)]:
        got = data.read_frames(path, idx)
        assert got.dtype == np.uint8 and got.shape == (len(idx), 48, 64, 3)
        assert np.array_equal(got, ref[idx]), (kind, idx)


def test_seek_and_sequential_paths_agree(videos, monkeypatch):
    idx = [40, 41, 100, 149]
    seeked = data.read_frames(videos['avi'], idx)
    monkeypatch.setattr(data, 'SEEK_MIN', 10 ** 9)
    assert np.array_equal(seeked, data.read_frames(videos['avi'], idx))
    assert videos['avi'] not in data._SEEK_UNSAFE


def test_truncated_file_repeats_last_real_frame(videos, tmp_path):
    raw = open(videos['avi'], 'rb').read()
    path = tmp_path / 'cut.avi'
    path.write_bytes(raw[:len(raw) // 2])
    real = sequential(path)
    assert 0 < len(real) < data.video_length(path) == 150  # the container claims more than decodes
    idx = [0, len(real) - 1, len(real), 149, 120, 5]
    got = data.read_frames(path, idx)
    assert np.array_equal(got, real[np.minimum(idx, len(real) - 1)])
    assert np.array_equal(data.read_frames(path, [149, 120]), real[[-1, -1]])  # a seek past the real end


class FixedDraw:
    """An rng whose integers() returns one value: pins the random start or end of a clip."""

    def __init__(self, value):
        self.value = value

    def integers(self, *args, **kwargs):
        return self.value


def reference_indices(n, mode, T, r, S=2, start=0, view=0):
    """The reference's frame indices, written out step by step from its loaders (kinetics.py, ssv2.py)."""
    if mode == 'pretrain':  # VideoMAE dataset: 1-based offset, advanced by r while offset + r < n
        out, offset = [], start + 1
        for _ in range(T):
            out.append(offset - 1)
            if offset + r < n:
                offset += r
        return out
    if mode == 'train':  # a video of at most T*r frames: n // r points evenly over [0, n], then n, clipped
        points = list(np.linspace(0, n, n // r)) + [n] * (T - n // r)
        return [min(int(p), n - 1) for p in points]
    if mode == 'test':  # every r-th frame, the last repeated up to T; clip `view` of S starts at int(view * step)
        every = list(range(0, n, r))
        every += [every[-1]] * (T - len(every))
        step = max((len(every) - T) / (S - 1), 0)
        return every[int(view * step):int(view * step) + T]
    tick = n / T  # segment test: both offsets' frames sorted together, then every second one
    both = sorted([int(tick / 2 + tick * t) for t in range(T)] + [int(tick * t) for t in range(T)])
    return both[view::2]


def test_clip_indices_follow_the_reference():
    for T, r in [(16, 4), (16, 2), (4, 3), (8, 1)]:
        for n in range(1, 160):
            for start in sorted({0, max(n - T * r, 0) // 2, max(n - T * r, 0)}):
                (c,) = data.clip_indices(n, 'pretrain', T, r, 'i3d', FixedDraw(start))
                assert c.tolist() == reference_indices(n, 'pretrain', T, r, start=start), (n, T, r, start)
            if n <= T * r:
                (c,) = data.clip_indices(n, 'train', T, r, 'i3d', np.random.default_rng(0))
                assert c.tolist() == reference_indices(n, 'train', T, r), (n, T, r)
            for S in (2, 3, 5):
                test = data.clip_indices(n, 'test', T, r, 'i3d', test_num_segment=S)
                assert [c.tolist() for c in test] == [reference_indices(n, 'test', T, r, S, view=v) for v in range(S)]
            test = data.clip_indices(n, 'test', T, r, 'segment', test_num_segment=2)
            assert [c.tolist() for c in test] == [reference_indices(n, 'segment', T, r, view=v) for v in (0, 1)]
    # values from the rules by hand: a 40-frame video, 16 frames at stride 4
    assert data.clip_indices(40, 'pretrain', 16, 4, 'i3d', FixedDraw(0))[0].tolist() == [0, 4, 8, 12, 16, 20, 24, 28,
                                                                                      32, 36, 36, 36, 36, 36, 36, 36]
    assert data.clip_indices(40, 'train', 16, 4, 'i3d', FixedDraw(0))[0].tolist() == [0, 4, 8, 13, 17, 22, 26, 31,
                                                                                   35, 39, 39, 39, 39, 39, 39, 39]
    assert [c[0] for c in data.clip_indices(300, 'test', 16, 4, 'i3d', test_num_segment=5)] == [0, 56, 116, 176, 236]
    seg = data.clip_indices(320, 'test', 16, 4, 'segment', test_num_segment=2)  # offsets 0 and 1/2 of a segment
    assert seg[0].tolist() == list(range(0, 320, 20)) and seg[1].tolist() == list(range(10, 320, 20))
    (c,) = data.clip_indices(330, 'train', 16, 4, 'segment', FixedDraw(3))  # segments of 330 // 16 = 20 frames
    assert c.tolist() == list(range(3, 320, 20))
    assert data.clip_indices(10, 'train', 16, 4, 'segment', FixedDraw(3))[0].tolist() == [0] * 16  # shorter than T


def test_clip_indices():
    rng = np.random.default_rng(0)
    T, r = 16, 4
    offsets = set()
    for _ in range(50):
        (c,) = data.clip_indices(300, 'pretrain', T, r, 'i3d', rng)
        assert c[0] <= 300 - 64 and np.all(np.diff(c) == 4)
        (c,) = data.clip_indices(300, 'train', T, r, 'i3d', rng)
        assert len(c) == T and np.all(np.diff(c) >= 4) and np.all(np.diff(c) <= 5) and 60 <= c[-1] - c[0] <= 64
        (c,) = data.clip_indices(300, 'train', T, r, 'segment', rng)
        assert np.array_equal(c // (300 // T), np.arange(T))
        offsets.add(len(set((c % (300 // T)).tolist())))
    assert max(offsets) > 8  # ssv2.py: a frame drawn in each segment on its own
    for end in (64, 150, 299):  # kinetics.py, a video longer than T*r: T frames of linspace(end - T*r, end), clipped
        (c,) = data.clip_indices(300, 'train', T, r, 'i3d', FixedDraw(end))
        assert c.tolist() == [min(int(end - 64 + 64 * k / 15), end - 1) for k in range(16)], end
    test = data.clip_indices(300, 'test', T, r, 'i3d', test_num_segment=5)
    assert test[-1][-1] == 296 and all(np.all(np.diff(c) == 4) for c in test)
    assert [c[0] for c in data.clip_indices(300, 'test', T, r, 'i3d', test_num_segment=1)] == [116]  # the middle
    assert data.clip_indices(10, 'test', T, r, 'segment', test_num_segment=1)[0].max() == 9
    for mode in ('pretrain', 'train', 'test'):
        for c in data.clip_indices(5, mode, T, r, 'i3d', rng) + data.clip_indices(5, mode, T, r, 'segment', rng):
            assert len(c) == T and c.min() >= 0 and c.max() <= 4


def test_crop_boxes():
    rng = np.random.default_rng(0)
    for _ in range(100):
        x, y, w, h = data.multiscale_crop_box(240, 320, 224, rng)
        assert w in (240, 210, 180, 158) and h in (240, 210, 180, 158) and x + w <= 320 and y + h <= 240
        assert data.multiscale_crop_box(226, 300, 224, rng)[2:] in [
            (224, 224), (224, 197), (197, 224), (197, 197), (197, 169), (169, 197), (169, 169), (169, 149), (149, 169),
            (149, 149)]
        x, y, w, h = data.resized_crop_box(240, 320, rng)
        assert x + w <= 320 and y + h <= 240 and 0.08 * 240 * 320 * 0.9 <= w * h and 0.7 <= w / h <= 1.4
    assert data.eval_crop_boxes(240, 320, 3) == [(0, 0, 240, 240), (40, 0, 240, 240), (80, 0, 240, 240)]
    assert data.eval_crop_boxes(320, 240, 1) == [(0, 40, 240, 240)]


@pytest.mark.parametrize('mode,V', [('pretrain', 2), ('train', 2), ('test', 6)])
def test_dataset_outputs(videos, mode, V, monkeypatch):
    torch.manual_seed(0)  # items draw their randomness from torch's RNG
    render, areas, flips = data._render, set(), set()

    def spy(frames, indices, box, size, flip, out, area=False):
        areas.add(area)
        flips.add(flip)
        return render(frames, indices, box, size, flip, out, area=area)

    monkeypatch.setattr(data, "_render", spy)
    samples = [(videos['avi'], 3), (videos['mp4'], 1), (videos['short'], 0)]
    augment = functools.partial(finetune.augment_clip, aa=finetune.parse_aa('rand-m7-n4-mstd0.5-inc1'), reprob=0.25)
    ds = data.VideoDataset(samples, mode, num_frames=8, sampling_rate=2, input_size=32, num_sample=2,
                           augment=augment, test_num_segment=2, test_num_crop=3)
    for i in range(3):
        clips, label, index, substituted, truncated = ds[i]
        assert clips.shape == (V, 8, 32, 32, 3) and clips.dtype == torch.uint8
        assert (label, index, substituted, truncated) == (samples[i][1], i, 0, 0)
        assert 20 < clips.float().mean() < 235 and clips.max() > 100
    if mode != 'test':
        assert not torch.equal(clips[0], clips[1])  # repeated sampling: different clips from one decode
    # pre-training crops average when they shrink, the others sample; only training crops flip (at random)
    assert areas == {mode == 'pretrain'} and flips == ({False, True} if mode == 'train' else {False})


def test_test_mode_views_are_exact_crops(videos):
    ds = data.VideoDataset([(videos['avi'], 0)], 'test', num_frames=4, sampling_rate=3, input_size=48,
                           test_num_segment=2, test_num_crop=3)
    clips = ds[0][0].numpy()
    ref = sequential(videos['avi'])
    for v, (seg, x) in enumerate([(s, x) for s in range(2) for x in (0, 8, 16)]):
        start = [0, 138][seg]  # every third frame, 50 of them: clips start at 0 and 3 * (50 - 4)
        assert np.array_equal(clips[v], ref[start:start + 10:3, :, x:x + 48])  # 48x48 crop, no resize needed


def test_augmentations():
    rng = np.random.default_rng(0)
    clip = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    same = np.repeat(clip[:1], 4, 0)
    for op in finetune.RAND_OPS:  # every op keeps shape and dtype and treats every frame alike
        for sign, inc in [(1, True), (-1, True), (1, False)]:
            out = finetune.augment_op(same.copy(), op, 0.9, sign, inc)
            assert out.shape == same.shape and out.dtype == np.uint8
            assert all(np.array_equal(out[0], f) for f in out), op
    out = finetune.rand_augment(same.copy(), rng, 9, 4, 0.5)
    assert out.shape == same.shape and all(np.array_equal(out[0], f) for f in out)
    erased = finetune.random_erase(np.zeros((4, 32, 32, 3), np.uint8), rng)
    mask = erased.any(-1)
    assert mask.any() and all(np.array_equal(mask[0], m) for m in mask)  # cube=True: one box on every frame
    assert not mask.all(0).all() and not np.array_equal(erased[0], erased[1])  # smaller than the frame; own noise
    view = np.zeros((4, 32, 32, 3), np.uint8)
    finetune.augment_clip(view, rng, None, reprob=1.0)
    assert view.any()
    with pytest.raises(ValueError, match="rand-m7-n4-mstd0.5-inc1"):
        finetune.parse_aa("rand-7")


def test_rand_augment_is_the_references():
    # rand_augment.py: the -inc1 list (_RAND_INCREASING_TRANSFORMS), in its order: 15 ops, Invert and SolarizeAdd in
    assert finetune.RAND_OPS == ('autocontrast', 'equalize', 'invert', 'rotate', 'posterize', 'solarize',
                                 'solarize_add', 'color', 'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y',
                                 'translate_x', 'translate_y')
    assert finetune.parse_aa("rand-m7-n4-mstd0.5-inc1") == (7.0, 4, 0.5, True) and finetune.parse_aa("none") is None
    assert finetune.parse_aa("rand-m9-n2") == (9.0, 2, 0.0, False)
    x = np.arange(256)
    ramp = np.repeat(x.astype(np.uint8).reshape(1, 16, 16, 1), 3, -1)  # every grey level once

    def op(name, mag, sign=1, inc=True):
        return finetune.augment_op(ramp.copy(), name, mag, sign, inc).reshape(256, 3)[:, 0].astype(int)

    assert (op("invert", 0.7) == 255 - x).all()
    assert (op("solarize_add", 0.7) == np.where(x < 128, np.minimum(x + 77, 255), x)).all()  # add int(110 * 0.7)
    assert (op("solarize", 0.25) == np.where(x < 192, x, 255 - x)).all()  # -inc1: threshold 256 - int(256 * 0.25)
    assert (op("solarize", 0.25, inc=False) == np.where(x < 64, x, 255 - x)).all()
    assert (op("posterize", 0.25) == x & 0b11100000).all()  # -inc1: keep 4 - int(4 * 0.25) = 3 bits
    assert (op("posterize", 0.25, inc=False) == x & 0b10000000).all()  # keep int(4 * 0.25) = 1 bit
    assert np.abs(op("brightness", 0.25, inc=False) - x * 0.55).max() <= 1  # factor 0.1 + 1.8 * 0.25
    assert np.abs(op("brightness", 0.25, sign=-1) - x * 0.775).max() <= 1  # -inc1: factor 1 - 0.9 * 0.25
    # geometric ops: bicubic (a step edge shifted half a pixel overshoots; bilinear would not) and a grey border
    step = np.zeros((1, 8, 32, 3), np.uint8)
    step[:, :, 16:] = 200
    shifted = finetune.augment_op(step, "translate_x", 0.5 / (0.45 * 32))  # half a pixel
    assert shifted.max() > 200 and shifted.min() == 0
    rotated = finetune.augment_op(np.full((1, 32, 32, 3), 7, np.uint8), "rotate", 1.0)
    assert (rotated[0, 0, 0] == 128).all() and (rotated[0, 16, 16] == 7).all()


def ramp_clip():
    """Two 32x32 frames of linear ramps, 3x + 2y + 40 + 10c in channel c, the second frame 9 levels
    brighter: bicubic interpolation reproduces a linear ramp, so a warp's output is the ramp at the
    source point."""
    y, x = np.mgrid[0:32, 0:32]
    frame = 3 * x + 2 * y + 40
    return np.stack([np.stack([frame + 10 * c + 9 * t for c in range(3)], -1) for t in range(2)]).astype(np.uint8)


def pil_source(op, mag, sign, W=32, H=32):
    """Where PIL's transform (timm's ops) reads each output pixel: the affine data (a, b, c, d, e, f)
    of Image.transform, or of Image.rotate (counter-clockwise about the centre), applied at pixel
    centres (x + 0.5, y + 0.5) and read back in pixel indices."""
    s, t = sign * 0.3 * mag, sign * 0.45 * mag
    if op == "rotate":
        angle = -math.radians(sign * 30 * mag)
        a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
        cx, cy = W / 2, H / 2
        c, f = cx - a * cx - b * cy, cy - d * cx - e * cy
    else:
        a, b, c, d, e, f = {"shear_x": (1, s, 0, 0, 1, 0), "shear_y": (1, 0, 0, s, 1, 0),
                            "translate_x": (1, 0, t * W, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, t * H)}[op]
    y, x = np.mgrid[0:H, 0:W] + 0.5
    return a * x + b * y + c - 0.5, d * x + e * y + f - 0.5


@pytest.mark.parametrize("op", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_geometric_ops_move_pixels_where_pils_do(op):
    # The expected value of each output pixel is the ramp at PIL's source point (pixels whose source lies
    # 2 pixels inside the frame: bicubic reads 4x4). OpenCV shears about pixel corners, PIL about pixel
    # centres: half a pixel times the shear, at most 0.45 grey levels here.
    clip = ramp_clip()
    for sign in (1, -1):
        out = finetune.augment_op(clip.copy(), op, 0.8, sign).astype(float)
        sx, sy = pil_source(op, 0.8, sign)
        inside = (sx >= 2) & (sx <= 29) & (sy >= 2) & (sy <= 29)
        assert inside.sum() > 300 and (~inside).sum() > 100  # every op at 0.8 moves pixels out of the frame
        for t in range(2):
            for c in range(3):
                expected = 3 * sx + 2 * sy + 40 + 10 * c + 9 * t
                assert np.abs(out[t, ..., c] - expected)[inside].max() <= 1.5, (op, sign, t, c)
        far = (sx < -3) | (sx > 34) | (sy < -3) | (sy > 34)  # well outside: timm's grey fill
        assert far.any() and (out[:, far] == 128).all(), (op, sign)


def colour_clip():
    """Two frames of coloured noise, the second brighter: per-frame and per-clip statistics differ, and so
    do the channels."""
    rng = np.random.default_rng(3)
    first = rng.integers(30, 120, (24, 24, 3)) * np.array([1.0, 0.6, 0.3])
    second = rng.integers(90, 250, (24, 24, 3)) * np.array([0.5, 1.0, 0.8])
    return np.stack([first, second]).astype(np.uint8)


@pytest.mark.parametrize("op", ["color", "contrast", "brightness", "sharpness"])
def test_enhance_ops_blend_with_pils_degenerate_image(op):
    # PIL's ImageEnhance: factor * image + (1 - factor) * degenerate; factor 1 +- 0.9 mag (-inc1) or
    # 0.1 + 1.8 mag. The degenerate image: each pixel's grey (color), the whole clip's mean grey (contrast),
    # black (brightness), the 3x3 SMOOTH filter of each frame (sharpness; PIL leaves its border, so the
    # border is compared below on flat frames only).
    clip = colour_clip()
    x = clip.astype(float)
    grey = x @ [0.299, 0.587, 0.114]  # ITU-R 601, PIL's "L"
    if op == "color":
        degenerate = np.repeat(grey[..., None], 3, -1)
    elif op == "contrast":
        degenerate = np.full_like(x, int(grey.mean() + 0.5))
    elif op == "brightness":
        degenerate = np.zeros_like(x)
    else:
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        window = sum(padded[:, 1 + dy:25 + dy, 1 + dx:25 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        degenerate = (window + 4 * x) / 13  # weights 1, centre 5
    inner = (slice(None), slice(1, -1), slice(1, -1))
    for mag, sign, inc, factor in [(0.5, 1, True, 1.45), (0.5, -1, True, 0.55), (0.25, 1, False, 0.55)]:
        out = finetune.augment_op(clip.copy(), op, mag, sign, inc).astype(float)
        expected = np.clip(factor * x + (1 - factor) * degenerate, 0, 255)
        assert np.abs(out - expected)[inner].max() <= 1.01, (op, sign, inc)
    flat = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (20, 200)])  # two flat frames
    if op == "sharpness":  # smoothing each frame alone leaves a flat frame flat, its border too
        assert np.array_equal(finetune.augment_op(flat.copy(), op, 0.5), flat)


def pil_equalize(channel):
    """PIL's ImageOps.equalize lookup table for one channel's values, written out as PIL does (Image.point
    clips the table to 0..255)."""
    h = np.bincount(channel.ravel(), minlength=256)
    used = h[h > 0]
    step = (used.sum() - used[-1]) // 255
    if len(used) <= 1 or step == 0:
        return np.arange(256)
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += h[i]
    return np.array(lut)


def test_histogram_ops_map_every_frame_by_the_clips_statistics():
    # autocontrast stretches each channel's [min, max] over the clip to [0, 255] (PIL truncates), equalize
    # flattens each channel's histogram over the clip; every frame gets the same mapping.
    clip = colour_clip()
    out = finetune.augment_op(clip.copy(), "autocontrast", 0.5)
    for c in range(3):
        lo, hi = int(clip[..., c].min()), int(clip[..., c].max())
        expected = np.floor((clip[..., c].astype(float) - lo) * 255 / (hi - lo))
        assert np.abs(out[..., c] - expected).max() <= 1 and out[..., c].min() == 0 and out[..., c].max() == 255
        assert (clip[0, ..., c].min(), clip[0, ..., c].max()) != (lo, hi)  # the first frame's range is another
    out = finetune.augment_op(clip.copy(), "equalize", 0.5)
    for c in range(3):
        assert np.array_equal(out[..., c], pil_equalize(clip[..., c])[clip[..., c]]), c
        assert not np.array_equal(pil_equalize(clip[..., c]), pil_equalize(clip[:1, ..., c]))


def test_rand_augment_draws_ops_magnitudes_and_signs_as_timm(monkeypatch):
    # timm's RandAugment: num_ops ops drawn uniformly with replacement, each applied with probability 0.5 at a
    # magnitude ~ N(m, mstd) clipped to [0, 10], divided by 10, with a random sign; -inc1 passed on.
    calls = []
    monkeypatch.setattr(finetune, "augment_op",
                        lambda clip, op, mag, sign=1, inc=True: calls.append((op, mag, sign, inc)) or clip)
    rng, clip = np.random.default_rng(0), np.zeros((1, 4, 4, 3), np.uint8)
    for _ in range(1000):
        finetune.rand_augment(clip, rng, 7, 4, 0.5, True)
    assert abs(len(calls) / 4000 - 0.5) < 0.03  # 4 ops a clip, each with p 0.5
    counts = __import__("collections").Counter(op for op, *_ in calls)
    assert set(counts) == set(finetune.RAND_OPS) and max(counts.values()) < 2 * min(counts.values())
    mags = np.array([mag for _, mag, _, _ in calls])
    assert abs(mags.mean() - 0.7) < 0.006 and abs(mags.std() - 0.05) < 0.006
    signs = np.array([sign for _, _, sign, _ in calls])
    assert set(signs.tolist()) == {1, -1} and abs((signs == 1).mean() - 0.5) < 0.05
    assert {inc for *_, inc in calls} == {True}
    calls.clear()
    for _ in range(300):
        finetune.rand_augment(clip, rng, 10, 2, 5.0, False)
    mags = np.array([mag for _, mag, _, _ in calls])
    assert mags.min() >= 0 and mags.max() == 1.0 and 0.35 < (mags == 1.0).mean() < 0.65  # clipped at 10
    assert {inc for *_, inc in calls} == {False}
    erased = []
    monkeypatch.setattr(finetune, "random_erase", lambda clip, rng: erased.append(1))
    for _ in range(1000):
        finetune.augment_clip(clip, rng, None, reprob=0.25)
    assert abs(len(erased) / 1000 - 0.25) < 0.04


def test_random_erase():
    clip = np.zeros((4, 32, 32, 3), np.uint8)
    for seed in range(20):
        erased = finetune.random_erase(clip.copy(), np.random.default_rng(seed)).any(-1)
        if not erased.any():  # a box as wide or tall as the frame is dropped
            continue
        assert all(np.array_equal(erased[0], m) for m in erased)  # one box on every frame
        ys, xs = np.nonzero(erased[0])
        area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert 0.02 * 32 * 32 * 0.8 <= area <= 32 * 32 / 3 * 1.2 and erased[0].sum() >= 0.9 * area


def test_normalize():
    clips = torch.randint(0, 256, (2, 3, 4, 5, 3), dtype=torch.uint8)
    out = data.normalize(clips)
    assert data.IMAGENET_MEAN is MD.IMAGENET_MEAN and data.IMAGENET_STD is MD.IMAGENET_STD  # one definition
    ref = (clips.numpy() / 255.0 - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 3, 4, 5)
    assert np.allclose(out.numpy(), ref.transpose(0, 4, 1, 2, 3), atol=1e-5)


def make_tree(root, classes, n=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(n):
            write_video(root / c / f'v_{c}_g0{k}_c01.avi', 4, (32, 24))


def make_ucf101(root, classes):
    """UCF-101/<Class>/ videos and ucfTrainTestlist/ beside, as distributed (CRLF lines, 1-based labels); split 1."""
    make_tree(root / 'UCF-101', classes)
    sd = root / 'ucfTrainTestlist'
    sd.mkdir()
    (sd / 'classInd.txt').write_bytes(b''.join(f'{k + 1} {c}\r\n'.encode() for k, c in enumerate(classes)))
    (sd / 'trainlist01.txt').write_bytes(b''.join(f'{c}/v_{c}_g00_c01.avi {k + 1}\r\n'.encode()
                                                  for k, c in enumerate(classes)))
    (sd / 'testlist01.txt').write_bytes(b''.join(f'{c}/v_{c}_g01_c01.avi\r\n'.encode() for c in classes[::-1]))
    return root / 'UCF-101', sd


def test_ucf101_layout(tmp_path):
    classes = ['ApplyEyeMakeup', 'Basketball', 'YoYo']
    _, sd = make_ucf101(tmp_path, classes)
    for data_set in ('UCF101', None):
        train, names = data.load_samples(tmp_path / 'UCF-101', data_set, 1, True)
        assert names == classes and [s[1] for s in train] == [0, 1, 2]
        test, _ = data.load_samples(tmp_path / 'UCF-101', data_set, 1, False)
        assert [s[1] for s in test] == [2, 1, 0] and test[0][0].endswith('YoYo/v_YoYo_g01_c01.avi')
    (sd / 'testlist01.txt').write_bytes(b'YoYo/v_YoYo_g01_c01.avi\r\nYoYo/v_YoYo_g09_c01.avi\r\n')
    with pytest.raises(data.DataError, match=r'testlist01.txt:2: .*g09'):
        data.load_samples(tmp_path / 'UCF-101', 'UCF101', 1, False)


def test_hmdb51_layout(tmp_path):
    classes = ['brush_hair', 'cartwheel', 'sit', 'situp']
    root = tmp_path / 'hmdb51_org'
    make_tree(root, classes, 3)
    sd = root / 'testTrainMulti_7030_splits'  # inside the root this time
    sd.mkdir()
    for c in classes[::-1]:
        for split in (1, 2, 3):
            tags = [1, 2, 0] if split == 1 else [2, 1, 1]
            (sd / f'{c}_test_split{split}.txt').write_text(
                ''.join(f'v_{c}_g0{k}_c01.avi {t} \n' for k, t in enumerate(tags)))
    train, names = data.load_samples(root, None, 1, True)
    assert names == classes and [s[1] for s in train] == [0, 1, 2, 3]
    assert all(s[0].endswith('_g00_c01.avi') for s in train)
    test, _ = data.load_samples(root, 'HMDB51', 2, False)
    assert len(test) == 4 and all(s[0].endswith('_g00_c01.avi') for s in test)
    assert len(data.load_samples(root, 'HMDB51', 3, True)[0]) == 8
    (root / 'sit' / 'v_sit_g02_c01.avi').unlink()
    with pytest.raises(data.DataError, match=r'sit_test_split2.txt:3'):
        data.load_samples(root, 'HMDB51', 2, True)


def test_list_and_folder(tmp_path):
    make_tree(tmp_path / 'tree', ['b_walk', 'a_run'])
    samples, names = data.load_samples(tmp_path / 'tree')
    assert names == ['a_run', 'b_walk'] and [s[1] for s in samples] == [0, 0, 1, 1]
    lst = tmp_path / 'my list.txt'
    lst.write_text(f'tree/a_run/v_a_run_g00_c01.avi 1\n\n{tmp_path}/tree/b_walk/v_b_walk_g01_c01.avi 0\n')
    samples, names = data.load_samples(lst)
    assert samples == [(str(tmp_path / 'tree/a_run/v_a_run_g00_c01.avi'), 1),
                       (str(tmp_path / 'tree/b_walk/v_b_walk_g01_c01.avi'), 0)] and names == ['b_walk', 'a_run']
    lst.write_text('tree/a_run/v_a_run_g00_c01.avi\n')  # pre-training list without labels
    assert data.load_samples(lst, 'list')[0][0][1] == -1
    lst.write_text('tree/a_run/v_a_run_g00_c01.avi 0\ntree/a_run/missing.avi 0\n')
    with pytest.raises(data.DataError, match=r'my list.txt:2: .*missing.avi'):
        data.load_samples(lst)
    write_video(tmp_path / 'tree' / 'loose.avi', 4, (32, 24))  # a plain folder of videos: unlabelled
    samples, names = data.load_samples(tmp_path / 'tree', 'folder')
    assert len(samples) == 5 and names == [] and {s[1] for s in samples} == {-1}
    with pytest.raises(ValueError, match='data_set'):
        data.load_samples(tmp_path / 'tree', 'kinetics')


def test_bad_files_are_substituted_and_reported_by_the_items(videos, tmp_path):
    raw = open(videos['avi'], 'rb').read()
    (tmp_path / 'zero.avi').write_bytes(b'')
    (tmp_path / 'noise.avi').write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    (tmp_path / 'header.avi').write_bytes(raw[:600])
    (tmp_path / 'cut.avi').write_bytes(raw[:len(raw) // 4])
    bad = [str(tmp_path / n) for n in ('zero.avi', 'noise.avi', 'header.avi', 'nonexistent.avi')]
    for path in bad:
        with pytest.raises(data.VideoReadError, match=path.split('/')[-1]):
            data.read_frames(path, [0])
    decodable = len(sequential(tmp_path / 'cut.avi'))
    assert 0 < decodable < 50 and data.video_length(tmp_path / 'cut.avi') == 150
    samples = [(bad[0], 1), (bad[1], 2), (videos['mp4'], 5), (str(tmp_path / 'cut.avi'), 4)]
    ds = data.VideoDataset(samples, 'test', num_frames=4, input_size=32, test_num_segment=2, test_num_crop=1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing is printed or warned here: the training loop names the files
        clips, label, index, substituted, truncated = ds[0]
        assert (label, index, substituted, truncated) == (5, 0, 2, 0) and clips.shape == (2, 4, 32, 32, 3)
        assert ds.bad == set(bad[:2]) and ds[1][1:] == (5, 1, 1, 0)  # known bad files are skipped
        assert ds[3][1:] == (4, 3, 0, decodable)  # the test clips reach past the real end: the count is told
    ds = data.VideoDataset([(bad[0], 0)] * 10, 'pretrain')  # one bad file, listed 10 times
    with pytest.raises(data.VideoReadError, match='none of the 10 videos'):
        ds[0]


def vfr_video(path, n=100):
    """H.264 whose frame rate halves in the middle (timestamps 40 ms apart, then 80): OpenCV's seek misses."""
    import av
    from fractions import Fraction
    with av.open(str(path), 'w') as container:
        stream = container.add_stream('libx264', rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, 'yuv420p'
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {'x264-params': 'keyint=12'}
        for k, frame in enumerate(frames_of(n)):
            picture = av.VideoFrame.from_ndarray(frame, format='bgr24')
            picture.pts, picture.time_base = 40 * min(k, n // 2) + 80 * max(k - n // 2, 0), Fraction(1, 1000)
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return str(path)


def test_check_cli(videos, tmp_path, capsys, monkeypatch):
    lst = tmp_path / 'list.txt'
    (tmp_path / 'zero.avi').write_bytes(b'')
    vfr = vfr_video(tmp_path / 'vfr.mp4')
    lst.write_text(f"{videos['avi']} 0\n{videos['short']} 1\n{tmp_path / 'zero.avi'} 1\n{vfr} 0\n")
    monkeypatch.setattr('sys.argv', ['data.py', '--check', str(lst)])
    with pytest.raises(SystemExit) as e:
        data.main()
    out = capsys.readouterr().out
    assert e.value.code == 1 and 'UNREADABLE' in out and 'zero.avi' in out
    assert 'SHORT' in out and 'short.avi' in out and 'a.avi' not in out
    assert [line.split()[:2] for line in out.splitlines() if line.startswith('SEEK')] == [['SEEK', f'{vfr}:']]
    assert 'all: 4 videos; 0 2, 1 2' in out and '4 files: 1 unreadable, 2 other findings' in out
    assert np.array_equal(data.read_frames(vfr, [70])[0], sequential(vfr)[70])  # exact all the same, but slow


def test_demo_dataset(tmp_path):
    kw = dict(num_classes=3, videos_per_class=4, val_per_class=2, num_frames=12, seed=3)
    a = plots.make_demo_dataset(tmp_path / 'a' / 'demo', **kw)
    b = plots.make_demo_dataset(tmp_path / 'b' / 'demo', **kw)
    assert sorted(p.name for p in (tmp_path / 'a').iterdir()) == ['demo']  # no temporary folder left
    train, names = data.load_samples(a, 'demo', train=True)
    val, _ = data.load_samples(a / 'val.txt')
    assert names == ['right', 'left', 'grow'] and len(train) == len(val) == 6
    assert [s[1] for s in train].count(0) == [s[1] for s in train].count(2) == 2
    for (pa, la), (pb, lb) in zip(train + val, data.load_samples(b, 'list')[0] + data.load_samples(b / 'val.txt')[0]):
        fa, fb = sequential(pa), sequential(pb)
        assert la == lb and fa.shape == (12, 72, 96, 3) and np.array_equal(fa, fb)
    stamp = (a / 'meta.json').stat().st_mtime_ns
    assert plots.make_demo_dataset(a, **kw) == a and (a / 'meta.json').stat().st_mtime_ns == stamp  # reused
    c = plots.make_demo_dataset(tmp_path / 'c', **dict(kw, seed=4))
    assert not np.array_equal(sequential(c / 'right/right_000.avi'), sequential(a / 'right/right_000.avi'))
    for other in (b, tmp_path):  # a set with other parameters, a folder that is no demo set: left alone
        with pytest.raises(FileExistsError, match='not this demo set'):
            plots.make_demo_dataset(other, **dict(kw, seed=4))
    assert json.loads((b / 'meta.json').read_text())['seed'] == 3


def test_demo_dataset_concurrent_builds(tmp_path, monkeypatch):
    # Ranks of a distributed run build one root at the same moment. Held at the rename until both are there,
    # both find the root still missing: one rename wins, the other fails on its folder and keeps it.
    kw = dict(num_classes=2, videos_per_class=3, val_per_class=1, num_frames=6, seed=5)
    at_rename, replace, outcomes = threading.Barrier(2, timeout=60), data.os.replace, []

    def replace_together(*args):
        at_rename.wait()
        try:
            replace(*args)
            outcomes.append('renamed')
        except OSError:
            outcomes.append('refused')
            raise

    monkeypatch.setattr(data.os, 'replace', replace_together)
    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: plots.make_demo_dataset(tmp_path / 'demo', **kw), range(2)))
    assert roots == [tmp_path / 'demo'] * 2 and sorted(outcomes) == ['refused', 'renamed']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['demo']  # no temporary folder left
    assert sorted(p.name for p in roots[0].iterdir()) == ['left', 'meta.json', 'right', 'train.txt', 'val.txt']
    train, names = data.load_samples(roots[0], 'demo')
    assert names == ['right', 'left'] and len(train) == 4 and all(len(sequential(p)) == 6 for p, _ in train)


def test_demo_classes_change_the_object_the_same_way_in_every_video(tmp_path):
    root = plots.make_demo_dataset(tmp_path / 'demo', videos_per_class=4, val_per_class=0, num_frames=12, seed=0)
    samples, names = data.load_samples(root, 'demo')
    assert names == list(plots.DEMO_CLASSES) and len(samples) == 24
    for path, label in samples:
        frames = data.read_frames(path, [0, 11]).astype(np.float32)
        ground = frames[0, 0, 0]  # a corner: the object never reaches it
        inside = [np.abs(f - ground).sum(-1) > 30 for f in frames]
        x = [np.nonzero(m)[1].mean() for m in inside]
        area = [m.sum() for m in inside]
        level = [f[m].mean() for f, m in zip(frames, inside)]
        changed = {'right': x[1] > x[0] + 2, 'left': x[1] < x[0] - 2, 'grow': area[1] > 1.1 * area[0],
                   'shrink': area[1] < 0.9 * area[0], 'brighten': level[1] > level[0] + 10,
                   'darken': level[1] < level[0] - 10}
        assert changed[names[label]], (path, x, area, level)


def test_demo_classes_are_learnable_from_the_loaders_clips(tmp_path):
    # A ViT of two blocks, trained from scratch on clips of the demo's loader, tells held-out videos apart.
    root = plots.make_demo_dataset(tmp_path / 'demo', videos_per_class=20, val_per_class=6, num_frames=32, seed=0)
    sets = [data.load_samples(root, 'demo', train=train)[0] for train in (True, False)]
    train = data.VideoDataset(sets[0], 'pretrain', 4, 4, 32, num_sample=8, in_memory=True)
    test = data.VideoDataset(sets[1], 'test', 4, 4, 32, test_num_segment=1, test_num_crop=1)
    torch.manual_seed(0)
    clips = [(train[i][0], train[i][1]) for _ in range(4) for i in range(len(train))]
    x = data.normalize(torch.cat([c for c, _ in clips]))  # (2688, 3, 4, 32, 32)
    y = torch.tensor([label for _, label in clips]).repeat_interleave(8)
    net = tiny_vit(num_classes=6)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for step in range(200):
        batch = torch.randint(len(x), (32,))
        loss = F.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(data.normalize(torch.cat([test[i][0] for i in range(len(test))]))).argmax(1)
    accuracy = (pred == torch.tensor([label for _, label in sets[1]])).float().mean().item()
    assert accuracy > 0.75, accuracy  # chance: 1/6


# -------------------------------------------------------------------------- the scripts, end to end

import pretrain  # noqa: E402
import engine  # noqa: E402
import finetune  # noqa: E402

SIZES = ["--model", "tiny", "--input_size", "32", "--num_frames", "4", "--sampling_rate", "2"]
SMALL_RUN = SIZES + ["--batch_size", "2", "--accum_iter", "1", "--num_workers", "0", "--warmup_epochs", "1",
                     "--save_ckpt_freq", "1", "--device", "cpu"]  # accum 1: not the recipe's videos per step
COLOURS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)]  # BGR


def clip_video(path, bright, seed, n=24, size=(48, 40), colour=(1, 1, 1)):
    """A small textured clip; `bright` sets its overall level in the `colour` channels (classes any model separates)."""
    rng = np.random.default_rng(seed)
    W, H = size
    tex = cv2.GaussianBlur(rng.integers(0, 256, (H, W + n, 3)).astype(np.uint8), (0, 0), 1.5)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), 25, size)
    for t in range(n):
        frame = tex[:, t:t + W] // 3 + (np.array(colour) * (150 if bright else 20) + 20 * (1 - np.array(colour)))
        writer.write(np.ascontiguousarray(frame.astype(np.uint8)))
    writer.release()


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    """dark/ and bright/ videos with train.txt (4 per class) and val.txt (3 per class, an odd total)."""
    root = tmp_path_factory.mktemp("two_classes")
    lines = {"train.txt": [], "val.txt": []}
    for label, name in enumerate(["dark", "bright"]):
        (root / name).mkdir()
        for k in range(7):
            clip_video(root / name / f"{k}.avi", label, seed=10 * label + k)
            lines["train.txt" if k < 4 else "val.txt"].append(f"{name}/{k}.avi {label}\n")
    lines["val.txt"].pop()  # 5 test videos: a distributed sampler over 2 processes must pad one
    for name, rows in lines.items():
        (root / name).write_text("".join(rows))
    return root


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory):
    """Six colours, 2 training and 1 test video each: top-5 of 6 classes is not 1 by construction."""
    root = tmp_path_factory.mktemp("six_classes")
    lines = {"train.txt": [], "val.txt": []}
    for label, colour in enumerate(COLOURS):
        for k in range(3):
            clip_video(root / f"{label}_{k}.avi", True, seed=100 + 10 * label + k, colour=colour)
            lines["train.txt" if k < 2 else "val.txt"].append(f"{label}_{k}.avi {label}\n")
    for name, rows in lines.items():
        (root / name).write_text("".join(rows))
    return root


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


@pytest.mark.parametrize("script, argv, message", [
    (pretrain, ["--num_frames", "15"], "--num_frames 15 is not a multiple of the tubelet size 2"),
    (pretrain, ["--input_size", "100"], "--input_size 100 is not a multiple of the patch size 16"),
    (pretrain, ["--mask_ratio", "1.2"], "argument --mask_ratio: 1.2 is out of range: it must be above 0 and below 1"),
    (pretrain, ["--batch_size", "0"], "argument --batch_size: 0 is out of range: it must be at least 1"),
    (pretrain, ["--num_frames", "0"], "argument --num_frames: 0 is out of range: it must be at least 1"),
    (pretrain, ["--blr", "-0.001"], "argument --blr/--lr: -0.001 is out of range: it must be above 0"),
    (pretrain, ["--opt_betas", "0.9", "1.5"], "argument --opt_betas: 1.5 is out of range: it must be at least 0 and "
                                              "below 1"),
    (pretrain, ["--seed", "-1"], "argument --seed: -1 is out of range: it must be at least 0"),
    (pretrain, ["--num_workers", "two"], "argument --num_workers: invalid int value: 'two'"),
    (pretrain, ["--device", "gpu"], "argument --device: 'gpu' is no device: give cpu, cuda or cuda:N"),
    (finetune, ["--drop_path", "1"], "argument --drop_path: 1 is out of range: it must be at least 0 and below 1"),
    (finetune, ["--crop_scale", "0.5", "0.1"], "--crop_scale 0.5 0.1: min above max"),
    (finetune, ["--test_num_segment", "0"], "argument --test_num_segment: 0 is out of range: it must be at least 1"),
    (finetune, ["--nb_classes", "0"], "argument --nb_classes: 0 is out of range: it must be at least 1"),
    (pretrain, ["--output_dir", "{two_classes}/train.txt"], "--output_dir {two_classes}/train.txt: {two_classes}/"
                                                            "train.txt is a file; choose another folder"),
    (finetune, ["--output_dir", "{two_classes}/val.txt/run"], "--output_dir {two_classes}/val.txt/run: "
                                                              "{two_classes}/val.txt is a file; choose another folder"),
])
def test_bad_flags_are_refused_where_they_are_parsed(script, argv, message, capsys, two_classes):
    argv = [a.format(two_classes=two_classes) for a in argv]
    with pytest.raises(SystemExit) as stop:
        script.main(["--data_path", str(two_classes)] + argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.splitlines()[-1].endswith(message.format(two_classes=two_classes)), err


def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path, two_classes, capsys, monkeypatch):
    monkeypatch.setattr(W.os, "access", lambda path, mode: path != tmp_path)  # (chmod binds no root user)
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--data_path", str(two_classes), "--output_dir", str(tmp_path / "runs" / "a")])
    assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(
        f"--output_dir {tmp_path}/runs/a: {tmp_path} is not writable; choose another folder")


def test_pretrain_end_to_end_and_resume_matches_an_uninterrupted_run(tmp_path, two_classes):
    out = tmp_path / "a"
    argv = ["--data_path", str(two_classes), "--data_set", "list", *SMALL_RUN, "--epochs", "4", "--blr", "0.05",
            "--mask_ratio", "0.75", "--output_dir"]
    pretrain.main(argv + [str(out)])
    log = read_log(out)
    assert "config" in log[0] and [r["epoch"] for r in log[1:]] == [0, 1, 2, 3]
    for key in ("loss", "lr", "clips_per_s", "data_wait", "peak_mem_mb", "substituted"):
        assert all(key in r for r in log[1:])
    assert all(math.isfinite(r["loss"]) for r in log[1:]) and log[-1]["loss"] < log[1]["loss"]
    # the lr of each step (the log keeps an epoch's last, step 3 of 4): warmup over epoch 0, then the cosine
    lr, min_lr = 0.05 * 2 / 256, 1e-5 * 2 / 256
    expected = [lr * 0.75] + [min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (e - 0.25) / 3)) / 2 for e in (1, 2, 3)]
    assert [r["lr"] for r in log[1:]] == pytest.approx(expected, rel=1e-9)
    final = torch.load(out / "checkpoint-latest.pth", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in final] == pytest.approx([expected[-1]] * len(final), rel=1e-9)  # AdamW's own
    for r in log[1:]:  # every epoch is numbered here (--save_ckpt_freq 1): held-out figures on the 5 val.txt videos
        assert 0 < r["recon_val"] and 0 < r["recon_val_mean_visible"] and 0 < r["recon_val_nearest_visible"]
        assert r["knn_top1"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert (out / "recon-0003.png").exists() and cv2.imread(str(out / "recon-0003.png")) is not None
    assert cv2.imread(str(out / "curves.png")).shape == (250, 3 * 360, 3)  # loss, lr, k-NN top-1
    # a run stopped after epoch 1: its newest checkpoint is the numbered one of epoch 1
    resumed = tmp_path / "b"
    resumed.mkdir()
    (resumed / "checkpoint-latest.pth").write_bytes((out / "checkpoint-0001.pth").read_bytes())
    pretrain.main(argv + [str(resumed)])
    assert [r["epoch"] for r in read_log(resumed) if "epoch" in r] == [2, 3]
    assert read_log(resumed)[-1]["loss"] == log[-1]["loss"]
    a, b = (torch.load(d / "checkpoint-latest.pth", weights_only=True) for d in (out, resumed))
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    for k, state in a["optimizer"]["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"], rtol=0, atol=0)


def test_pretrain_decoder_mask_random_mask_repeated_sampling_and_nonfinite_stop(tmp_path, two_classes, monkeypatch,
                                                                                capsys):
    random_masks = []
    monkeypatch.setitem(M.MASKS, "random", lambda *a, **k: random_masks.append(a[0]) or M.random_mask(*a, **k))
    out = tmp_path / "dual"
    pretrain.main(["--data_path", str(two_classes), *SMALL_RUN, "--input_size", "64", "--epochs", "1",
                   "--decoder_mask_type", "run_cell", "--num_sample", "2", "--mask_type", "random",
                   "--no_norm_pix_loss", "--output_dir", str(out)])
    # 64 px, 4 frames: 2x4x4 = 32 tokens; mask 0.9 hides int(0.9 * 32) = 28; the running cell rebuilds half: 16
    assert "(2, 4, 4) tokens per clip, 4 visible" in capsys.readouterr().out
    log = read_log(out)[-1]
    assert log["rebuilt_per_clip"] == 16 and log["clips_per_step"] == 4  # 2 videos x 2 clips each
    # the check of the flags, the count at start, the 4 clips of every step, the 5 held-out clips of the
    # figures (test batches of at most a training batch's 4 clips), the picture's clip
    assert random_masks == [1, 1, 4, 4, 4, 4, 4, 1, 1]
    assert read_log(out)[0]["config"]["no_norm_pix_loss"] is True
    forward = MD.VideoMAE.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):  # the loss turns NaN in the second epoch
        calls["n"] += 1
        loss, pred = forward(self, *a, **k)
        return (loss * float("nan") if calls["n"] > 4 else loss), pred

    monkeypatch.setattr(MD.VideoMAE, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as stop:
        pretrain.main(["--data_path", str(two_classes), *SMALL_RUN, "--epochs", "3", "--norm_pix_loss",
                       "--output_dir", str(out)])
    assert stop.value.code == 1 and "loss is not finite at epoch 1" in capsys.readouterr().out
    assert read_log(out)[0]["config"]["no_norm_pix_loss"] is False
    assert torch.load(out / "checkpoint-latest.pth", weights_only=True)["epoch"] == 0  # the last good one


def test_finetune_learns_six_classes_resumes_with_the_checkpoints_sizes_and_eval_keeps_the_record(
        tmp_path, two_classes, six_classes, capsys, monkeypatch):
    pre = tmp_path / "pre"
    pretrain.main(["--data_path", str(two_classes), *SMALL_RUN, "--epochs", "1", "--output_dir", str(pre)])
    samplings, clip_indices = [], data.clip_indices

    def spy(n, mode, num_frames, sampling_rate, sampling, *rest):
        samplings.append(sampling)
        return clip_indices(n, mode, num_frames, sampling_rate, sampling, *rest)

    monkeypatch.setattr(data, "clip_indices", spy)
    out = tmp_path / "ft"
    recipe = ["--data_path", str(six_classes), "--mixup", "0", "--cutmix", "0", "--smoothing", "0", "--aa", "none",
              "--reprob", "0", "--drop_path", "0", "--sampling", "segment", "--blr", "0.05"]
    finetune.main(recipe + [*SMALL_RUN, "--epochs", "5", "--test_num_segment", "2", "--test_num_crop", "3",
                            "--finetune", str(pre / "checkpoint-latest.pth"), "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "starting fresh as expected: fc_norm.weight, fc_norm.bias, head.weight, head.bias" in printed
    assert set(samplings) == {"segment"}
    test = read_log(out)[-1]["test"]
    assert test["num_videos"] == 6 and test["views"] == 6 and test["unreadable"] == 0
    assert test["top1"] == 1.0 and test["mean_class_acc"] == 1.0 and test["top5"] == 1.0
    assert (out / "confusion.png").exists() and all("val_top1" in r for r in read_log(out)[1:-1])
    # AdamW's groups: layer-wise decay 0.75 (the K400 recipe) over the tiny preset's 12 blocks, scales 0.75^13
    # (patch embedding) to 1 (head); each group's lr is the schedule's times its scale
    groups = torch.load(out / "checkpoint-latest.pth", weights_only=True)["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx(sorted(0.75 ** k for k in range(14)))
    assert all(g["lr"] == pytest.approx(read_log(out)[-2]["lr"] * g["lr_scale"]) for g in groups)
    # --eval in the training run's folder: its lines are appended, the record and the picture stay as they were
    record, picture = (out / "log.jsonl").read_text(), (out / "confusion.png").read_bytes()
    ckpt = str(out / "checkpoint-latest.pth")
    finetune.main(["--data_path", str(six_classes), "--eval", "--test_num_segment", "2", "--test_num_crop", "3",
                   "--sampling", "segment", "--num_workers", "0", "--device", "cpu", "--resume", ckpt,
                   "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "from the checkpoint's config: --model tiny, --input_size 32, --num_frames 4" in printed
    assert (out / "log.jsonl").read_text().startswith(record) and read_log(out)[-1]["test"] == test
    assert (out / "confusion.png").read_bytes() == picture and (out / "confusion-eval1.png").exists()
    # --resume to train on: model size, input size, frames and stride from the checkpoint, as with --finetune
    more = tmp_path / "more"
    finetune.main(recipe + ["--resume", ckpt, "--epochs", "6", "--batch_size", "2", "--accum_iter", "1",
                            "--num_workers", "0", "--device", "cpu", "--test_num_segment", "1", "--test_num_crop", "1",
                            "--output_dir", str(more)])
    printed = capsys.readouterr().out
    assert "from the checkpoint's config: --model tiny, --input_size 32, --num_frames 4, --sampling_rate 2" in printed
    assert f"resumed from {ckpt}: epoch 5 of 6" in printed and "from scratch" not in printed
    assert [r["epoch"] for r in read_log(more) if "epoch" in r] == [5]
    assert cv2.imread(str(out / "curves.png")).shape == (250, 3 * 360, 3)  # loss, lr, validation top-1
    with pytest.raises(SystemExit) as stop:
        finetune.main(["--data_path", str(two_classes), *SMALL_RUN, "--eval"])
    assert stop.value.code == 2 and "--eval needs the weights" in capsys.readouterr().err


def test_predict_names_the_classes_and_agrees_with_the_export(tmp_path, two_classes, capsys, monkeypatch):
    pre, out = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(["--data_path", str(two_classes), *SMALL_RUN, "--epochs", "1", "--output_dir", str(pre)])
    finetune.main(["--data_path", str(two_classes), *SMALL_RUN, "--epochs", "6", "--blr", "0.02", "--mixup", "0",
                   "--cutmix", "0", "--smoothing", "0", "--aa", "none", "--reprob", "0", "--drop_path", "0",
                   "--test_num_segment", "1", "--test_num_crop", "1", "--finetune", str(pre / "checkpoint-latest.pth"),
                   "--output_dir", str(out)])
    capsys.readouterr()
    # --predict: no data set read or built; class names from the checkpoint; an unreadable video gets one line
    monkeypatch.setattr(plots, "make_demo_dataset", lambda *a, **k: pytest.fail("--predict built the demo set"))
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video")
    videos = [str(two_classes / "dark" / "4.avi"), str(broken), str(two_classes / "bright" / "4.avi")]
    views = ["--test_num_segment", "2", "--test_num_crop", "3", "--sampling_rate", "2", "--device", "cpu"]

    def predict(weights, out_dir):
        finetune.main(["--predict", *videos, *views, "--finetune", str(weights), "--output_dir", str(out_dir)])
        return [json.loads(line) for line in open(out_dir / "predictions.jsonl")], capsys.readouterr().out

    rows, printed = predict(out / "checkpoint-latest.pth", tmp_path / "predict")
    assert "broken.avi: not a readable video" in printed and printed.count("\n") < 12
    assert [r["video"] for r in rows] == videos and "error" in rows[1]
    assert [rows[0]["top5"][0][0], rows[2]["top5"][0][0]] == ["dark", "bright"]
    assert all(math.isclose(sum(p for _, p in r["top5"]), 1, rel_tol=1e-5) for r in (rows[0], rows[2]))  # 2 classes
    # the views, counted and averaged: each video's probabilities are its softmax averaged over the 2 segments x
    # 3 crops that the test cuts, here of a model whose views disagree (its head over 3 classes reads the three
    # directions in which the features of the 12 views differ most)
    cut = {video: data.VideoDataset([(video, 0)], "test", 4, 2, 32, test_num_segment=2, test_num_crop=3)._load(0)
           for video in videos[::2]}
    net = MD.build_model("finetune", "tiny", img_size=32, num_frames=4, num_classes=3).eval()
    with torch.no_grad():
        features = net.fc_norm(net.features(data.normalize(torch.from_numpy(np.concatenate(list(cut.values()))))))
        _, spread, directions = torch.linalg.svd(features - features.mean(0), full_matrices=False)
        net.head.weight.copy_(directions[:3] / spread[:3, None] * 3 * math.sqrt(len(features)))  # logits' std 3
        net.head.bias.copy_(-net.head.weight @ features.mean(0))
    config = {"model": "tiny", "input_size": 32, "num_frames": 4, "sampling_rate": 2, "classes": ["x", "y", "z"]}
    torch.save({"model": net.state_dict(), "config": config, "epoch": 0}, tmp_path / "random.pth")
    clips_seen, forward = [], MD.VideoViT.forward
    monkeypatch.setattr(MD.VideoViT, "forward", lambda net, video: clips_seen.append(len(video)) or forward(net, video))
    rows_random, _ = predict(tmp_path / "random.pth", tmp_path / "predict-random")
    monkeypatch.setattr(MD.VideoViT, "forward", forward)
    assert sum(clips_seen) == 2 * 6  # the 2 readable videos
    for row, video in zip(rows_random[::2], videos[::2]):
        with torch.no_grad():
            probs = net(data.normalize(torch.from_numpy(cut[video]))).softmax(-1)
        assert (probs - probs.mean(0)).abs().max() > 0.05  # the views disagree: no single view would do
        top = probs.mean(0).sort(descending=True)
        assert [name for name, _ in row["top5"]] == [config["classes"][c] for c in top.indices.tolist()]
        np.testing.assert_allclose([p for _, p in row["top5"]], top.values.tolist(), rtol=1e-5)
    # exported to HuggingFace's layout: the sizes and id2label come from its config.json, the predictions agree
    exported = W.export_huggingface(out / "checkpoint-latest.pth", tmp_path / "hf")[1]
    rows_hf, printed = predict(exported, tmp_path / "predict-hf")
    assert "--model tiny, --input_size 32, --num_frames 4" in printed
    for ours, theirs in zip(rows[::2], rows_hf[::2]):
        assert [n for n, _ in ours["top5"]] == [n for n, _ in theirs["top5"]]
        np.testing.assert_allclose([p for _, p in ours["top5"]], [p for _, p in theirs["top5"]], rtol=1e-5)
    with pytest.raises(SystemExit) as stop:  # a pre-training checkpoint has no head
        finetune.main(["--predict", videos[0], *views, "--finetune", str(pre / "checkpoint-latest.pth")])
    assert stop.value.code == 2 and "fine-tune it first" in capsys.readouterr().err


def test_knn_probe_separates_a_separable_set(tmp_path, two_classes, capsys):
    # cosine k-NN with similarity-weighted votes, by hand: the two nearest vote 1 (weights e^(0.9/0.07), e^(0.8/0.07))
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    votes = evaluate.knn_classify(train, torch.tensor([0, 1, 1]), torch.tensor([[0.0, 2.0]]), 3, k=2)
    sims = F.normalize(train, dim=1) @ torch.tensor([0.0, 1.0])
    torch.testing.assert_close(votes, torch.tensor([[0.0, (sims[1] / 0.07).exp() + (sims[2] / 0.07).exp(), 0.0]]))
    # dark and bright videos: the features of a pre-training of one epoch tell them apart
    pre = tmp_path / "pre"
    pretrain.main(["--data_path", str(two_classes), *SMALL_RUN, "--epochs", "1", "--output_dir", str(pre)])
    out = tmp_path / "knn"
    finetune.main(["--data_path", str(two_classes), "--knn", "--finetune", str(pre / "checkpoint-latest.pth"),
                   "--num_workers", "0", "--device", "cpu", "--output_dir", str(out)])
    knn = read_log(out)[-1]["knn"]
    assert knn == {"top1": 1.0, "top5": 1.0, "k": 8, "num_videos": 5}
    assert "k-NN (k 8) from 8 training videos to 5 test videos: top-1 100.00%" in capsys.readouterr().out
    assert knn["top1"] == read_log(pre)[-1]["knn_top1"]  # the same probe as pre-training logs
    with pytest.raises(SystemExit) as stop:
        finetune.main(["--data_path", str(two_classes), "--knn", "--finetune", "none", "--device", "cpu"])
    assert stop.value.code == 2 and "--knn reads a trained encoder" in capsys.readouterr().err


def pretraining_file(path, preset="tiny", epoch=7, **config):
    """A pre-training checkpoint in this project's format, as a run of `epoch` epochs saves it; its weights are not
    those that a run (seed 0) starts from."""
    torch.manual_seed(1)
    net = MD.build_model("pretrain", preset, img_size=32, num_frames=4)
    config = {"model": preset, "input_size": 32, "num_frames": 4, "sampling_rate": 2, **config}
    torch.save({"model": net.state_dict(), "config": config, "epoch": epoch}, path)
    return path


def refused(script, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_reconstruct_any_video_from_our_or_huggingfaces_weights(tmp_path, two_classes, capsys):
    ckpt = pretraining_file(tmp_path / "pre.pth", mask_ratio=0.75)
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video")
    videos = [str(two_classes / "dark" / "0.avi"), str(broken), str(two_classes / "bright" / "6.avi")]

    def reconstruct(weights, out, *flags):  # each video's losses: model, mean of visible, nearest visible
        pretrain.main(["--reconstruct", *videos, "--init", str(weights), "--device", "cpu", "--output_dir", str(out),
                       *flags])
        printed = capsys.readouterr().out
        return printed, [[float(x) for x in re.findall(r"\d+\.\d{4}", line)] for line in printed.splitlines()
                         if "reconstruction loss" in line]

    printed, losses = reconstruct(ckpt, tmp_path / "ours")  # no data set read; sizes and mask ratio from the file
    assert ("from the checkpoint: --model tiny, --input_size 32, --num_frames 4, --sampling_rate 2, "
            "--mask_ratio 0.75" in printed)
    assert "broken.avi: not a readable video" in printed and len(losses) == 2 and all(0 < x for x in losses[0])
    picture = cv2.imread(str(tmp_path / "ours" / "recon-0.png"))  # original / encoder input / rebuilt rows
    assert picture is not None and (tmp_path / "ours" / "recon-6.png").exists()
    # exported to HuggingFace's layout: sizes from config.json, the same weights, so the same losses
    hf = W.export_huggingface(ckpt, tmp_path / "hf")[1]
    printed, losses_hf = reconstruct(hf, tmp_path / "hf-out", "--mask_ratio", "0.75", "--sampling_rate", "2")
    assert "from the checkpoint: --model tiny, --input_size 32, --num_frames 4\n" in printed and losses_hf == losses
    # bad input: one line, exit status 2, before any video is read
    vit = tmp_path / "classifier.pth"
    torch.save({"model": MD.build_model("finetune", "tiny", num_classes=2).state_dict()}, vit)
    for argv, message in [(["--init", str(vit)], f"--init {vit} has no decoder, only an encoder"),
                          (["--init", str(tmp_path / "no.pth")], f"--init {tmp_path / 'no.pth'} is not a file"),
                          (["--init", str(broken)],
                           f"--init {broken} is no checkpoint: not written by torch.save, or cut short"),
                          (["--init", str(ckpt), "--model", "small"], "holds a 'tiny' model (encoder 192 wide, 12 "
                           "blocks; decoder 96 wide, 4 blocks), this run builds 'small' (encoder 384 wide"),
                          ([], "--reconstruct needs pre-training weights to draw with: --init PATH")]:
        code, line = refused(pretrain, ["--reconstruct", videos[0], "--device", "cpu", *argv], capsys)
        assert code == 2 and message in line, line


def test_init_starts_a_fresh_run_from_pretraining_weights(tmp_path, two_classes, capsys):
    ckpt = pretraining_file(tmp_path / "pre.pth", epoch=7)  # not a resume: epoch 0, a fresh AdamW
    out = tmp_path / "run"
    argv = ["--data_path", str(two_classes), *SMALL_RUN, "--epochs", "1", "--blr", "1e-9", "--save_ckpt_freq", "5"]
    pretrain.main(argv + ["--init", str(ckpt), "--output_dir", str(out)])
    assert f"--init: loaded 218/218 tensors, encoder and decoder, from {ckpt}" in capsys.readouterr().out
    assert ([r["epoch"] for r in read_log(out) if "epoch" in r] == [0]
            and read_log(out)[0]["config"]["init"] == str(ckpt))
    start, end = (torch.load(f, weights_only=True) for f in (ckpt, out / "checkpoint-latest.pth"))
    for k in start["model"]:  # lr ~1e-9: every tensor, the decoder's too, still the loaded one
        torch.testing.assert_close(end["model"][k], start["model"][k], rtol=0, atol=1e-6)
    assert {s["step"].item() for s in end["optimizer"]["state"].values()} == {4.0}  # this run's 4 steps only
    pretrain.main(argv + ["--init", str(ckpt), "--output_dir", str(out)])  # the same command again: a resume
    assert f"--init {ckpt} not loaded: the run resumes from its own checkpoint" in capsys.readouterr().out
    small = pretraining_file(tmp_path / "mini.pth", preset="mini")
    code, line = refused(pretrain, argv + ["--init", str(small)], capsys)
    assert code == 2 and line.endswith("this run builds 'tiny' (encoder 192 wide, 12 blocks; decoder 96 wide, 4 "
                                       "blocks): give --model mini"), line


def test_linear_probe_on_cached_features_and_features_npz(tmp_path, two_classes, capsys):
    # on its own: two classes 8 apart along one of 8 directions; that one shrunk, another one blown up, all far
    # from 0: BatchNorm standardises each (no learnt scale), with the training set's statistics at test time
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randn(64, 8, generator=gen)
    x[:, 3] += 8 * y
    x = 1000 + x * torch.tensor([1e4, 1, 1, 1e-2, 1, 1, 1, 1])
    scores = evaluate.linear_probe(x[:48], y[:48], x[48:], y[48:])
    assert scores == {"top1": 1.0, "top5": 1.0, "epochs": 90, "num_videos": 16}
    ckpt = pretraining_file(tmp_path / "pre.pth")
    lists = tmp_path / "lists"  # two_classes' lists, and a broken video among the training ones
    lists.mkdir()
    (tmp_path / "broken.avi").write_bytes(b"not a video")
    for name in ("train.txt", "val.txt"):
        rows = [f"{two_classes / line}\n" for line in (two_classes / name).read_text().splitlines()]
        broken_row = [f"{tmp_path / 'broken.avi'} 0\n"] * (name == "train.txt")
        (lists / name).write_text("".join(rows[:4] + broken_row + rows[4:]))
    out = tmp_path / "probe"
    finetune.main(["--data_path", str(lists), "--features", "--linprobe", "--finetune", str(ckpt),
                   "--num_workers", "0", "--device", "cpu", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert f"1 unreadable train videos left out: {tmp_path / 'broken.avi'}" in printed
    assert read_log(out)[-1] == {"linprobe": {"top1": 1.0, "top5": 1.0, "epochs": 90, "num_videos": 5}}
    assert f"wrote {out / 'features.npz'}: 13 videos x 192 features, train 8, test 5" in printed
    saved = np.load(out / "features.npz")  # plain arrays: no pickle
    assert saved["features"].dtype == np.float32 and saved["features"].shape == (13, 192)
    assert (list(saved["split"]) == ["train"] * 8 + ["test"] * 5
            and list(saved["labels"]) == [0] * 4 + [1] * 4 + [0] * 3 + [1] * 2)
    assert saved["paths"][0].endswith("dark/0.avi") and saved["paths"][-1].endswith("bright/5.avi")
    code, line = refused(finetune, ["--data_path", str(two_classes), "--linprobe", "--device", "cpu"], capsys)
    assert code == 2 and "--linprobe reads a trained encoder: give it with --finetune PATH" in line


def test_a_mask_ratio_that_hides_nothing_is_refused(tmp_path, two_classes, capsys):
    with pytest.raises(ValueError, match="no token to rebuild"):
        tiny_mae()(torch.randn(1, 3, 4, 32, 32), torch.zeros(1, 32, dtype=torch.bool))
    with pytest.raises(SystemExit) as stop:  # 32 px, 4 frames: 2x2x2 tokens; int(0.2 * 4) = 0 hidden per slice
        pretrain.main(["--data_path", str(two_classes), *SMALL_RUN, "--mask_ratio", "0.2", "--epochs", "1",
                       "--output_dir", str(tmp_path / "none")])
    assert stop.value.code == 2 and "--mask_ratio 0.2 hides no token of the 2x2x2 grid" in capsys.readouterr().err


def bad_input(case, root, videos):
    """The flags of a run given one kind of bad input, written under `root` (good videos from `videos`)."""
    def video_list(name, *lines):
        (root / name).write_text("".join(f"{line}\n" for line in lines))
        return ["--data_path", str(root / name)]

    def checkpoint(name, kind, preset, **extra):
        sizes = dict(num_classes=2) if kind == "finetune" else {}
        net = MD.build_model(kind, preset, img_size=32, num_frames=4, **sizes)
        torch.save({"model": net.state_dict(), **extra}, root / name)
        return str(root / name)

    good = [f"{videos}/{name}/{k}.avi" for name in ("dark", "bright") for k in range(2)]
    run = dict(optimizer={}, scaler={}, epoch=0)  # what a run's own checkpoint holds beside the weights
    if case in ("empty folder", "class folders without videos", "a broken link in a class folder"):
        for name in ("dark", "bright") if case != "empty folder" else ():
            (root / "data" / name).mkdir(parents=True)
            for k in range(2) if case != "class folders without videos" else ():
                (root / "data" / name / f"{k}.avi").symlink_to(f"{videos}/{name}/{k}.avi")
        if case == "a broken link in a class folder":
            (root / "data" / "dark" / "9.avi").symlink_to(root / "moved away.avi")
        (root / "data").mkdir(exist_ok=True)
        return ["--data_path", str(root / "data")]
    return {"no such data path": lambda: ["--data_path", str(root / "UCF-101")],
            "a missing video in a list": lambda: video_list("list.txt", *good[:3], f"{videos}/dark/9.avi 0"),
            "a label that is no number": lambda: video_list("list.txt", f"{good[0]} 0", f"{good[1]} dark"),
            "a video given as the list": lambda: ["--data_path", good[0]],
            "no split folder": lambda: ["--data_path", str(videos), "--data_set", "UCF101"],
            "fewer videos than a step": lambda: ["--data_path", str(videos), "--batch_size", "8", "--accum_iter", "2"],
            "sparse labels": lambda: video_list("list.txt", *(f"{v} {100 * (k // 2)}" for k, v in enumerate(good))),
            "no labels": lambda: video_list("list.txt", *good),
            "labels past --nb_classes": lambda: ["--data_path", str(videos), "--nb_classes", "1"],
            "no val.txt": lambda: video_list("train.txt", *(f"{v} {k // 2}" for k, v in enumerate(good)))[:1] + [
                str(root)],
            "--resume of no file": lambda: ["--data_path", str(videos), "--resume", str(root / "checkpoint-0007.pth")],
            "--resume of another size": lambda: ["--data_path", str(videos), "--resume",
                                                 checkpoint("mini.pth", "pretrain", "mini", **run)],
            "--resume of a classifier": lambda: ["--data_path", str(videos), "--resume",
                                                 checkpoint("ft.pth", "finetune", "tiny", **run)],
            "--resume of bare weights": lambda: ["--data_path", str(videos), "--resume",
                                                 checkpoint("weights.pth", "pretrain", "tiny")],
            "--eval of a pre-training checkpoint": lambda: ["--data_path", str(videos), "--eval", "--finetune",
                                                            checkpoint("pre.pth", "pretrain", "tiny")],
            "--finetune of another depth": lambda: ["--data_path", str(videos), "--finetune", checkpoint(
                "mini.pth", "pretrain", "mini", config={"model": "mini"})],
            }[case]()


@pytest.mark.parametrize("script, case, message", [
    (pretrain, "no such data path", "--data_path {root}/UCF-101 does not exist"),
    (pretrain, "empty folder", "--data_path {root}/data holds no training videos: .avi/.mp4/"),
    (finetune, "class folders without videos", "--data_path {root}/data holds no training videos"),
    (pretrain, "a broken link in a class folder", "a broken link: {root}/data/dark/9.avi does not exist (1 missing); "
                                                  "fix the list, the link or --data_path, or remove it"),
    (finetune, "a missing video in a list", "{root}/list.txt:4: {videos}/dark/9.avi does not exist (1 missing)"),
    (pretrain, "a label that is no number", "{root}/list.txt:2: label 'dark' is not a whole number; write 'video "
                                            "label', labels from 0 to the number of classes - 1"),
    (pretrain, "a video given as the list", "{videos}/dark/0.avi cannot be read as a list of 'video label' lines "
                                            "(not text)"),
    (pretrain, "no split folder", "{videos}: no ucfTrainTestlist/ inside or beside it for the split files"),
    (pretrain, "fewer videos than a step", "8 training videos make no step of 8 videos x 1 processes x 2 accum_iter "
                                           "= 16; lower --batch_size or --accum_iter, or add videos"),
    (finetune, "sparse labels", "labels of {root}/list.txt leave 99 of the classes 0..100 without a video (1, 2, 3 "
                                "and 96 more); number them 0..N-1, or give --nb_classes 101 to keep the empty ones"),
    (finetune, "no labels", "{root}/list.txt has videos without a label; give each one, in 'video label' lines or "
                            "class folders"),
    (finetune, "labels past --nb_classes", "labels of {videos} reach 1, past --nb_classes 1: raise it, or leave it "
                                           "out"),
    (finetune, "no val.txt", "{root}: no test videos (a list's are in val.txt)"),
    (pretrain, "--resume of no file", "{root}/checkpoint-0007.pth is not a file; give a checkpoint file"),
    (pretrain, "--resume of another size", "{root}/mini.pth holds a mini encoder (192 wide, 6 blocks), the model is "
                                           "tiny (192 wide, 12 blocks); give --model mini; resume it with the flags "
                                           "of its run, or start a new run in another --output_dir"),
    (pretrain, "--resume of a classifier", "{root}/ft.pth: pre-training and fine-tuning do not resume each other; "
                                           "to fine-tune pre-trained weights, give them --finetune"),
    (pretrain, "--resume of bare weights", "{root}/weights.pth holds no run's state (optimizer, epoch) to resume; "
                                           "fine-tune from its weights: finetune.py --finetune {root}/weights.pth"),
    (finetune, "--eval of a pre-training checkpoint", "{root}/pre.pth lacks 4 tensors of the model, which would "
                                                      "start at random (fc_norm.weight, fc_norm.bias, head.weight and "
                                                      "1 more); give a whole checkpoint"),
    (finetune, "--finetune of another depth", "{root}/mini.pth holds a mini encoder (192 wide, 6 blocks), the model "
                                              "is tiny (192 wide, 12 blocks); give --model mini, or leave --model out "
                                              "to let the checkpoint choose"),
])
def test_bad_input_is_one_line_before_training(script, case, message, tmp_path, two_classes, capsys):
    out = tmp_path / "run"
    argv = [*SMALL_RUN, "--epochs", "1", "--output_dir", str(out), *bad_input(case, tmp_path, two_classes)]
    with pytest.raises(SystemExit) as stop:
        script.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err and not (out / "checkpoint-latest.pth").exists()
    assert err.splitlines()[-1].startswith("error: " + message.format(root=tmp_path, videos=two_classes)), err


def test_check_names_a_broken_link_and_refuses_an_empty_folder(tmp_path, two_classes, capsys, monkeypatch):
    data_path = bad_input("a broken link in a class folder", tmp_path, two_classes)[1]
    monkeypatch.setattr("sys.argv", ["data.py", "--check", data_path, "--min_frames", "16"])
    with pytest.raises(SystemExit) as stop:
        data.main()
    out = capsys.readouterr().out.splitlines()
    assert stop.value.code == 1 and out[0].startswith(f"UNREADABLE {data_path}/dark/9.avi: not a readable video")
    assert out[1:] == ["5 files: 1 unreadable, 0 other findings", "all: 5 videos; bright 2, dark 3"]
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("sys.argv", ["data.py", "--check", str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as stop:
        data.main()
    assert stop.value.code == 2 and "empty holds no training videos" in capsys.readouterr().err


def test_ctrl_c_stops_at_once_keeps_the_newest_checkpoint_and_the_same_command_resumes(tmp_path, two_classes, capsys,
                                                                                      monkeypatch, request):
    import os
    import signal
    import time
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, even where SIGINT is ignored
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    out = tmp_path / "run"
    argv = ["--data_path", str(two_classes / "train.txt"), *SMALL_RUN, "--epochs", "2", "--output_dir", str(out)]
    forward, save, steps, runs = MD.VideoMAE.forward, torch.save, [], []

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)  # as the terminal sends it
        time.sleep(5)  # (interrupted at once)

    def step(self, *a, **k):  # the first run: Ctrl-C in the second step of epoch 1 (4 steps an epoch)
        steps.append(self.training)
        if steps.count(True) == 6 and len(runs) == 1:
            ctrl_c()
        return forward(self, *a, **k)

    def checkpoint(obj, path):  # the second run: Ctrl-C in the middle of writing epoch 1's newest checkpoint
        if "checkpoint-latest.pth" in str(path) and obj["epoch"] == 1 and len(runs) == 2:
            open(path, "wb").write(b"PK\x03\x04 half a checkpoint")
            ctrl_c()
        return save(obj, path)

    monkeypatch.setattr(MD.VideoMAE, "forward", step)
    monkeypatch.setattr(torch, "save", checkpoint)
    for attempt in range(2):
        runs.append(attempt)
        with pytest.raises(SystemExit) as stop:
            pretrain.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 130 and err.splitlines()[-1] == "stopped (Ctrl-C): the same command resumes the run"
        assert "Traceback" not in err and [p.name for p in out.iterdir() if ".tmp" in p.name] == []
        assert torch.load(out / "checkpoint-latest.pth", weights_only=True)["epoch"] == 0  # whole, the newest
    assert (out / "checkpoint-0001.pth").exists()  # written before the newest one
    runs.append(2)
    pretrain.main(argv)
    assert "resumed from" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out) if "epoch" in r] == [0, 1]


@pytest.mark.parametrize("save_ckpt_freq, latest_every, checkpoints, num_writes", [  # 3 log lines, 3 curves
    (1, 10, ["checkpoint-0000.pth", "checkpoint-0001.pth", "checkpoint-0002.pth"], 6 + 3 + 3),
    (2, 10, ["checkpoint-0001.pth", "checkpoint-0002.pth"], 6 + 2 + 2),  # epoch 0: logged, not checkpointed
    (100, 0, ["checkpoint-0002.pth"], 6 + 3 + 1)])  # the newest at every epoch, numbered only at the last
def test_a_kill_at_any_write_of_an_epoch_loses_no_log_line(save_ckpt_freq, latest_every, checkpoints, num_writes,
                                                           tmp_path, monkeypatch):
    # The durable writes at the end of each epoch (log line, curves, and the checkpoints due: numbered every
    # save_ckpt_freq epochs and at the last, the newest with them and otherwise after latest_every minutes);
    # a kill just before the k-th of them, for every k, or in the middle of the log line, then a resume: every
    # epoch is in the log once.
    import itertools
    from types import SimpleNamespace

    class Killed(Exception):
        pass

    ctx = SimpleNamespace(main=True, world=1, rank=0, device=torch.device("cpu"), print=lambda *a: None)
    atomic_write, log = W.atomic_write, W.RunFolder.log
    monkeypatch.setattr(plots, "line_chart", lambda *a, **k: np.zeros((2, 2, 3), np.uint8))  # (drawn elsewhere)
    for kill_at in itertools.count():
        killed = False
        for half_line in (False, True):
            out = tmp_path / f"kill{kill_at}{'-half' * half_line}"
            writes = []  # None: no kill (the resumed run)

            def counted(write, *a, **k):
                if writes is not None:
                    writes.append(write)
                    if len(writes) == kill_at + 1:
                        if half_line and write is log:
                            open(a[0].log_path, "a").write(json.dumps(a[1])[:15])  # killed while writing the line
                        raise Killed
                return write(*a, **k)

            monkeypatch.setattr(W, "atomic_write", lambda *a, **k: counted(atomic_write, *a, **k))
            monkeypatch.setattr(W.RunFolder, "log", lambda *a, **k: counted(log, *a, **k))
            args = SimpleNamespace(dtype="fp32", output_dir=str(out), resume=None, epochs=3,
                                   save_ckpt_freq=save_ckpt_freq, latest_every=latest_every)
            for attempt in range(2):
                net = torch.nn.Linear(2, 2)
                saved, writes = writes, None
                run = engine.Run(args, ctx, net, torch.optim.AdamW(net.parameters()))  # (resumes the second time)
                writes = saved
                try:
                    for epoch in range(run.start_epoch, args.epochs):
                        run.end_epoch(epoch, {"epoch": epoch, "loss": 1.0})
                except Killed:
                    writes, killed = None, True
            assert [r["epoch"] for r in read_log(out) if "epoch" in r] == [0, 1, 2], (kill_at, half_line)
            numbered = sorted(p.name for p in out.glob("checkpoint-0*.pth"))  # none lost by a kill
            assert numbered == checkpoints, (kill_at, half_line)
        if not killed:  # past the last write: a whole run, never killed
            assert sorted(p.name for p in out.glob("checkpoint-0*.pth")) == checkpoints
            assert kill_at == num_writes  # a kill was tried before each of them
            break


def test_the_newest_checkpoint_waits_latest_every_minutes_between_writes(tmp_path):
    now = [0.0]
    folder = W.RunFolder(str(tmp_path), latest_every=600, clock=lambda: now[0])
    newest = []
    for epoch, minutes in enumerate([3, 3, 3, 3, 1, 12]):  # epoch 4 is numbered
        now[0] += 60 * minutes
        folder.save({"epoch": epoch}, numbered=epoch == 4)
        latest = tmp_path / "checkpoint-latest.pth"
        newest.append(torch.load(latest, weights_only=True)["epoch"] if latest.exists() else None)
    assert newest == [None, None, None, 3, 4, 5]  # 12 minutes in; numbered; 12 minutes after that
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0004.pth", "checkpoint-latest.pth"]
    assert not W.RunFolder(str(tmp_path / "main-only"), main=False).save({"epoch": 0}, numbered=True)
    assert not (tmp_path / "main-only").exists()


def test_fp16_resumes_a_bf16_or_fp32_run_and_bf16_an_fp16_one(tmp_path, monkeypatch):
    # A bf16 or fp32 run saves its loss scaler switched off, as an empty state: an fp16 run resuming from it
    # starts its scale afresh (it stopped with "The source state dict is empty").
    from types import SimpleNamespace
    said = []
    ctx = SimpleNamespace(main=True, world=1, rank=0, device=torch.device("cpu"), print=said.append)
    x = torch.randn(4, 8)
    monkeypatch.setattr(plots, "line_chart", lambda *a, **k: np.zeros((2, 2, 3), np.uint8))  # (drawn elsewhere)

    def train(dtype, epochs):
        args = SimpleNamespace(dtype=dtype, output_dir=str(tmp_path), resume=None, epochs=epochs, save_ckpt_freq=1,
                               latest_every=0, accum_iter=1, clip_grad=None)
        net = torch.nn.Linear(8, 8)
        run = engine.Run(args, ctx, net, torch.optim.AdamW(net.parameters()))
        for epoch in range(run.start_epoch, epochs):
            with engine.autocast(args, ctx):
                run.backward(net(x).float().pow(2).mean())
            run.step()
            run.end_epoch(epoch, {"epoch": epoch, "loss": 1.0})
        return run

    for dtype, epochs in [("fp32", 1), ("fp16", 2), ("bf16", 3), ("fp16", 4)]:
        run = train(dtype, epochs)
        assert run.start_epoch == epochs - 1, dtype
        saved = torch.load(tmp_path / "checkpoint-latest.pth", weights_only=True)
        assert saved["epoch"] == epochs - 1 and bool(saved["scaler"]) == (dtype == "fp16")
    assert sum("holds no fp16 loss scale" in line for line in said) == 2  # after fp32, after bf16
    assert saved["scaler"]["scale"] == 65536.0 and run.scaler.get_scale() == 65536.0


def test_checkpoints_are_read_on_torch_2_4_which_has_no_safe_globals(tmp_path, monkeypatch):
    # requirements.txt allows torch 2.4: it has add_safe_globals, not the safe_globals context (2.5).
    import argparse
    import fractions
    path = tmp_path / "reference.pth"
    torch.save({"model": tiny_mae().state_dict(), "args": argparse.Namespace(model="tiny")}, path)
    assert argparse.Namespace in torch.serialization.get_safe_globals()  # the reference's flags, allowed
    monkeypatch.delattr(torch.serialization, "safe_globals")
    assert W.read_file(path)["args"].model == "tiny"
    W.load_checkpoint(tiny_mae(), path, verbose=False)
    torch.save({"model": {}, "args": fractions.Fraction(1, 3)}, path)  # any other object is still refused
    with pytest.raises(W.CheckpointError, match="holds a fractions.Fraction object, which a safe load refuses"):
        W.read_file(path)


def test_an_explicit_gpu_is_kept_for_one_process_and_refused_under_torchrun(two_classes, monkeypatch, capsys):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    given = ["--data_path", str(two_classes)]
    ctx = engine.Context(pretrain.parse_args(given + ["--device", "cuda:3"]))
    assert ctx.device == torch.device("cuda", 3) and chosen == [ctx.device]  # was cuda:0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pretrain.parse_args(given + ["--device", "cuda"]).device == "cuda:1"  # torchrun: its LOCAL_RANK
    with pytest.raises(SystemExit) as stop:
        finetune.parse_args(given + ["--device", "cuda:3"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--device: cuda:3: under torchrun each process takes the GPU of its LOCAL_RANK; give --device cuda, and "
        "choose GPUs with CUDA_VISIBLE_DEVICES")


def test_workers_persist_and_replay_an_epoch_and_test_batches_fit_in_a_training_batch(two_classes):
    from types import SimpleNamespace
    samples = [(str(two_classes / line.split()[0]), 0) for line in (two_classes / "train.txt").read_text().splitlines()]
    ctx = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    args = SimpleNamespace(batch_size=2, num_sample=2, num_workers=2, seed=0, accum_iter=1)
    dataset = data.VideoDataset(samples[:4], "pretrain", 4, 2, 32, num_sample=2)

    def epoch_of(loader, sampler, epoch):
        engine.start_epoch(epoch, sampler, args, ctx)
        return torch.cat([video for video, *_ in loader])

    loader, sampler = data.make_loader(dataset, args, ctx, train=True)
    assert loader.persistent_workers  # started once: a new epoch does not start 2 processes again
    epochs = [epoch_of(loader, sampler, epoch) for epoch in (0, 1)]
    again, sampler = data.make_loader(dataset, args, ctx, train=True)  # a resumed run: new workers at epoch 1
    assert torch.equal(epoch_of(again, sampler, 1), epochs[1]) and not torch.equal(epochs[0], epochs[1])
    # A test batch holds at most a training batch's clips, or one video's views: its workers' prefetch then
    # takes no more shared memory than training's (not 16 videos x 15 views, 578 MB a batch at 16 x 224 x 224)
    views = data.VideoDataset(samples, "test", 4, 2, 32, test_num_segment=5, test_num_crop=3)
    for batch_size, num_sample, videos in [(16, 2, 2), (16, 1, 1), (1, 1, 1), (8, 4, 2)]:
        args = SimpleNamespace(batch_size=batch_size, num_sample=num_sample, num_workers=2, seed=0, accum_iter=1)
        loader, _ = data.make_loader(views, args, ctx, train=False)
        assert loader.batch_size == videos and not loader.persistent_workers
        assert loader.batch_size * views.views <= max(batch_size * num_sample, views.views)


def test_unreadable_test_videos_are_named_not_scored(videos, tmp_path):
    from types import SimpleNamespace
    from evaluate import predict_and_score
    (tmp_path / "zero.avi").write_bytes(b"")
    samples = [(videos["avi"], 0), (str(tmp_path / "zero.avi"), 1), (videos["mp4"], 2)]
    ds = data.VideoDataset(samples, "test", num_frames=4, sampling_rate=2, input_size=32, test_num_segment=1,
                           test_num_crop=1)
    net = tiny_vit(num_classes=3)
    with torch.no_grad():  # always class 2: the zero-byte video's item (which holds the mp4's views) would be wrong
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    args = SimpleNamespace(batch_size=2, num_sample=1, num_workers=0, seed=0, dtype="fp32")
    ctx = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    scores = predict_and_score(net, ds, args, ctx)
    assert scores["num_videos"] == 2 and scores["top1"] == 0.5 and scores["mean_class_acc"] == 0.5
    assert scores["unreadable"] == 1 and scores["unreadable_files"] == [str(tmp_path / "zero.avi")]


def test_bad_videos_are_named_once_per_run_and_too_many_stop_cleanly(tmp_path, two_classes, capfd):
    # Broken files among 8 good ones, loaded by 2 worker processes that restart every epoch.
    bad = {"zero.avi": b"", "text.mp4": b"not a video\n",
           "noise.avi": np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    raw = open(write_video(tmp_path / "full.avi", 150), "rb").read()
    (tmp_path / "cut.avi").write_bytes(raw[:len(raw) // 4])
    decodable = len(sequential(tmp_path / "cut.avi"))
    good = [f"{two_classes / line}" for line in (two_classes / "train.txt").read_text().splitlines()]
    lst = tmp_path / "train.txt"
    broken_rows = [f"{tmp_path}/{n} 0" for n in ("zero.avi", "text.mp4", "cut.avi")]
    lst.write_text("".join(f"{line}\n" for line in good + broken_rows))
    out = tmp_path / "run"
    argv = ["--data_path", str(lst), *SMALL_RUN, "--num_workers", "2", "--save_ckpt_freq", "100",
            "--output_dir", str(out)]
    pretrain.main(argv + ["--epochs", "2"])  # 2 unreadable of 11: tolerated
    printed, err = capfd.readouterr()
    for name in ("zero.avi", "text.mp4"):
        assert [line for line in printed.splitlines() if name in line] == [
            f"unreadable video, another sample used in its place: {tmp_path / name}"]
    assert [line for line in printed.splitlines() if "cut.avi" in line] == [
        f"truncated video, only its first {decodable} frames decode (the last one repeats): {tmp_path / 'cut.avi'}"]
    assert "Warning" not in err and "moov" not in err and "Traceback" not in err, err
    assert [r["epoch"] for r in read_log(out) if "epoch" in r] == [0, 1]
    # a third unreadable file: over the limit (5% of 12, and at least 3), counted across workers
    lst.write_text(lst.read_text() + f"{tmp_path}/noise.avi 0\n")
    with pytest.raises(SystemExit) as stop:
        pretrain.main(argv + ["--epochs", "4"])
    printed, err = capfd.readouterr()
    assert stop.value.code == 1 and "Traceback" not in err, err
    last = printed.strip().splitlines()[-1]
    assert last.startswith("stopping: 3 of 12 training videos are unreadable, more than the 2 tolerated: ")
    assert (all(str(tmp_path / name) in last for name in bad)
            and f"`python data.py --check {lst} --data_set list`" in last)
    assert last.endswith(f"the last good checkpoint is {out / 'checkpoint-latest.pth'}")
    assert torch.load(out / "checkpoint-latest.pth", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in read_log(out) if "epoch" in r] == [0, 1]


def test_accumulation_is_a_doubled_batch_and_fp16_clips_the_unscaled_gradient(tmp_path, two_classes, capsys):
    common = ["--data_path", str(two_classes), *SMALL_RUN, "--per_class", "2", "--epochs", "1", "--warmup_epochs", "0",
              "--save_ckpt_freq", "100", "--blr", "0.05"]
    pretrain.main(common + ["--batch_size", "4", "--output_dir", str(tmp_path / "batch4")])
    pretrain.main(common + ["--accum_iter", "2", "--output_dir", str(tmp_path / "accum2")])
    printed = capsys.readouterr().out
    assert printed.count("4 videos, 1 steps/epoch") == 2  # --per_class 2 of 2 classes
    a, b = (torch.load(tmp_path / d / "checkpoint-latest.pth", weights_only=True) for d in ("batch4", "accum2"))
    assert read_log(tmp_path / "batch4")[-1]["lr"] == pytest.approx(0.05 * 4 / 256)  # no warmup
    for k in a["model"]:  # AdamW's one step moves nearly every weight by about lr = 7.8e-4: the same steps
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=5e-5)
    for k, state in a["optimizer"]["state"].items():  # the first moment is 0.1 x the gradient: the same gradient
        torch.testing.assert_close(state["exp_avg"], b["optimizer"]["state"][k]["exp_avg"], rtol=1e-3, atol=1e-9)
    losses = [read_log(tmp_path / d)[-1]["loss"] for d in ("batch4", "accum2")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # the mean over the clips of the step, either way
    assert [read_log(tmp_path / d)[-1]["clips_per_step"] for d in ("batch4", "accum2")] == [4, 4]
    norms, dtypes = [], set()

    def before_step(optimizer, args, kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack(
            [p.grad.norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])).item())

    from torch.nn.modules.module import register_module_forward_hook
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    hooks = [register_optimizer_step_pre_hook(before_step),
             register_module_forward_hook(lambda module, inputs, output: dtypes.add(getattr(output, "dtype", None)))]
    try:
        pretrain.main(common + ["--batch_size", "4", "--dtype", "fp16", "--clip_grad", "0.01",
                                "--output_dir", str(tmp_path / "fp16")])
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.float16 in dtypes and len(norms) == 1 and norms[0] <= 0.01 * 1.001  # unscaled, then clipped
    c = torch.load(tmp_path / "fp16" / "checkpoint-latest.pth", weights_only=True)
    assert c["scaler"]["scale"] > 1 and math.isfinite(read_log(tmp_path / "fp16")[-1]["loss"])
    # what AdamW applied: after one step its first moment is 0.1 x the gradient it was given, so that gradient
    # had the clipped norm 0.01 (not 0.01 / scale: clipped before unscaling; not more: not clipped)
    exp_avg = [state["exp_avg"].float() for state in c["optimizer"]["state"].values()]
    unclipped = [state["exp_avg"] for state in a["optimizer"]["state"].values()]
    assert torch.linalg.vector_norm(torch.stack([m.norm() for m in exp_avg])).item() == pytest.approx(1e-3, rel=1e-2)
    assert torch.linalg.vector_norm(torch.stack([m.norm() for m in unclipped])).item() > 1e-2  # a real clip
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def torchrun(script, *argv, cwd):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *argv]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def checksum(path):
    """The checksum a torchrun test's processes write, of a checkpoint's weights."""
    tensors = torch.load(path, weights_only=True)["model"].values()
    return __import__("hashlib").sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def test_torchrun_two_cpu_processes_pretrain_resume_from_rank_0s_disk_and_count_every_test_video_once(
        tmp_path, two_classes):
    # Two nodes, a disk each: only rank 0 writes checkpoints, so after epoch 0 rank 1's folder is empty. Rank 0
    # decides to resume for both and rank 1 gets its copy of the checkpoint (rank 1 used to start at epoch 0, and
    # the processes' collectives no longer matched). Each process keeps its optimizer's state at the end.
    here = str(__import__("pathlib").Path(__file__).parent)
    pre, other_disk = tmp_path / "pre", tmp_path / "rank1"
    script = tmp_path / "a_disk_per_node.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {here!r})
import engine, hashlib, pretrain, torch
rank, close = os.environ["RANK"], engine.Run.close
def keep(run):  # each process keeps its optimizer's state and a checksum of the weights it ends with
    torch.save(run.optimizer.state_dict(), {str(tmp_path)!r} + f"/adamw{{rank}}.pt")
    tensors = run.net.state_dict().values()
    digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in tensors))
    open({str(tmp_path)!r} + f"/weights-rank{{rank}}.txt", "w").write(digest.hexdigest())
    close(run)
engine.Run.close = keep
pretrain.main(sys.argv[1:] + ["--output_dir", {str(pre)!r} if rank == "0" else {str(other_disk)!r}])
""")
    args = ["--data_path", str(two_classes), *SMALL_RUN]
    assert "x 2 processes" in torchrun(str(script), *args, "--epochs", "1", cwd=here)
    out = torchrun(str(script), *args, "--epochs", "2", cwd=here)
    assert f"resumed from {pre / 'checkpoint-latest.pth'}: epoch 1 of 2" in out and not other_disk.exists()
    assert [r["epoch"] for r in read_log(pre) if "epoch" in r] == [0, 1] and read_log(pre)[0]["world_size"] == 2
    assert read_log(pre)[-1]["clips_per_step"] == 4  # 2 videos on each of 2 processes
    adamw = [torch.load(tmp_path / f"adamw{rank}.pt", weights_only=True)["state"] for rank in (0, 1)]
    for k, state in adamw[0].items():  # the same state on both: the steps of epoch 0 included (2 an epoch)
        assert state["step"] == adamw[1][k]["step"] == 4
        assert torch.equal(state["exp_avg_sq"], adamw[1][k]["exp_avg_sq"])
    # one model: both processes end with the weights of the checkpoint, which moved since epoch 0's
    ends = [(tmp_path / f"weights-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert ends == [checksum(pre / "checkpoint-latest.pth")] * 2 != [checksum(pre / "checkpoint-0000.pth")] * 2
    classifier = MD.build_model("finetune", "tiny", img_size=32, num_frames=4, num_classes=2)
    W.load_checkpoint(classifier, pre / "checkpoint-latest.pth", verbose=False)  # a head saved with it: --eval
    # refuses to test one that would start at random
    torch.save({"model": classifier.state_dict()}, tmp_path / "classifier.pth")
    views = ["--test_num_segment", "2", "--test_num_crop", "2", "--finetune", str(tmp_path / "classifier.pth"),
             "--eval"]
    torchrun("finetune.py", "--data_path", str(two_classes), *SMALL_RUN, *views, "--output_dir", str(tmp_path / "d"),
             cwd=here)
    finetune.main(["--data_path", str(two_classes), *SMALL_RUN, *views, "--output_dir", str(tmp_path / "s")])
    ddp, single = read_log(tmp_path / "d")[-1]["test"], read_log(tmp_path / "s")[-1]["test"]
    assert ddp["num_videos"] == single["num_videos"] == 5
    assert ddp["top1"] == single["top1"] and ddp["mean_class_acc"] == single["mean_class_acc"]


def test_sigkill_loses_at_most_the_current_epoch(tmp_path, two_classes):
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "killed"
    cmd = [sys.executable, "pretrain.py", "--data_path", str(two_classes), *SMALL_RUN, "--epochs", "3",
           "--save_ckpt_freq", "100", "--latest_every", "0", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.Popen(cmd, cwd=here, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-latest.pth").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.05)
    still_running = run.poll() is None
    run.send_signal(signal.SIGKILL)  # somewhere in epoch 1 (or while it writes)
    run.wait()
    assert still_running and run.returncode == -signal.SIGKILL
    assert torch.load(out / "checkpoint-latest.pth", weights_only=True)["epoch"] < 2  # killed before the end
    assert [r["epoch"] for r in read_log(out) if "epoch" in r] in ([0], [0, 1])  # mid-epoch 1 or after its line
    subprocess.run(cmd, cwd=here, env=env, check=True, capture_output=True, timeout=600)
    epochs = [r["epoch"] for r in read_log(out) if "epoch" in r]
    assert epochs == [0, 1, 2]  # each epoch logged once, none lost


def test_ci_runs_the_readmes_test_line_as_written():
    import pathlib
    here = pathlib.Path(__file__).parent
    line = next(l for l in (here / "README.md").read_text().splitlines()
                if l.startswith("pip install -r requirements-test"))
    assert line.split("#")[0].strip() in (here / ".ci" / "run").read_text().splitlines()


def test_bench_smoke_run_has_every_row(tmp_path):
    import importlib.util
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "bench.py", "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=str(__import__("pathlib").Path(__file__).parent))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    have = {name: importlib.util.find_spec(name) is not None for name in ("transformers", "decord", "PIL")}
    missing = {"transformers": None if have["transformers"] else "transformers",  # what a row's skip names
               "decord": None if have["decord"] and have["PIL"] else "decord" if not have["decord"] else "pillow"}
    # each row: a part of its name, the figure it must carry, the optional package it needs
    for part, key, needs in [("matmul peak bf16", "tflops", None), ("matmul peak fp32", "tflops", None),
                             ("step ours bf16", "ms", None), ("step ours fp32", "ms", None),
                             ("step HF", "ms", "transformers"), ("peak memory ours / HF", "ratio", "transformers"),
                             ("ours bf16 / HF bf16", "ratio", "transformers"), ("ours bf16 / ours fp32", "ratio", None),
                             ("bf16 vs fp32 loss", "ratio", None), ("step finetune bf16", "ms", None),
                             ("clips floor", "clips_per_s", None), ("clips reference", "clips_per_s", "decord"),
                             ("clips ours: VideoDataset", "clips_per_s", None),
                             ("num_sample=2, both", "clips_per_s", None),
                             ("clips num_sample=2 / num_sample=1", "ratio", None),
                             ("clips ours / reference", "ratio", "decord"), ("clips ours / floor", "ratio", None),
                             ("DataLoader, 1 worker", "clips_per_s", None),
                             ("DataLoader, 2 workers", "clips_per_s", None)]:
        (row,) = [r for r in rows if part in r["name"]]
        if needs and missing[needs]:
            assert row["value"] == f"skipped: pip install {missing[needs]}", row
        else:  # a measured figure: a positive number (the loss gap may be 0)
            assert isinstance(row.get(key), float) and 0 <= row[key] < math.inf, row
            assert row[key] > 0 or part == "bf16 vs fp32 loss", row
    assert len(rows) == 19
    assert all(r.get("mfu_datasheet") is None for r in rows)  # a CPU: no datasheet peak to divide by


def test_init_statistics_are_the_references():
    # modeling_pretrain.py: encoder_to_decoder never sees the weight init (torch's default: uniform, std
    # 1/sqrt(3 * fan_in)); mask_token is trunc_normal_(std=.02) with timm's absolute bounds set to -.02, .02
    torch.manual_seed(0)
    net = MD.VideoMAE(**{**TINY, "embed_dim": 768, "num_heads": 12, "decoder_embed_dim": 384, "decoder_num_heads": 6})
    bridge = net.encoder_to_decoder.weight
    assert abs(bridge.std().item() / (1 / math.sqrt(3 * 768)) - 1) < 0.02  # 0.0208 (xavier would give 0.0417)
    assert bridge.abs().max().item() <= 1 / math.sqrt(768)
    token = net.mask_token
    assert token.abs().max().item() <= 0.02
    assert abs(token.std().item() / (0.02 * 0.5396) - 1) < 0.15  # a normal cut at one std keeps 0.54 of its std
    head = net.decoder.head.weight  # every other Linear stays xavier
    assert abs(head.std().item() / math.sqrt(2 / (384 + 384)) - 1) < 0.02


def test_pretraining_crops_average_when_they_shrink():
    # The reference's pre-training resizes with PIL's bilinear filter, which averages when it shrinks;
    # its fine-tuning (torch's interpolate) and test (OpenCV) resize bilinear, sampling.
    frame = np.random.default_rng(0).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    out = np.empty((1, 16, 16, 3), np.uint8)
    data._render({0: frame}, [0], (0, 0, 48, 48), 16, False, out, area=True)  # 3x smaller: 3x3 block means
    blocks = frame.reshape(16, 3, 16, 3, 3).mean((1, 3))[..., ::-1]  # BGR in, RGB out
    assert np.abs(out[0] - blocks).max() <= 0.5 + 1e-6
    data._render({0: frame}, [0], (0, 0, 48, 48), 16, False, out)  # bilinear samples each block's centre pixel
    assert np.array_equal(out[0], frame[1::3, 1::3, ::-1])
    data._render({0: frame}, [0], (0, 0, 48, 48), 16, True, out)  # flipped: each frame mirrored left to right
    assert np.array_equal(out[0], frame[1::3, 1::3, ::-1][:, ::-1])
    small = np.empty((1, 64, 64, 3), np.uint8)
    data._render({0: frame}, [0], (0, 0, 48, 48), 64, False, small, area=True)  # enlarging: bilinear either way
    assert np.array_equal(small, data._render({0: frame}, [0], (0, 0, 48, 48), 64, False, small.copy()))


def test_numbered_checkpoints_every_save_ckpt_freq_epochs_and_the_last():
    from types import SimpleNamespace
    run = SimpleNamespace(args=SimpleNamespace(save_ckpt_freq=25, epochs=60))
    assert [e for e in range(60) if engine.Run.numbered(run, e)] == [24, 49, 59]


def parsed_args(script, argv, monkeypatch):
    return script.parse_args(argv)


def test_recipes_are_the_reference_scripts():
    # scripts/<set>/videomae_vit_base_patch16_224_tubemasking_ratio_<r>_epoch_<E>/{pretrain,finetune}.sh
    # (K400 and SSv2: the 800-epoch ones); what a script leaves out is run_*.py's default
    k400 = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=32, epochs=801,
                warmup_epochs=40, blr=1.5e-4, min_blr=1e-5, mask_ratio=0.9, num_sample=1, save_ckpt_freq=20,
                no_norm_pix_loss=False, in_memory=False, gpus=64)  # the scripts' processes: K400 and SSv2 64, UCF101 8
    ucf = {**k400, "batch_size": 24, "epochs": 3201, "blr": 3e-4, "mask_ratio": 0.75, "save_ckpt_freq": 100, "gpus": 8}
    assert pretrain.RECIPES == {"K400": k400, "SSv2": {**k400, "sampling_rate": 2}, "UCF101": ucf,
                                "HMDB51": {**ucf, "epochs": 4800}}  # HMDB51: no script; the paper's epochs
    k400 = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=8, epochs=100,
                warmup_epochs=5, blr=1e-3, min_blr=1e-6, num_sample=1, save_ckpt_freq=10, layer_decay=0.75,
                drop_path=0.1, head_drop_rate=0.0, no_flip=False, sampling="i3d", test_num_segment=5, test_num_crop=3,
                aa="rand-m7-n4-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, crop_scale=(0.08, 1.0),
                in_memory=False, gpus=64)  # run_class_finetuning.py's defaults: RandAugment, erasing, mixup, ...
    ucf = {**k400, "batch_size": 16, "blr": 5e-4, "min_blr": 1e-5, "num_sample": 2, "save_ckpt_freq": 50, "gpus": 8,
           "layer_decay": 0.7, "drop_path": 0.2, "head_drop_rate": 0.5}
    ssv2 = {**k400, "epochs": 50, "blr": 5e-4, "no_flip": True, "sampling": "segment", "test_num_segment": 2}
    assert finetune.RECIPES == {"K400": k400, "SSv2": ssv2, "UCF101": ucf, "HMDB51": ucf}


def recipe_of(args, recipe):
    """The run's values of a recipe's flags; its GPUs from its videos per step (no flag: this run's are its own)."""
    return {**{k: vars(args)[k] for k in recipe if k != "gpus"}, "gpus": args.recipe_videos // args.batch_size}


def test_data_set_alone_gives_its_recipe_and_the_references_lr(tmp_path, monkeypatch):
    root, _ = make_ucf101(tmp_path, ['ApplyEyeMakeup', 'Basketball'])
    for argv in (["--data_set", "UCF101"], []):  # named, or recognised by its split folder
        args = parsed_args(pretrain, ["--data_path", str(root), *argv], monkeypatch)
        assert args.recipe == "UCF101" and recipe_of(args, pretrain.RECIPES["UCF101"]) == pretrain.RECIPES["UCF101"]
    args = parsed_args(pretrain, ["--data_path", str(root), "--recipe", "SSv2", "--batch_size", "4"], monkeypatch)
    assert (args.data_set, args.sampling_rate, args.mask_ratio, args.batch_size) == ("UCF101", 2, 0.9, 4)
    args = parsed_args(finetune, ["--data_path", str(root)], monkeypatch)
    assert recipe_of(args, finetune.RECIPES["UCF101"]) == finetune.RECIPES["UCF101"]
    monkeypatch.setattr(plots, "make_demo_dataset", lambda path: tmp_path)  # no --data_path: the demo's own values
    for script in (pretrain, finetune):
        args = parsed_args(script, [], monkeypatch)
        given = {k: v for k, v in script.DEMO.items() if v is not None}  # None: no value (bf16 where the CPU has it)
        assert {k: vars(args)[k] for k in given} == given and args.min_blr == script.K400["min_blr"]
    # The reference's UCF101 fine-tuning flags, as its script spells them, on 8 GPUs: lr 5e-4 x 16 x 8 / 256
    monkeypatch.setattr(engine, "Context", lambda args: __import__("types").SimpleNamespace(world=8, print=print))
    args = parsed_args(finetune, ["--data_path", str(root), "--data_set", "UCF101", "--batch_size", "16",
                                  "--num_sample", "2", "--lr", "5e-4", "--min_lr", "1e-5", "--layer_decay", "0.7",
                                  "--fc_drop_rate", "0.5", "--drop_path", "0.2", "--update_freq", "1"], monkeypatch)
    engine.setup(args)
    assert math.isclose(args.lr, 2.5e-4) and math.isclose(args.min_lr, 5e-6) and args.head_drop_rate == 0.5
    args = parsed_args(pretrain, ["--data_path", str(root), "--update_freq", "3"], monkeypatch)
    engine.setup(args)  # the UCF101 pre-training script: lr 3e-4 x 24 x 8 / 256, here x 3 accumulation steps
    assert math.isclose(args.lr, 3e-4 * 24 * 8 * 3 / 256) and math.isclose(args.min_lr, 1e-5 * 24 * 8 * 3 / 256)


def test_a_recipe_keeps_its_videos_per_step_on_any_number_of_processes(tmp_path, monkeypatch, capsys):
    root, _ = make_ucf101(tmp_path, ['ApplyEyeMakeup', 'Basketball'])

    def started(script, argv, world=1):  # parsed and set up as on `world` processes
        monkeypatch.setattr(engine, "Context",
                            lambda args: __import__("types").SimpleNamespace(world=world, print=print))
        args = script.parse_args(argv)
        engine.setup(args)
        return args, capsys.readouterr().out

    ucf = ["--data_path", str(root)]
    # UCF101 pre-training: 24 videos x 8 GPUs = 192 a step; one process with --batch_size 4 accumulates 48
    args, out = started(pretrain, ucf + ["--batch_size", "4"])
    assert (args.accum_iter, args.videos_per_step) == (48, 192) and math.isclose(args.lr, 3e-4 * 192 / 256)
    assert "(4 videos x 1 processes x 48 accum; the UCF101 recipe: 192 videos per step)" in out
    assert started(pretrain, ucf, world=8)[0].accum_iter == 1  # the script's own 8 GPUs
    assert started(finetune, ucf, world=2)[0].accum_iter == 4  # fine-tuning: 16 x 8 = 128 = 16 x 2 x 4
    # 5 x 1 divides no 192: the nearest, 38 x 5 = 190; the line gives both and the lr that follows
    args, out = started(pretrain, ucf + ["--batch_size", "5"])
    assert args.accum_iter == 38 and "x 190 videos per step / 256 = lr 0.000223" in out and "192 videos per" in out
    assert started(pretrain, ucf + ["--batch_size", "4", "--update_freq", "2"])[0].videos_per_step == 8  # given
    monkeypatch.setattr(plots, "make_demo_dataset", lambda path: tmp_path)  # the demo: one process, by design
    for script in (pretrain, finetune):
        args, out = started(script, [])
        assert args.accum_iter == 1 and args.videos_per_step == script.DEMO["batch_size"], out


def test_recipe_is_written_at_the_top_of_the_log(tmp_path):
    root, _ = make_ucf101(tmp_path, ['ApplyEyeMakeup', 'Basketball'])
    out = tmp_path / "run"
    pretrain.main(["--data_path", str(root), "--data_set", "UCF101", *SMALL_RUN, "--epochs", "1",
                   "--output_dir", str(out)])
    config = read_log(out)[0]["config"]
    assert (config["recipe"] == "UCF101"
            and (config["mask_ratio"], config["blr"], config["min_blr"]) == (0.75, 3e-4, 1e-5))
    assert config["save_ckpt_freq"] == 1 and config["warmup_epochs"] == 1  # given flags win
    assert math.isclose(config["lr"], 3e-4 * 2 / 256) and "mask_ratio" in config["recipe_defaults"]
    assert (config["recipe_videos"], config["videos_per_step"], config["accum_iter"]) == (192, 2, 1)  # as given


def test_gradient_checkpointing_gives_the_same_gradients():
    video, m = torch.randn(2, 3, 4, 32, 32), M.tube_mask(2, GRID, 0.5, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        net = tiny_mae()
        net.encoder.grad_checkpointing = ckpt
        net(video, m)[0].backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------ the CUDA path
# These run where torch sees a CUDA GPU (the README's test line then checks the GPU path) and skip elsewhere.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_pretraining_and_finetuning_steps_in_mixed_precision_never_wait_for_the_gpu(dtype):
    # A step as the scripts run it (pinned clips, their labels, normalisation, masks drawn on the GPU, autocast,
    # fused AdamW), after a warm-up step, under CUDA's sync debug mode: any host sync raises. fp16 scales its
    # loss; its scaler's step reads back whether a gradient overflowed (by design), so it runs outside the check.
    device, half = torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    torch.manual_seed(0)
    mae = MD.build_model("pretrain", "tiny", img_size=64, num_frames=4).to(device)
    vit = MD.build_model("finetune", "tiny", img_size=64, num_frames=4, num_classes=5, drop_path_rate=0.1).to(device)
    grid = mae.encoder.grid
    counts = mask_counts(grid, 0.75)
    clips = torch.randint(0, 256, (4, 4, 64, 64, 3), dtype=torch.uint8).pin_memory()
    labels = torch.arange(4).pin_memory()
    g = torch.Generator(device).manual_seed(0)
    for net in (mae, vit):
        opt = torch.optim.AdamW(MD.param_groups(net, 0.05), lr=1e-3, fused=True)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
        start = [p.detach().clone() for p in net.parameters()]
        for step in range(3):
            torch.cuda.set_sync_debug_mode("error" if step else 0)
            try:
                video = data.normalize(clips.to(device, non_blocking=True))
                y = labels.to(device, non_blocking=True)
                m = M.tube_mask(4, grid, 0.75, generator=g, device=device)
                d = M.running_cell_mask(4, grid, 0.5, generator=g, device=device)
                with torch.autocast("cuda", half):
                    loss = net(video, m, d, **counts)[0] if net is mae else F.cross_entropy(net(video), y)
                scaler.scale(loss).backward()
                if dtype == "bf16":
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            if dtype == "fp16":
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss) and (dtype == "bf16" or scaler.get_scale() > 1)
        assert all(torch.isfinite(p).all() for p in net.parameters())
        assert sum(not torch.equal(a, p) for a, p in zip(start, net.parameters())) > len(start) // 2


@needs_cuda
def test_cuda_compiled_pretraining_and_classifier_are_one_graph_with_eager_numerics():
    device = torch.device("cuda")
    video = torch.randn(2, 3, 4, 32, 32, device=device)
    g = torch.Generator(device).manual_seed(0)
    m = M.tube_mask(2, GRID, 0.75, generator=g, device=device)
    d = M.running_cell_mask(2, GRID, 0.5, generator=g, device=device)
    counts = mask_counts(GRID, 0.75)
    for net, inputs in [(tiny_mae().to(device), (video, m, d)), (tiny_vit().to(device).eval(), (video,))]:
        kwargs = counts if isinstance(net, MD.VideoMAE) else {}
        torch._dynamo.reset()
        explained = torch._dynamo.explain(net)(*inputs, **kwargs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled = torch.compile(net, fullgraph=True)
        with torch.autocast("cuda", torch.bfloat16):
            eager, fast = net(*inputs, **kwargs), compiled(*inputs, **kwargs)
        eager, fast = (out[0] if isinstance(out, tuple) else out for out in (eager, fast))
        torch.testing.assert_close(fast.float(), eager.float(), atol=2e-2, rtol=2e-2)
        fast.float().sum().backward()  # the compiled backward runs too


@needs_cuda
@pytest.mark.parametrize("preset", ["small", "base"])
def test_cuda_flash_attention_accepts_the_models_shapes(preset):
    # 16 x 224 x 224 clips: 1568 tokens, heads of 64 in encoder and decoder, the decoder's last block attending
    # from the rebuilt tokens only (fewer queries than keys). Under sdpa_kernel(FLASH_ATTENTION) alone, a shape
    # the kernel refuses would raise, not fall back to a slower one.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = torch.device("cuda")
    torch.manual_seed(0)
    mae = MD.build_model("pretrain", preset).to(device)
    vit = MD.build_model("finetune", preset, num_classes=101).to(device)
    video = torch.randn(2, 3, 16, 224, 224, device=device)
    grid = mae.encoder.grid
    m, d = M.tube_mask(2, grid, 0.9, device=device), M.running_cell_mask(2, grid, 0.5, device=device)
    counts = mask_counts(grid, 0.9)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", torch.bfloat16):
        for decode_mask in (None, d):
            loss, pred = mae(video, m, decode_mask, **counts)
            loss.backward()
        vit(video).float().logsumexp(-1).mean().backward()
    assert torch.isfinite(loss) and pred.shape == (2, 784, 1536)  # half of the 1568 tokens rebuilt


@needs_cuda
def test_cuda_pretraining_resumes_fp16_from_bf16_and_fine_tunes_on_the_gpu_it_is_given(tmp_path, two_classes):
    common = ["--data_path", str(two_classes), *SIZES, "--batch_size", "2", "--accum_iter", "1",  # not K400's 2048
              "--num_workers", "2", "--warmup_epochs", "1", "--save_ckpt_freq", "1", "--device", "cuda:0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain.main(common + ["--epochs", "2", "--output_dir", str(whole)])
    pretrain.main(common + ["--epochs", "1", "--output_dir", str(cut)])
    pretrain.main(common + ["--epochs", "2", "--output_dir", str(cut)])  # resumed at epoch 1
    assert read_log(whole)[0]["config"]["dtype"] == "bf16"  # the default on GPUs
    assert [r["epoch"] for r in read_log(cut) if "epoch" in r] == [0, 1]
    assert read_log(cut)[-1]["loss"] == pytest.approx(read_log(whole)[-1]["loss"], rel=1e-3)
    pretrain.main(common + ["--epochs", "3", "--dtype", "fp16", "--output_dir", str(cut)])  # from bf16's checkpoint
    saved = torch.load(cut / "checkpoint-latest.pth", weights_only=True)
    assert saved["epoch"] == 2 and saved["scaler"]["scale"] > 1 and math.isfinite(read_log(cut)[-1]["loss"])
    finetune.main(["--data_path", str(two_classes), *SIZES, "--batch_size", "2", "--accum_iter", "1",
                   "--num_workers", "2", "--epochs", "1",
                   "--device", "cuda:0", "--finetune", str(cut / "checkpoint-latest.pth"), "--test_num_segment", "2",
                   "--test_num_crop", "2", "--output_dir", str(tmp_path / "ft")])
    assert read_log(tmp_path / "ft")[-1]["test"]["num_videos"] == 5
