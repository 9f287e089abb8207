"""Fine-tune a VideoViT on labelled videos and evaluate it with multi-view testing.

    python finetune.py       # the tiny model on the demo videos, from the demo pre-training if there is one
    torchrun --nproc_per_node=8 finetune.py --data_path UCF-101 --data_set UCF101 --model base \
        --finetune runs/pretrain-UCF101/checkpoint-latest.pth
    python finetune.py --eval --finetune model.pth --data_path ...   # test only: top-1, top-5, mean class accuracy

Training, checkpoints, resuming and logging work as in pretrain.py (whose shared half this script uses).
"""
import os

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import model as models
from pretrain import (Run, all_sum, atomic_write, autocast, common_parser, finish_args, make_loader, param_groups,
                      resume_path, setup, start_epoch, train_epoch, training_subset, wrap)

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
    args = finish_args(parser, argv, PAPER, DEMO)
    if args.eval and not (args.finetune or args.resume):
        parser.error("--eval needs the weights to test: --finetune PATH or --resume PATH")
    for name in ("finetune", "resume"):
        if getattr(args, name) not in (None, "none") and not os.path.isfile(getattr(args, name)):
            parser.error(f"--{name} {getattr(args, name)} is not a file")
    ctx = setup(args)

    train_samples, classes = data.load_samples(args.data_path, args.data_set, args.split, train=True)
    train_samples = training_subset(train_samples, args)
    test_samples, _ = data.load_samples(args.data_path, args.data_set, args.split, train=False)
    args.nb_classes = args.nb_classes or len(classes)
    labels = [label for _, label in train_samples + test_samples]
    if min(labels) < 0 or max(labels) >= args.nb_classes:
        parser.error(f"labels of {args.data_path} span {min(labels)}..{max(labels)}; --nb_classes {args.nb_classes} does not fit")
    resuming = None if args.eval else resume_path(args)  # a training run's checkpoint: its weights replace any others
    weights = None if resuming else args.finetune or (args.resume if args.eval else None)
    if weights is None and args.demo and not resuming and os.path.exists(DEMO_PRETRAINED):
        weights = DEMO_PRETRAINED
    weights = None if weights == "none" else weights
    if resuming or weights:  # this project's checkpoints say what they hold
        saved = models.read_file(resuming or weights).get("config") or {}
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
    elif not resuming:
        ctx.print("no --finetune checkpoint: training from scratch")
    net.to(ctx.device)
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
    loader, sampler = make_loader(train_set, args, ctx, train=True)
    run = Run(args, ctx, net, optimizer, train_set)
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
    """Every view of every video through the model, softmax averaged per video, across all processes. A video
    that cannot be read is not scored (its item holds another video's views): counted as unreadable, named."""
    net.eval()
    loader, _ = make_loader(dataset, args, ctx, train=False)
    idx, out, unreadable = [], [], torch.zeros(len(dataset))
    with torch.no_grad():
        for video, _, index, substituted, _ in loader:
            B, V = video.shape[:2]
            with autocast(args, ctx):
                logits = net(data.normalize(video.to(ctx.device, non_blocking=True).flatten(0, 1)))
            out.append(logits.float().softmax(-1).view(B, V, -1).cpu())
            idx.append(torch.stack([index[:, None].expand(B, V), torch.arange(V).expand(B, V)], -1))
            unreadable[index[substituted > 0]] = 1
    net.train()
    idx, out = gather(torch.cat(idx).flatten(0, 1), ctx), gather(torch.cat(out).flatten(0, 1), ctx)  # (rows, 2), (rows, C)
    probs, seen = merge_views(idx, out, len(dataset))
    unreadable = torch.tensor(all_sum(unreadable.tolist(), ctx)) > 0  # (num_videos,) of every process
    labels = torch.tensor([label for _, label in dataset.samples])
    scores = score(probs, labels, seen & ~unreadable)
    scores.update(views=V, unreadable=int(unreadable.sum()),
                  unreadable_files=[dataset.samples[i][0] for i in unreadable.nonzero()[:, 0].tolist()])
    return (scores, probs.argmax(1), labels) if want_probs else scores


def score(probs, labels, scored):
    """top-1, top-5 and mean class accuracy of the videos where `scored` (num_videos,) is True."""
    pred, top5 = probs.argmax(1), probs.topk(min(5, probs.shape[1]), dim=1).indices
    correct, labels_seen = (pred == labels)[scored], labels[scored]
    in_top5 = (top5 == labels[:, None]).any(1)[scored]
    per_class = [correct[labels_seen == c].float().mean().item() for c in labels_seen.unique().tolist()]
    return {"top1": correct.float().mean().item(), "top5": in_top5.float().mean().item(),
            "mean_class_acc": float(np.mean(per_class)), "num_videos": int(scored.sum())}


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
              f"top-5 {scores['top5']:.2%}, mean class accuracy {scores['mean_class_acc']:.2%}"
              + (f"; {scores['unreadable']} unreadable, not scored: {', '.join(scores['unreadable_files'])}"
                 if scores["unreadable"] else ""))
    run.log({"test": scores})
    name = "confusion.png"
    if run.optimizer is None:  # an evaluation never replaces the training run's picture, nor an earlier evaluation's
        k = 1
        while os.path.exists(os.path.join(args.output_dir, f"confusion-eval{k}.png")):
            k += 1
        name = f"confusion-eval{k}.png"
    path = os.path.join(args.output_dir, name)
    if ctx.main:
        confusion_png(pred, labels, len(classes) if classes else args.nb_classes, path)
        ctx.print(f"confusion matrix: {path}")
    return scores


def confusion_png(pred, labels, num_classes, path):
    """Row = true class, column = predicted; each row scaled to its own count (white 0, black all)."""
    cm = np.zeros((num_classes, num_classes))
    np.add.at(cm, (labels.numpy(), pred.numpy()), 1)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    cell = max(4, 600 // num_classes)
    img = cv2.resize((255 * (1 - cm)).astype(np.uint8), None, fx=cell, fy=cell, interpolation=cv2.INTER_NEAREST)
    atomic_write(path, lambda tmp: cv2.imwrite(tmp, img), suffix=".png")


if __name__ == "__main__":
    main()
