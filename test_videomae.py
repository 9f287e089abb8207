"""Tests: masks, model numerics, checkpoint formats, data, and the scripts end to end on generated videos."""
import math

import pytest
import torch
import torch.nn.functional as F

import mask as M
import model as MD

TINY = dict(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=48, depth=2, num_heads=3,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
GRID = (2, 4, 4)  # tokens of a TINY clip


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MD.VideoMAE(**{**TINY, **kw})


def tiny_vit(num_classes=5, **kw):
    torch.manual_seed(0)
    sizes = {k: v for k, v in TINY.items() if not k.startswith("decoder_")}
    return MD.VideoViT(num_classes=num_classes, **{**sizes, **kw})


# ----------------------------------------------------------------------------- masks

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


# ----------------------------------------------------------------------------- model numerics

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
                cube = px[:, :, ti * tubelet:(ti + 1) * tubelet, hi * patch:(hi + 1) * patch, wi * patch:(wi + 1) * patch]
                cube = cube.permute(0, 2, 3, 4, 1).reshape(B, -1, C)  # (B, t*h*w pixels, C)
                if norm:
                    cube = (cube - cube.mean(1, keepdim=True)) / (cube.var(1, unbiased=True, keepdim=True).sqrt() + 1e-6)
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


def test_flops_count_matches_a_hand_count():
    net = tiny_mae()
    enc = 2 * (2 * 8 * 48 * 48 * (3 + 1 + 8) + 4 * 8 * 8 * 48) + 2 * 8 * 384 * 48
    dec = 2 * 32 * 24 * 24 * 12 + 4 * 32 * 32 * 24 + 2 * 8 * 48 * 24 + 2 * 24 * 24 * 384
    assert net.flops_per_clip(8, 24, training=False) == enc + dec


# ----------------------------------------------------------------------------- checkpoint formats

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
             "reference_pretrain": {"model": sd, "optimizer": {}, "epoch": 3},
             "hf_q_bias": to_huggingface(sd), "hf_query_bias": to_huggingface(sd, "query.bias")}
    path = tmp_path / "ckpt.pth"
    torch.save(files[fmt], path)
    dst = tiny_mae()
    dst.load_state_dict({k: torch.zeros_like(v) for k, v in dst.state_dict().items()})
    missing, unexpected = MD.load_checkpoint(dst, path)
    assert missing == [] and unexpected == []
    video, m = torch.randn(2, 3, 4, 32, 32), M.tube_mask(2, GRID, 0.75)
    for a, b in zip(outputs(src, video, m), outputs(dst, video, m)):
        torch.testing.assert_close(a, b)
    # the same file fills a classifier's encoder; fc_norm and head start fresh
    vit = tiny_vit()
    missing, _ = MD.load_checkpoint(vit, path)
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
                MD.load_checkpoint(tiny_vit(), path)
            return
        save_file({k: v.contiguous() for k, v in to_huggingface(sd).items()}, str(path))
    else:
        torch.save({"reference_finetuned": {"module": sd}, "hf_classifier": to_huggingface(sd),
                    "ours": {"model": sd, "epoch": 1}}[fmt], path)
    dst = tiny_vit()
    assert MD.load_checkpoint(dst, path) == ([], [])
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src(video), dst(video))
    other = tiny_vit(num_classes=9)  # another class count: the head is dropped, the rest loads
    missing, _ = MD.load_checkpoint(other, path)
    assert sorted(missing) == ["head.bias", "head.weight"]


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": MD.VideoMAE(**{**TINY, "embed_dim": 96}).state_dict()}, path)
    with pytest.raises(ValueError, match=r"small.pth: tensor 'encoder.patch_embed.proj.weight' has shape \(96"):
        MD.load_checkpoint(tiny_mae(), path)
    torch.save({"model": {"resnet.conv1.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        MD.load_checkpoint(tiny_mae(), path)
