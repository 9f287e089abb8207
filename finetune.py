"""Fine-tune a VideoViT on labelled videos and evaluate it with multi-view testing.

    python finetune.py       # the tiny model on the demo videos, from the demo pre-training if there is one
    torchrun --nproc_per_node=8 finetune.py --data_path UCF-101 --data_set UCF101 --model base \
        --finetune runs/pretrain-UCF101/checkpoint-latest.pth
    python finetune.py --eval --finetune model.pth --data_path ...   # test only: top-1, top-5, mean class accuracy

Training, checkpoints, resuming and logging work as in pretrain.py (whose shared half this script uses).
"""
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import model as models
from pretrain import (Context, Run, all_sum, atomic_write, autocast, common_parser, finish_args, make_loader,
                      param_groups, put, setup, start_epoch, text_width, train_epoch, training_subset, wrap)

# Reference UCF101 recipe (blr 5e-4, layer decay 0.7, drop path 0.2, 100 epochs, 5 clips x 3 crops at test).
PAPER = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=8, epochs=100,
             warmup_epochs=5, blr=5e-4, num_sample=2, save_ckpt_freq=10, layer_decay=0.7, drop_path=0.2, no_flip=False)
DEMO = dict(model="tiny", input_size=96, num_frames=8, sampling_rate=4, batch_size=8, epochs=30,
            warmup_epochs=3, blr=1e-2, num_sample=2, save_ckpt_freq=10, layer_decay=0.75, drop_path=0.1,
            no_flip=True)  # the demo's classes are directions: a mirrored clip would change its class
DEMO_PRETRAINED = "runs/pretrain-demo/checkpoint-latest.pth"
SIZE_KEYS = ("model", "input_size", "num_frames", "sampling_rate")  # taken from a checkpoint when not given


def main(argv=None):
    parser = common_parser(__doc__, PAPER, DEMO)
    arg = parser.add_argument
    arg("--nb_classes", type=int, help="number of classes (default: from the data)")
    arg("--finetune", help="initial weights: this project's, the reference's or HuggingFace's checkpoint; "
                           "'none' trains from scratch (default: the demo pre-training, for the demo set)")
    arg("--layer_decay", type=float, help=f"layer-wise lr decay (paper {PAPER['layer_decay']})")
    arg("--drop_path", type=float, help=f"stochastic depth rate (paper {PAPER['drop_path']})")
    arg("--head_drop_rate", type=float, default=0.0, help="dropout before the head")
    arg("--smoothing", type=float, default=0.1, help="label smoothing")
    arg("--mixup", type=float, default=0.8, help="mixup alpha; 0 = off")
    arg("--cutmix", type=float, default=1.0, help="cutmix alpha; 0 = off")
    arg("--mixup_prob", type=float, default=1.0, help="probability of mixing a batch")
    arg("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    arg("--aa", default="rand-m7-n4-mstd0.5-inc1", help="RandAugment policy, or 'none'")
    arg("--reprob", type=float, default=0.25, help="random erasing probability")
    arg("--no_flip", action="store_true", default=None,
        help="no horizontal flip, for classes that name a direction (default: flip, but not on the demo set)")
    arg("--sampling", choices=["i3d", "segment"], default="i3d", help="frame sampling: i3d (UCF/HMDB/K400), segment (SSv2)")
    arg("--test_num_segment", type=int, default=5, help="clips per test video")
    arg("--test_num_crop", type=int, default=3, help="crops per test clip")
    arg("--eval", action="store_true", help="only test the weights of --finetune or --resume")
    arg("--predict", nargs="+", metavar="VIDEO", help="print the top-5 classes of each video (multi-view test) "
                                                       "with the weights of --finetune; needs no data set")
    args = finish_args(parser, argv, PAPER, DEMO)
    if (args.eval or args.predict) and (args.finetune or args.resume) in (None, "none"):
        parser.error(f"--{'predict' if args.predict else 'eval'} needs the weights to test: --finetune PATH or --resume PATH")
    for name in ("finetune", "resume"):
        if getattr(args, name) not in (None, "none") and not os.path.isfile(getattr(args, name)):
            parser.error(f"--{name} {getattr(args, name)} is not a file")
    if args.predict:
        return predict(args, Context(args))
    ctx = setup(args)

    train_samples, classes = data.load_samples(args.data_path, args.data_set, args.split, train=True)
    train_samples = training_subset(train_samples, args)
    test_samples, _ = data.load_samples(args.data_path, args.data_set, args.split, train=False)
    args.nb_classes = args.nb_classes or len(classes)
    args.classes = classes  # saved in every checkpoint's config: --predict names its classes
    labels = [label for _, label in train_samples + test_samples]
    if min(labels) < 0 or max(labels) >= args.nb_classes:
        parser.error(f"labels of {args.data_path} span {min(labels)}..{max(labels)}; --nb_classes {args.nb_classes} does not fit")
    weights = args.finetune or (args.resume if args.eval else None)
    if weights is None and args.demo and os.path.exists(DEMO_PRETRAINED):
        weights = DEMO_PRETRAINED
    weights = None if weights == "none" else weights
    net, _ = build_classifier(args, weights, ctx)
    test_set = data.VideoDataset(test_samples, "test", args.num_frames, args.sampling_rate, args.input_size,
                                 sampling=args.sampling, test_num_segment=args.test_num_segment,
                                 test_num_crop=args.test_num_crop, seed=args.seed)
    if args.eval:
        run = Run(args, ctx, net, None)
        evaluate(net, test_set, args, ctx, run, classes)
        return run.close()

    train_set = data.VideoDataset(train_samples, "train", args.num_frames, args.sampling_rate, args.input_size,
                                  num_sample=args.num_sample, sampling=args.sampling, flip=not args.no_flip,
                                  aa=None if args.aa == "none" else args.aa, reprob=args.reprob, seed=args.seed)
    val_set = data.VideoDataset(test_samples, "test", args.num_frames, args.sampling_rate, args.input_size,
                                sampling=args.sampling, test_num_segment=1, test_num_crop=1, seed=args.seed)
    optimizer = torch.optim.AdamW(param_groups(net, args.weight_decay, args.layer_decay), lr=args.lr,
                                  betas=(0.9, 0.999), fused=True)
    run = Run(args, ctx, net, optimizer)
    loader, sampler = make_loader(train_set, args, ctx, train=True)
    model = wrap(net, args, ctx)
    for epoch in range(run.start_epoch, args.epochs):
        gen = start_epoch(epoch, sampler, args, ctx)

        def step(video, labels):
            video, target = mix(video, labels, args.nb_classes, args, gen)
            return soft_cross_entropy(model(video), target)

        stats = train_epoch(model, loader, optimizer, run, epoch, step, args, ctx)
        stats["val_top1"] = predict_and_score(net, val_set, args, ctx)["top1"]
        run.end_epoch(epoch, stats)
    evaluate(net, test_set, args, ctx, run, classes)
    run.close()


def build_classifier(args, weights, ctx):
    """The VideoViT with `weights` loaded (None: from scratch), on the device. Model size, input size, frames and
    stride not given as flags come from the checkpoint's configuration. Returns (net, that configuration)."""
    saved = models.checkpoint_config(weights) if weights else {}
    inherited = {k: saved[k] for k in SIZE_KEYS if k in saved and k in args.recipe_defaults}
    if inherited:
        vars(args).update(inherited)
        ctx.print("from the checkpoint's config: " + ", ".join(f"--{k} {v}" for k, v in inherited.items()))
    net = models.build_model("finetune", args.model, num_classes=args.nb_classes, img_size=args.input_size,
                             num_frames=args.num_frames, drop_path_rate=args.drop_path,
                             head_drop_rate=args.head_drop_rate)
    net.grad_checkpointing = args.grad_ckpt
    if weights:
        ctx.print(f"initial weights: {weights}")
        models.load_checkpoint(net, weights, verbose=ctx.main)
    else:
        ctx.print("no --finetune checkpoint: training from scratch")
    return net.to(ctx.device), saved


def class_name(names, label):
    return names[label] if label < len(names) else f"class {label}"


def predict(args, ctx):
    """--predict: each video's top-5 classes by name, from its test_num_segment x test_num_crop views' averaged
    softmax; printed, and written to predictions.jsonl. An unreadable video gets one line; the others still run."""
    weights = args.finetune or args.resume
    head = models.canonical_weights(models.read_file(weights)).get("head.bias")
    if head is None:
        sys.exit(f"{weights} has no classification head (a pre-training checkpoint): fine-tune it first, "
                 f"python finetune.py --finetune {weights} --data_path YOUR_DATA, then predict with that checkpoint")
    args.nb_classes = len(head)
    net, saved = build_classifier(args, weights, ctx)
    net.eval()
    names = saved.get("classes") or []
    dataset = data.VideoDataset([(video, -1) for video in args.predict], "test", args.num_frames, args.sampling_rate,
                                args.input_size, sampling=args.sampling, test_num_segment=args.test_num_segment,
                                test_num_crop=args.test_num_crop, seed=args.seed)
    records = []
    for i, video in enumerate(args.predict):
        try:
            views = torch.from_numpy(dataset._load(i))  # (V, T, H, W, 3); raises where __getitem__ would substitute
        except data.VideoReadError as error:
            ctx.print(f"{error}; skipped")
            records.append({"video": video, "error": str(error)})
            continue
        with torch.no_grad(), autocast(args, ctx):
            logits = torch.cat([net(data.normalize(v.to(ctx.device))) for v in views.split(args.batch_size)])
        top = logits.float().softmax(-1).mean(0).topk(min(5, args.nb_classes))  # the views' probabilities averaged
        top5 = [[class_name(names, c), p] for p, c in zip(top.values.tolist(), top.indices.tolist())]
        ctx.print(f"{video}: " + ", ".join(f"{name} {p:.1%}" for name, p in top5))
        records.append({"video": video, "top5": top5})
    path = os.path.join(args.output_dir, "predictions.jsonl")
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))
    ctx.print(f"wrote {path}")


# ----------------------------------------------------------------------------- mixup / cutmix with soft targets

def mix(video, labels, num_classes, args, gen):
    """Mixup or CutMix over the batch (partner = the batch reversed), with label-smoothed soft targets.
    CutMix cuts the same box out of every frame. Returns (video, targets (B, num_classes) summing to one)."""
    off = args.smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, device=video.device)
    target.scatter_(1, labels[:, None], 1.0 - args.smoothing + off)
    use = (args.mixup > 0 or args.cutmix > 0) and torch.rand((), generator=gen, device=gen.device) < args.mixup_prob
    if not use:
        return video, target
    cut = args.cutmix > 0 and (args.mixup == 0 or torch.rand((), generator=gen, device=gen.device) < args.mixup_switch_prob)
    alpha = args.cutmix if cut else args.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # global RNG, seeded per epoch
    if cut:
        H, W = video.shape[-2:]
        h, w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy, cx = (int(torch.randint(s, (), generator=gen, device=gen.device)) for s in (H, W))
        y0, y1, x0, x1 = max(cy - h // 2, 0), min(cy + h // 2, H), max(cx - w // 2, 0), min(cx + w // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the share of pixels actually kept
    else:
        video = video * lam + video.flip(0) * (1 - lam)
    return video, target * lam + target.flip(0) * (1 - lam)


def soft_cross_entropy(logits, target):
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ----------------------------------------------------------------------------- multi-view testing

def merge_views(indices, probs, num_videos):
    """Average the softmax scores of every view of each video; `indices` name the video of each row. Rows
    repeated by a distributed sampler's padding are counted once. Returns (num_videos, C) and the count seen."""
    merged = torch.zeros(num_videos, probs.shape[1], dtype=torch.float64)
    views = torch.zeros(num_videos, dtype=torch.float64)
    unique_rows = {}
    for row, (i, view) in enumerate(indices.tolist()):
        unique_rows[(i, view)] = row  # the same (video, view) twice is the padding
    rows = torch.tensor(list(unique_rows.values()), dtype=torch.long)
    vids = indices[rows, 0]
    merged.index_add_(0, vids, probs[rows].double())
    views.index_add_(0, vids, torch.ones(len(rows), dtype=torch.float64))
    seen = views > 0
    return merged / views.clamp(min=1)[:, None], seen


def predict_and_score(net, dataset, args, ctx, want_probs=False):
    """Every view of every video through the model, softmax averaged per video, across all processes."""
    net.eval()
    loader, _ = make_loader(dataset, args, ctx, train=False)
    idx, out, substituted = [], [], 0
    with torch.no_grad():
        for video, _, index, subst in loader:
            B, V = video.shape[:2]
            with autocast(args, ctx):
                logits = net(data.normalize(video.to(ctx.device, non_blocking=True).flatten(0, 1)))
            out.append(logits.float().softmax(-1).view(B, V, -1).cpu())
            idx.append(torch.stack([index[:, None].expand(B, V), torch.arange(V).expand(B, V)], -1))
            substituted += int(subst.sum())
    net.train()
    idx, out = gather(torch.cat(idx).flatten(0, 1), ctx), gather(torch.cat(out).flatten(0, 1), ctx)  # (rows, 2), (rows, C)
    probs, seen = merge_views(idx, out, len(dataset))
    labels = torch.tensor([label for _, label in dataset.samples])
    pred, top5 = probs.argmax(1), probs.topk(min(5, probs.shape[1]), dim=1).indices
    correct, labels_seen = (pred == labels)[seen], labels[seen]
    per_class = [correct[labels_seen == c].float().mean().item() for c in labels_seen.unique().tolist()]
    scores = {"top1": correct.float().mean().item(),
              "top5": (top5 == labels[:, None]).any(1)[seen].float().mean().item(),
              "mean_class_acc": float(np.mean(per_class)), "num_videos": int(seen.sum()), "views": V,
              "substituted": int(all_sum([substituted], ctx)[0])}
    return (scores, pred, labels) if want_probs else scores


def gather(t, ctx):
    """Rows of every process, concatenated (each holds the same number: the sampler pads)."""
    if ctx.world == 1:
        return t
    parts = [torch.empty_like(t.to(ctx.device)) for _ in range(ctx.world)]
    dist.all_gather(parts, t.to(ctx.device))
    return torch.cat(parts).cpu()


def evaluate(net, dataset, args, ctx, run, classes):
    scores, pred, labels = predict_and_score(net, dataset, args, ctx, want_probs=True)
    ctx.print(f"test on {scores['num_videos']} videos x {scores['views']} views: top-1 {scores['top1']:.2%}, "
              f"top-5 {scores['top5']:.2%}, mean class accuracy {scores['mean_class_acc']:.2%}")
    run.log({"test": scores})
    if ctx.main:
        names = [class_name(classes, c) for c in range(args.nb_classes)]
        confusion_png(pred, labels, names, os.path.join(args.output_dir, "confusion.png"))
    return scores


def confusion_png(pred, labels, names, path, listed=30):
    """The confusion matrix as a picture that reads alone: true class down, predicted across, both named; each
    cell the share of the true class's test videos, in percent (blank: none); beside it, the most-confused pairs
    by name. Cells shrink with the class count, to 18 pixels for UCF101's 101 classes."""
    K = len(names)
    counts = np.zeros((K, K), np.int64)
    np.add.at(counts, (labels.numpy(), pred.numpy()), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # (true, predicted); each row sums to one
    cell = int(np.clip(1100 // K, 18, 64))
    font = min(0.5, cell / 60)
    grid = np.full((K * cell, K * cell, 3), 255, np.uint8)
    for t, p in zip(*np.nonzero(counts)):
        grid[t * cell:(t + 1) * cell, p * cell:(p + 1) * cell] = (255, 255 - 150 * share[t, p], 255 - 215 * share[t, p])
        put(grid, f"{100 * share[t, p]:.0f}", (p + 0.5) * cell, (t + 0.5) * cell + 11 * font, font,  # centred
            (255, 255, 255) if share[t, p] > 0.5 else (0, 0, 0), align=0.5)
    grid[::cell], grid[:, ::cell] = 200, 200  # lines between cells
    grid[-1], grid[:, -1] = 200, 200
    label_w = min(160, max(text_width(name, font) for name in names) + 8)  # longer names are cut
    off_diagonal = sorted(zip(*np.nonzero(counts * (1 - np.eye(K, dtype=np.int64)))), key=lambda tp: -share[tp])[:listed]
    band, title_h = 24, 56  # the axis titles' band, the title above
    top, left = title_h + band + label_w, band + label_w  # the grid's corner
    height = max(K * cell, 20 * len(off_diagonal) + 24)
    img = np.full((top + height + 10, max(left + K * cell + 420, 760), 3), 255, np.uint8)
    img[top:top + K * cell, left:left + K * cell] = grid
    img[top:top + K * cell, band:left] = name_strip(names, cell, label_w, font, align=1)
    img[title_h + band:top, left:left + K * cell] = cv2.rotate(name_strip(names, cell, label_w, font, align=0),
                                                                cv2.ROTATE_90_COUNTERCLOCKWISE)  # read bottom to top
    put(img, "predicted class", left + K * cell / 2, title_h + band - 8, 0.5, align=0.5)
    true_title = np.full((band, K * cell, 3), 255, np.uint8)
    put(true_title, "true class", K * cell / 2, band - 8, 0.5, align=0.5)
    img[top:top + K * cell, :band] = cv2.rotate(true_title, cv2.ROTATE_90_COUNTERCLOCKWISE)
    put(img, f"confusion on {counts.sum()} test videos, top-1 {np.trace(counts) / max(counts.sum(), 1):.1%}", 8, 20, 0.5)
    put(img, "row: true class; cell: % of its videos predicted as the column's class (blank: 0%)", 8, 42, 0.45)
    x, y = left + K * cell + 16, top + 14
    put(img, "most confused: true -> predicted, % of true", x, y, 0.45)
    for t, p in off_diagonal:
        y += 20
        put(img, f"{100 * share[t, p]:3.0f}%  {names[t]} -> {names[p]} ({counts[t, p]} of {counts[t].sum()})", x, y, 0.45)
    atomic_write(path, lambda tmp: cv2.imwrite(tmp, img), suffix=".png")


def name_strip(names, cell, width, font, align):
    """The class names one per cell-high row, cut to the width, ending at its right edge (align 1) or starting at
    its left edge (align 0)."""
    strip = np.full((len(names) * cell, width, 3), 255, np.uint8)
    for i, name in enumerate(names):
        while len(name) > 1 and text_width(name, font) > width - 6:
            name = name[:-1]
        put(strip, name, width - 4 if align else 4, (i + 0.5) * cell + 11 * font, font, align=align)
    return strip


if __name__ == "__main__":
    main()
