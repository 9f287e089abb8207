"""How good a model is: multi-view testing of a classifier, the k-NN and linear probes of frozen
features, and the reconstruction loss of a pre-training model beside two predictors that know
nothing of videos; with the pictures of each (drawn by plots.py)."""
import argparse
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import mask as masks
import model as models
import plots
from engine import all_sum, autocast, lr_at
from weights import (DECODER_KEYS, CheckpointError, atomic_write, canonical_weights,
                     checkpoint_config, load_checkpoint, read_file, write_png)


# ------------------------------------------------------------------------ every view of every video

def per_video(fn, dataset, args, ctx):
    """fn(clips (B, 3, T, H, W)) -> (B, K) for every view of every video of a 'test'-mode dataset,
    across all processes, averaged over each video's views. Returns (num_videos, K), the videos
    seen, and the videos that could not be read (their items hold another video's views)."""
    loader, _ = data.make_loader(dataset, args, ctx, train=False)
    rows, out = [], []
    unreadable = torch.zeros(len(dataset))
    with torch.no_grad():
        for video, _, index, substituted, _ in loader:
            B, V = video.shape[:2]
            with autocast(args, ctx):
                values = fn(data.normalize(video.to(ctx.device, non_blocking=True).flatten(0, 1)))
            out.append(values.float().view(B, V, -1).cpu())
            views = torch.arange(V).expand(B, V)
            rows.append(torch.stack([index[:, None].expand(B, V), views], -1))
            unreadable[index[substituted > 0]] = 1
    rows = gather(torch.cat(rows).flatten(0, 1), ctx)  # (rows, 2): (video, view) of each row
    out = gather(torch.cat(out).flatten(0, 1), ctx)  # (rows, K)
    merged, seen = merge_views(rows, out, len(dataset))
    return merged, seen, torch.tensor(all_sum(unreadable.tolist(), ctx)) > 0


def gather(t, ctx):
    """Rows of every process, concatenated (each holds the same number: the sampler pads)."""
    if ctx.world == 1:
        return t
    parts = [torch.empty_like(t.to(ctx.device)) for _ in range(ctx.world)]
    dist.all_gather(parts, t.to(ctx.device))
    return torch.cat(parts).cpu()


def merge_views(indices, probs, num_videos):
    """Average the scores of every view of each video; `indices` (rows, 2) name the (video, view) of
    each row. Rows repeated by a distributed sampler's padding are counted once. Returns
    (num_videos, C) and the videos seen."""
    unique_rows = {}
    for row, (i, view) in enumerate(indices.tolist()):
        unique_rows[(i, view)] = row  # the same (video, view) twice is the padding
    rows = torch.tensor(list(unique_rows.values()), dtype=torch.long)
    videos = indices[rows, 0]
    merged = torch.zeros(num_videos, probs.shape[1], dtype=torch.float64)
    merged.index_add_(0, videos, probs[rows].double())
    views = torch.zeros(num_videos, dtype=torch.float64)
    views.index_add_(0, videos, torch.ones(len(rows), dtype=torch.float64))
    return merged / views.clamp(min=1)[:, None], views > 0


def score(probs, labels, scored):
    """top-1, top-5 and mean class accuracy of the videos where `scored` (num_videos,) is True;
    probs may be any class scores (softmax, k-NN votes)."""
    pred = probs.argmax(1)
    top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
    correct = (pred == labels)[scored]
    labels_seen = labels[scored]
    in_top5 = (top5 == labels[:, None]).any(1)[scored]
    per_class = [correct[labels_seen == c].float().mean().item()
                 for c in labels_seen.unique().tolist()]
    return {"top1": correct.float().mean().item(), "top5": in_top5.float().mean().item(),
            "mean_class_acc": float(np.mean(per_class)), "num_videos": int(scored.sum())}


# ----------------------------------------------------------------- a classifier: multi-view testing

def predict_and_score(net, dataset, args, ctx, want_probs=False):
    """Every view of every video through the model, softmax averaged per video, across all
    processes. A video that cannot be read is not scored (its item holds another video's views):
    counted as unreadable, named."""
    net.eval()
    probs, seen, unreadable = per_video(lambda clips: net(clips).float().softmax(-1), dataset,
                                        args, ctx)
    net.train()
    labels = torch.tensor([label for _, label in dataset.samples])
    scores = score(probs, labels, seen & ~unreadable)
    scores["views"] = dataset.segments * dataset.crops
    scores["unreadable"] = int(unreadable.sum())
    unreadable_videos = unreadable.nonzero()[:, 0].tolist()
    scores["unreadable_files"] = [dataset.samples[i][0] for i in unreadable_videos]
    if want_probs:
        return scores, probs.argmax(1), labels
    return scores


def predict_videos(net, dataset, names, args, ctx):
    """--predict: each video's top-5 classes by name, from its views' averaged softmax; printed and
    written to predictions.jsonl. An unreadable video gets one line; the others still run."""
    net.eval()
    records = []
    for i, (video, _) in enumerate(dataset.samples):
        try:
            views = torch.from_numpy(dataset._load(i))  # (V, T, H, W, 3); raises, never substitutes
        except data.VideoReadError as error:
            ctx.print(f"{error}; skipped")
            records.append({"video": video, "error": str(error)})
            continue
        with torch.no_grad(), autocast(args, ctx):
            logits = torch.cat([net(data.normalize(v.to(ctx.device)))
                                for v in views.split(args.batch_size)])
        probs = logits.float().softmax(-1).mean(0)  # the views' probabilities averaged
        top = probs.topk(min(5, len(probs)))
        top5 = [[class_name(names, c), p] for p, c in zip(top.values.tolist(), top.indices.tolist())]
        ctx.print(f"{video}: " + ", ".join(f"{name} {p:.1%}" for name, p in top5))
        records.append({"video": video, "top5": top5})
    path = os.path.join(args.output_dir, "predictions.jsonl")
    os.makedirs(args.output_dir, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    ctx.print(f"wrote {path}")


def multi_view_test(net, dataset, args, ctx, run, classes):
    """Test: scores printed and logged, confusion.png (confusion-evalN.png by an evaluation)."""
    scores, pred, labels = predict_and_score(net, dataset, args, ctx, want_probs=True)
    line = (f"test on {scores['num_videos']} videos x {scores['views']} views: "
            f"top-1 {scores['top1']:.2%}, top-5 {scores['top5']:.2%}, "
            f"mean class accuracy {scores['mean_class_acc']:.2%}")
    if scores["unreadable"]:
        line += (f"; {scores['unreadable']} unreadable, not scored: "
                 f"{', '.join(scores['unreadable_files'])}")
    ctx.print(line)
    run.folder.log({"test": scores})
    name = "confusion.png"
    if run.optimizer is None:
        k = 1  # an evaluation never replaces the training run's picture, nor an earlier one's
        while os.path.exists(os.path.join(args.output_dir, f"confusion-eval{k}.png")):
            k += 1
        name = f"confusion-eval{k}.png"
    path = os.path.join(args.output_dir, name)
    if ctx.main:
        names = [class_name(classes, c) for c in range(args.nb_classes)]
        confusion_png(pred, labels, names, path)
        ctx.print(f"confusion matrix: {path}")
    return scores


def class_name(names, label):
    return names[label] if label < len(names) else f"class {label}"


def confusion_png(pred, labels, names, path, listed=30):
    """The confusion matrix picture (plots.confusion): each cell the share of the true class's test
    videos; the `listed` most-confused pairs beside it."""
    K = len(names)
    counts = np.zeros((K, K), np.int64)
    np.add.at(counts, (labels.numpy(), pred.numpy()), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # (true, predicted); rows sum to 1
    confused = zip(*np.nonzero(counts * (1 - np.eye(K, dtype=np.int64))))
    pairs = sorted(confused, key=lambda tp: -share[tp])[:listed]
    write_png(path, plots.confusion(share, counts, names, pairs))


# ------------------------------------------------------------------ frozen features: the k-NN probe

def knn_classify(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07):
    """Weighted k-NN on cosine similarity (as in InstDisc and DINO): each test video's k most
    similar training videos vote for their class with weight exp(similarity / temperature). Returns
    votes (num_test, num_classes)."""
    similarity = F.normalize(test_features, dim=1) @ F.normalize(train_features, dim=1).T  # (M, N)
    top, neighbour = similarity.topk(min(k, len(train_labels)), dim=1)  # (M, k)
    votes = torch.zeros(len(test_features), num_classes, dtype=similarity.dtype)
    return votes.scatter_add_(1, train_labels[neighbour], (top / temperature).exp())


def frozen_features(encoder, samples, args, ctx, frames=None):
    """The frozen encoder's features of one centre clip per video (Encoder.features: the last
    block's outputs, mean-pooled), as both probes and --features take them. `frames`: videos already
    decoded in memory ({path: frames}, VideoDataset.frames), not decoded again. Returns the
    readable videos' features (n, D) float32 and labels (n,), and which videos those are."""
    dataset = data.VideoDataset(samples, "test", args.num_frames, args.sampling_rate,
                                args.input_size, test_num_segment=1, test_num_crop=1)
    dataset.frames = frames or {}
    encoder.eval()
    values, seen, unreadable = per_video(encoder.features, dataset, args, ctx)
    encoder.train()
    labels = torch.tensor([label for _, label in samples])
    usable = seen & ~unreadable
    return values[usable].float(), labels[usable], usable


def knn_probe(encoder, train_samples, test_samples, args, ctx, k=20, frames=None):
    """Score a frozen encoder: k-NN from the training videos' frozen_features to the test videos'.
    Returns {"top1", "top5", "k", "num_videos"}."""
    train_x, train_y, _ = frozen_features(encoder, train_samples, args, ctx, frames)
    test_x, test_y, _ = frozen_features(encoder, test_samples, args, ctx, frames)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    votes = knn_classify(train_x, train_y, test_x, num_classes, k)
    scores = score(votes, test_y, torch.ones(len(test_y), dtype=torch.bool))
    return {"top1": scores["top1"], "top5": scores["top5"], "k": min(k, len(train_y)),
            "num_videos": len(test_y)}


# MAE's linear probe (main_linprobe.py) on cached features: BatchNorm without affine parameters, a
# linear layer, no weight decay, 90 epochs, warmup 10, cosine. Its LARS serves a batch of 16384
# images; for a few thousand cached videos, SGD with momentum at MAE's base lr (README).
def linear_probe(train_x, train_y, test_x, test_y, seed=0, epochs=90, warmup_epochs=10,
                 batch_size=256, lr=0.1):
    """Train BatchNorm1d(affine=False) then Linear on frozen features (n, D), classes train_y, with
    cross-entropy; BatchNorm only standardises each feature, so the probe stays linear and nothing
    of the encoder moves. Returns {"top1", "top5", "epochs", "num_videos"} on the test features."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    dim = train_x.shape[1]
    # momentum None: the test's statistics average every step's, exact after the few of a small set
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(dim, eps=1e-6, momentum=None, affine=False),
                                torch.nn.Linear(dim, num_classes))
    torch.nn.init.trunc_normal_(probe[1].weight, std=0.01, generator=generator)  # as MAE's head
    torch.nn.init.zeros_(probe[1].bias)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    schedule = SimpleNamespace(lr=lr, min_lr=0.0, warmup_epochs=warmup_epochs, epochs=epochs)
    steps = math.ceil(len(train_x) / batch_size)  # batches of an epoch, of (nearly) equal sizes
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for step, batch in enumerate(order.tensor_split(steps)):
            optimizer.param_groups[0]["lr"] = lr_at(epoch + step / steps, schedule)
            loss = F.cross_entropy(probe(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    probe.eval()
    with torch.no_grad():
        probs = probe(test_x).softmax(-1)
    scores = score(probs, test_y, torch.ones(len(test_y), dtype=torch.bool))
    return {"top1": scores["top1"], "top5": scores["top5"], "epochs": epochs,
            "num_videos": len(test_y)}


def features_and_linear_probe(encoder, splits, args, ctx, run):
    """--features: features.npz in the output folder, the frozen_features of every readable video
    of both splits ({"train": samples, "test": samples}): features (n, D) float32, labels, paths and
    split. --linprobe: linear_probe from the training videos to the test videos, printed and
    logged."""
    parts = {}
    for split, samples in splits.items():
        features, labels, usable = frozen_features(encoder, samples, args, ctx)
        readable = usable.tolist()
        paths = [path for (path, _), ok in zip(samples, readable) if ok]
        if len(paths) < len(samples):
            ctx.print(f"{len(samples) - len(paths)} unreadable {split} videos left out: "
                      + ", ".join(path for (path, _), ok in zip(samples, readable) if not ok))
        parts[split] = (features, labels, paths)
    if args.features and ctx.main:
        arrays = {"features": torch.cat([f for f, _, _ in parts.values()]).numpy(),
                  "labels": torch.cat([y for _, y, _ in parts.values()]).numpy(),
                  "paths": np.array([p for _, _, paths in parts.values() for p in paths]),
                  "split": np.array([s for s, (_, _, paths) in parts.items() for _ in paths])}
        path = os.path.join(args.output_dir, "features.npz")
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
        n, dim = arrays["features"].shape
        ctx.print(f"wrote {path}: {n} videos x {dim} features, "
                  + ", ".join(f"{s} {len(part[2])}" for s, part in parts.items()))
    if args.linprobe:
        (train_x, train_y, _), (test_x, test_y, _) = parts["train"], parts["test"]
        scores = linear_probe(train_x, train_y, test_x, test_y, seed=args.seed)
        ctx.print(f"linear probe ({scores['epochs']} epochs on {len(train_y)} training videos' "
                  f"features) on {scores['num_videos']} test videos: top-1 {scores['top1']:.2%}, "
                  f"top-5 {scores['top5']:.2%}")
        run.folder.log({"linprobe": scores})


# ------------------------------------------------------------- a pre-training model: reconstruction


def yardsticks(net, video, mask):
    """The losses of the two trivial predictors on the hidden tokens of normalised clips (B, 3, T,
    H, W) with `mask`, in the model's loss space: [mean_visible, nearest_visible]."""
    enc = net.encoder
    patches = models.patchify(video, enc.tubelet_size, enc.patch_size).float()
    target = models.reconstruction_target(patches, net.norm_pix_loss)
    hidden = models.gather(target, models.split_tokens(mask)[1])  # (B, N_hid, P*C)
    mean_visible, nearest_visible = masks.trivial_predictions(target, mask, enc.grid)
    return [F.mse_loss(mean_visible, hidden).item(), F.mse_loss(nearest_visible, hidden).item()]


def reconstruction_scores(net, samples, args, ctx, most=256):
    """Mean squared error on held-out videos (one centre clip of each of at most `most`, fixed
    masks) of the model and of the two trivial predictors on the same clips and masks: the model
    must beat both to have learnt anything of videos. Returns recon_val, recon_val_mean_visible,
    recon_val_nearest_visible."""
    subset = samples[::max(1, len(samples) // most)]
    dataset = data.VideoDataset(subset, "test", args.num_frames, args.sampling_rate,
                                args.input_size, test_num_segment=1, test_num_crop=1)
    loader, _ = data.make_loader(dataset, args, ctx, train=False)
    net.eval()
    enc = net.encoder
    generator = torch.Generator(ctx.device).manual_seed(0)
    sums = torch.zeros(4, dtype=torch.float64)  # model, mean visible, nearest visible, clips
    with torch.no_grad():
        for video, *_ in loader:
            video = data.normalize(video.to(ctx.device).flatten(0, 1))  # (B, 3, T, H, W)
            B = video.shape[0]
            mask = masks.MASKS[args.mask_type](B, enc.grid, args.mask_ratio, generator=generator,
                                               device=ctx.device)
            with autocast(args, ctx):
                loss = net(video, mask)[0].float()
            losses = [loss.item(), *yardsticks(net, video, mask)]
            sums += torch.tensor(losses + [1.0]) * B
    net.train()
    model_loss, mean_loss, nearest_loss, clips = all_sum(sums.tolist(), ctx)
    return {"recon_val": model_loss / clips, "recon_val_mean_visible": mean_loss / clips,
            "recon_val_nearest_visible": nearest_loss / clips}


def reconstruction_png(net, clip, args, ctx, path):
    """Original frames / masked input / reconstruction of one clip, one row each, every second
    frame. With norm_pix_loss the model predicts each hidden tubelet's pixels normalised by that
    tubelet's own mean and std; to draw them we re-use the true tubelet's mean and std, as the
    reference code does: colours and brightness of the hidden patches are then borrowed from the
    original; only the structure is the model's. Returns the losses on that clip and mask: the
    model's, then the yardsticks'."""
    net.eval()
    enc = net.encoder
    video = data.normalize(clip.to(ctx.device))  # (1, 3, T, H, W)
    generator = torch.Generator().manual_seed(0)
    mask = masks.MASKS[args.mask_type](1, enc.grid, args.mask_ratio, generator=generator)
    mask = mask.to(ctx.device)
    with torch.no_grad(), autocast(args, ctx):
        loss, pred = net(video, mask)
    patches = models.patchify(video, enc.tubelet_size, enc.patch_size).float()  # (1, N, P*C)
    pixels = models.reconstruction_target(patches, norm_pix_loss=False)  # in [0, 1]
    masked = torch.where(mask[..., None], torch.full_like(pixels, 0.5), pixels)  # hidden ones grey
    rebuilt = pixels.clone()
    hidden = pixels[mask].unflatten(-1, (-1, 3))  # (n, P, 3)
    p = pred[0].float().unflatten(-1, (-1, 3))
    if net.norm_pix_loss:
        p = p * (hidden.var(dim=-2, keepdim=True).sqrt() + 1e-6) + hidden.mean(dim=-2, keepdim=True)
    rebuilt[mask] = p.flatten(-2).clamp(0, 1)
    frames = []
    for row in (pixels, masked, rebuilt):
        clip_row = models.unpatchify(row, enc.grid, enc.tubelet_size, enc.patch_size)[0, :, ::2]
        frames.append(clip_row.permute(1, 2, 3, 0).cpu().numpy())  # clip_row (3, T/2, H, W)
    if net.norm_pix_loss:
        how = "hidden patches drawn with the true patch mean and std"
    else:
        how = "hidden patches as predicted"
    caption = f"top: original; middle: encoder input; bottom: rebuilt, {how}"
    write_png(path, plots.film_strip(frames, caption))
    net.train()
    return [loss.item(), *yardsticks(net, video, mask)]


_WIDTHS = ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth")  # what its tensors show


_TAKEN = ("input_size", "num_frames", "sampling_rate", "mask_ratio", "no_norm_pix_loss")


def _sizes_text(sizes):
    return "encoder {} wide, {} blocks; decoder {} wide, {} blocks".format(*sizes)


def pretraining_config(path, preset=None):
    """What --init and --reconstruct need of a pre-training checkpoint (any format load_checkpoint
    reads): 'model', the preset of its tensors' sizes, and what its configuration says (this
    project's, the reference's saved flags, or config.json beside HuggingFace weights) of _TAKEN.
    CheckpointError, one line: no checkpoint, no decoder (a classifier's), sizes of no preset or
    not of `preset`."""
    ckpt = read_file(path)
    sd = canonical_weights(ckpt)
    if not any(k.startswith(DECODER_KEYS) for k in sd):
        raise CheckpointError(f"{path} has no decoder, only an encoder (a fine-tuned classifier?): "
                         f"give pre-training weights, encoder and decoder")

    def blocks(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    widths = [sd[k].shape[0] if k in sd else None
              for k in ("encoder.patch_embed.proj.weight", "encoder_to_decoder.weight")]
    sizes = (widths[0], blocks("encoder.blocks."), widths[1], blocks("decoder.blocks."))
    found = [name for name, p in models.PRESETS.items() if sizes == tuple(p[k] for k in _WIDTHS)]
    if not found:
        raise CheckpointError(f"{path}: {_sizes_text(sizes)}: no preset of model.py has these sizes")
    if preset and found[0] != preset:
        wanted = _sizes_text([models.PRESETS[preset][k] for k in _WIDTHS])
        raise CheckpointError(f"{path} holds a '{found[0]}' model ({_sizes_text(sizes)}), this run "
                         f"builds '{preset}' ({wanted}): give --model {found[0]}")
    saved = ckpt.get("args")  # the reference's flags, an argparse.Namespace
    saved = dict(vars(saved)) if isinstance(saved, argparse.Namespace) else checkpoint_config(path)
    if "normlize_target" in saved:  # the reference's spelling of the normalised-pixel target
        saved["no_norm_pix_loss"] = not saved["normlize_target"]
    return {"model": found[0], **{k: saved[k] for k in _TAKEN if saved.get(k) is not None}}


def load_pretraining(net, path):
    """Every tensor of the VideoMAE `net`, encoder and decoder, from a checkpoint that
    pretraining_config accepted (load_checkpoint refuses one that would leave any at random);
    returns the line that says so."""
    load_checkpoint(net, path, verbose=False)
    total = len(net.state_dict())
    return f"loaded {total}/{total} tensors, encoder and decoder, from {path}"


def reconstruct(args, ctx):
    """--reconstruct: the centre clip of each video (the test's middle clip, centre crop) through
    the pre-training model of --init, masked as the pictures of pre-training are: recon-NAME.png in
    --output_dir and a line with the reconstruction loss beside the two trivial predictors'. An
    unreadable video gets one line; the others still run."""
    flags = [f"--{k} {v}" for k, v in args.inherited.items() if not isinstance(v, bool)]
    if "no_norm_pix_loss" in args.inherited:  # the loss target: plain or normalised pixels
        flags.append("--no_norm_pix_loss" if args.no_norm_pix_loss else "--norm_pix_loss")
    if flags:
        ctx.print("from the checkpoint: " + ", ".join(flags))
    net = models.build_model("pretrain", args.model, img_size=args.input_size,
                             num_frames=args.num_frames, norm_pix_loss=not args.no_norm_pix_loss)
    ctx.print(load_pretraining(net, args.init))
    net = net.to(ctx.device)
    videos = [(video, -1) for video in args.reconstruct]
    dataset = data.VideoDataset(videos, "test", args.num_frames, args.sampling_rate,
                                args.input_size, test_num_segment=1, test_num_crop=1)
    names = [os.path.splitext(os.path.basename(video))[0] for video in args.reconstruct]
    if len(set(names)) < len(names):  # the same name in two folders: numbered
        names = [f"{i}-{name}" for i, name in enumerate(names)]
    os.makedirs(args.output_dir, exist_ok=True)
    for i, video in enumerate(args.reconstruct):
        try:
            clip = torch.from_numpy(dataset._load(i))  # (1, T, H, W, 3); raises, never substitutes
        except data.VideoReadError as error:
            ctx.print(f"{error}; skipped")
            continue
        path = os.path.join(args.output_dir, f"recon-{names[i]}.png")
        model_loss, mean_loss, nearest_loss = reconstruction_png(net, clip, args, ctx, path)
        ctx.print(f"{video}: reconstruction loss {model_loss:.4f}, mean of visible "
                  f"{mean_loss:.4f}, nearest visible {nearest_loss:.4f}; {path}")
