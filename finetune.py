"""Fine-tune a VideoViT on labelled videos and evaluate it with multi-view testing.

    python finetune.py       # the tiny model on the demo videos, from the demo pre-training if there is one
    torchrun --nproc_per_node=8 finetune.py --data_path UCF-101 --data_set UCF101 --model base \
        --finetune runs/pretrain-UCF101/checkpoint-latest.pth
    python finetune.py --eval --finetune model.pth --data_path ...   # test only: top-1, top-5, mean class accuracy

Training, checkpoints, resuming and logging work as in pretrain.py (whose shared half this script uses).
"""
import functools
import json
import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import data
import model as models
from weights import atomic_write, canonical_weights, checkpoint_config, load_checkpoint, read_file
from engine import (Context, Run, autocast, common_parser, finish_args, make_loader, param_groups, resume_path,
                    setup, start_epoch, train_epoch, training_subset, wrap)
from evaluate import class_name, knn_probe, multi_view_test, predict_and_score

# The reference's fine-tuning recipes (github.com/MCG-NJU/VideoMAE scripts/<data set>/..._epoch_<E>/finetune.sh,
# ViT-B; values the scripts leave out are run_class_finetuning.py's defaults), chosen as in pretrain.py.
K400 = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=8, epochs=100, warmup_epochs=5,
            blr=1e-3, min_blr=1e-6, num_sample=1, save_ckpt_freq=10, layer_decay=0.75, drop_path=0.1,
            head_drop_rate=0.0, no_flip=False, sampling="i3d", test_num_segment=5, test_num_crop=3,
            aa="rand-m7-n4-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, crop_scale=(0.08, 1.0), in_memory=False)
UCF101 = {**K400, "batch_size": 16, "blr": 5e-4, "min_blr": 1e-5, "num_sample": 2, "save_ckpt_freq": 50,
          "layer_decay": 0.7, "drop_path": 0.2, "head_drop_rate": 0.5}  # ucf101/..._epoch_3200, for 8 GPUs
RECIPES = {
    "K400": K400,  # kinetics/..._ratio_0.9_epoch_800, for 64 GPUs
    "SSv2": {**K400, "epochs": 50, "blr": 5e-4, "no_flip": True, "sampling": "segment",  # ssv2/..._epoch_800
             "test_num_segment": 2},
    "UCF101": UCF101,
    "HMDB51": UCF101,  # no script: the UCF101 script's values, the closest released recipe
}
# The demo: its classes name directions (no flips); its one object must stay in view (larger crops); light
# regularisation and no layer-wise decay (with 6 blocks and few steps it kept the pre-trained start at 42% on
# validation videos of another seed, 73% without; 91% and 90% from scratch): 6 classes learnt in minutes on a CPU.
DEMO = dict(model="mini", input_size=64, num_frames=8, sampling_rate=4, batch_size=16, epochs=35,
            warmup_epochs=3, blr=1.6e-2, num_sample=2, save_ckpt_freq=10, layer_decay=1.0, drop_path=0.1,
            no_flip=True, in_memory=True, aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, crop_scale=(0.4, 1.0))
DEMO_PRETRAINED = "runs/pretrain-demo/checkpoint-latest.pth"
SIZE_KEYS = ("model", "input_size", "num_frames", "sampling_rate")  # taken from a checkpoint when not given


def main(argv=None):
    parser = common_parser(__doc__, RECIPES, DEMO)
    arg = parser.add_argument
    arg("--nb_classes", type=int, help="number of classes (default: from the data)")
    arg("--finetune", help="initial weights: this project's, the reference's or HuggingFace's checkpoint; "
                           "'none' trains from scratch (default: the demo pre-training, for the demo set)")
    arg("--layer_decay", type=float, help="layer-wise lr decay (K400 0.75, UCF101 0.7)")
    arg("--drop_path", type=float, help="stochastic depth rate (K400 0.1, UCF101 0.2)")
    arg("--head_drop_rate", "--fc_drop_rate", dest="head_drop_rate", type=float,
        help="dropout before the head (K400 0, UCF101 0.5)")
    arg("--smoothing", type=float, default=0.1, help="label smoothing")
    arg("--mixup", type=float, help="mixup alpha; 0 = off (paper 0.8, demo 0)")
    arg("--cutmix", type=float, help="cutmix alpha; 0 = off (paper 1.0, demo 0)")
    arg("--mixup_prob", type=float, default=1.0, help="probability of mixing a batch")
    arg("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    arg("--aa", help="RandAugment policy, or 'none' (paper rand-m7-n4-mstd0.5-inc1, demo none)")
    arg("--reprob", type=float, help="random erasing probability (paper 0.25, demo 0)")
    arg("--crop_scale", type=float, nargs=2, help="area share of a training crop, min and max (paper 0.08 1, demo 0.4 1)")
    arg("--no_flip", action="store_true", default=None,
        help="no horizontal flip, for classes that name a direction (default: flip, but not for SSv2 or the demo)")
    arg("--sampling", choices=["i3d", "segment"], help="frame sampling: i3d (UCF/HMDB/K400), segment (SSv2)")
    arg("--test_num_segment", type=int, help="clips per test video (K400 5, SSv2 2)")
    arg("--test_num_crop", type=int, help="crops per test clip (3)")
    arg("--eval", action="store_true", help="only test the weights of --finetune or --resume")
    arg("--knn", action="store_true", help="only score the frozen encoder of --finetune by k-NN (k 20, cosine "
                                           "similarity of mean-pooled features) from the training to the test videos")
    arg("--predict", nargs="+", metavar="VIDEO", help="print the top-5 classes of each video (multi-view test) "
                                                       "with the weights of --finetune; needs no data set")
    args = finish_args(parser, argv, RECIPES, DEMO)
    if (args.eval or args.predict) and (args.finetune or args.resume) in (None, "none"):
        parser.error(f"--{'predict' if args.predict else 'eval'} needs the weights to test: --finetune PATH or --resume PATH")
    for name in ("finetune", "resume"):
        if getattr(args, name) not in (None, "none") and not os.path.isfile(getattr(args, name)):
            parser.error(f"--{name} {getattr(args, name)} is not a file")
    try:
        aa = parse_aa(args.aa)
    except ValueError as e:
        parser.error(str(e))
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
    # a training run's own checkpoint, to resume: its weights replace any others
    resuming = None if args.eval or args.knn else resume_path(args)
    weights = None if resuming else args.finetune or (args.resume if args.eval else None)
    if weights is None and args.demo and not resuming and os.path.exists(DEMO_PRETRAINED):
        weights = DEMO_PRETRAINED
    weights = None if weights == "none" else weights
    net, _ = build_classifier(args, weights, ctx, resuming)
    test_set = data.VideoDataset(test_samples, "test", args.num_frames, args.sampling_rate, args.input_size,
                                 sampling=args.sampling, test_num_segment=args.test_num_segment,
                                 test_num_crop=args.test_num_crop, seed=args.seed, in_memory=args.in_memory and not args.knn)
    if args.knn:
        if not weights:
            parser.error("--knn scores a trained encoder: give it with --finetune PATH")
        run = Run(args, ctx, net, None)
        scores = knn_probe(net, train_samples, test_samples, args, ctx)
        ctx.print(f"k-NN (k {scores['k']}) from {len(train_samples)} training videos to {scores['num_videos']} test "
                  f"videos: top-1 {scores['top1']:.2%}, top-5 {scores['top5']:.2%}")
        run.log({"knn": scores})
        return run.close()
    if args.eval:
        run = Run(args, ctx, net, None)
        multi_view_test(net, test_set, args, ctx, run, classes)
        return run.close()

    train_set = data.VideoDataset(train_samples, "train", args.num_frames, args.sampling_rate, args.input_size,
                                  num_sample=args.num_sample, sampling=args.sampling, flip=not args.no_flip,
                                  augment=functools.partial(augment_clip, aa=aa, reprob=args.reprob),
                                  crop_scale=args.crop_scale, seed=args.seed, in_memory=args.in_memory)
    val_set = data.VideoDataset(test_samples, "test", args.num_frames, args.sampling_rate, args.input_size,
                                sampling=args.sampling, test_num_segment=1, test_num_crop=1, seed=args.seed)
    val_set.frames = test_set.frames  # the same videos: decoded once when held in memory
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
    multi_view_test(net, test_set, args, ctx, run, classes)
    run.close()


def build_classifier(args, weights, ctx, resuming=None):
    """The VideoViT with `weights` loaded (None: from scratch), on the device. Model size, input size, frames and
    stride not given as flags come from the configuration of the checkpoint to resume, else of `weights`.
    Returns (net, that configuration)."""
    saved = checkpoint_config(resuming or weights) if resuming or weights else {}
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
        load_checkpoint(net, weights, verbose=ctx.main)
    elif not resuming:
        ctx.print("no --finetune checkpoint: training from scratch")
    return net.to(ctx.device), saved


def predict(args, ctx):
    """--predict: each video's top-5 classes by name, from its test_num_segment x test_num_crop views' averaged
    softmax; printed, and written to predictions.jsonl. An unreadable video gets one line; the others still run."""
    weights = args.finetune or args.resume
    head = canonical_weights(read_file(weights)).get("head.bias")
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


# ----------------------------------------------------------------------------- per-clip augmentation (data workers)

_FILL = (128, 128, 128)  # border fill of the geometric ops: timm's default, as the reference passes no img_mean

# timm's RandAugment ops in the reference's order (rand_augment.py, _RAND_INCREASING_TRANSFORMS with -inc1)
RAND_OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
            "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")


def rand_augment(clip, rng, magnitude=7.0, num_ops=4, mstd=0.5, inc=True):
    """timm's RandAugment as the reference sets it up: num_ops ops drawn uniformly from RAND_OPS, each applied
    with p 0.5 at a magnitude ~ N(magnitude, mstd) clipped to [0, 10]; the same op and magnitude on every frame
    of a uint8 (T, H, W, 3) RGB clip."""
    for op in rng.choice(RAND_OPS, num_ops):
        if rng.random() < 0.5:
            mag = float(np.clip(rng.normal(magnitude, mstd), 0, 10)) / 10
            clip = augment_op(clip, op, mag, 1 if rng.random() < 0.5 else -1, inc)
    return clip


def augment_op(clip, op, mag, sign=1, inc=True):
    """One op of RAND_OPS at magnitude mag in [0, 1] (timm's level / 10) on a uint8 (T, H, W, 3) RGB clip, with
    PIL's formulas; histogram ops use the whole clip's statistics. sign negates rotate, shear, translate and the
    -inc1 enhance ops; inc: the -inc1 variants (solarize, posterize, enhance ops stronger as mag grows)."""
    T, H, W, _ = clip.shape
    img = clip.reshape(T * H, W, 3)  # frames stacked vertically: per-pixel ops in one OpenCV call
    v = np.arange(256)[:, None]
    if op in ("autocontrast", "equalize", "invert", "solarize", "solarize_add", "posterize"):  # lookup tables
        if op == "autocontrast":
            lo, hi = img.min((0, 1)).astype(float), img.max((0, 1)).astype(float)
            lut = np.where(hi > lo, (v - lo) * 255 / np.maximum(hi - lo, 1), v)
        elif op == "equalize":  # PIL ImageOps.equalize on the clip's histogram
            hist = np.stack([np.bincount(img[..., c].ravel(), minlength=256) for c in range(3)], 1)
            step = (hist.sum(0) - hist[[np.flatnonzero(hist[:, c])[-1] for c in range(3)], range(3)]) // 255
            cum = np.vstack([np.zeros((1, 3), int), np.cumsum(hist, 0)[:-1]])
            lut = np.where(step > 0, (step // 2 + cum) // np.maximum(step, 1), v)
        elif op == "invert":
            lut = 255 - v
        elif op == "solarize":  # invert values at or above the threshold
            lut = np.where(v < (256 - int(256 * mag) if inc else int(256 * mag)), v, 255 - v)
        elif op == "solarize_add":  # add up to 110 to values below 128
            lut = np.where(v < 128, np.minimum(v + int(110 * mag), 255), v)
        else:  # posterize: keep the top `bits` bits
            lut = v & (0xFF << (8 - (4 - int(4 * mag) if inc else int(4 * mag)))) & 0xFF
        img = cv2.LUT(img, np.clip(lut * np.ones(3), 0, 255).astype(np.uint8)[:, None, :])
    elif op in ("color", "contrast", "brightness", "sharpness"):  # PIL ImageEnhance: blend with a degenerate
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        smooth = np.float32([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13  # PIL's SMOOTH, for sharpness
        degenerate = (cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB) if op == "color" else
                      np.full_like(img, round(gray.mean())) if op == "contrast" else
                      np.zeros_like(img) if op == "brightness" else
                      np.concatenate([cv2.filter2D(f, -1, smooth) for f in img.reshape(T, H, W, 3)]))
        factor = 1 + sign * 0.9 * mag if inc else 0.1 + 1.8 * mag  # timm: 1 +- 0.9 level/10, or 0.1 + 1.8 level/10
        img = cv2.addWeighted(img, factor, degenerate, 1 - factor, 0)
    else:  # geometric, as inverse maps (output pixel -> input pixel), PIL's convention; bicubic, grey border
        s, t = sign * 0.3 * mag, sign * 0.45 * mag
        M = np.float32({"rotate": cv2.getRotationMatrix2D((W / 2, H / 2), sign * 30 * mag, 1),
                        "shear_x": [[1, s, 0], [0, 1, 0]], "shear_y": [[1, 0, 0], [s, 1, 0]],
                        "translate_x": [[1, 0, t * W], [0, 1, 0]], "translate_y": [[1, 0, 0], [0, 1, t * H]]}[op])
        img = np.concatenate([cv2.warpAffine(f, M, (W, H), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                                             borderValue=_FILL) for f in img.reshape(T, H, W, 3)])
    return img.reshape(T, H, W, 3)


def random_erase(clip, rng):
    """The reference's RandomErasing (timm's, mode "pixel", area 2%-1/3, aspect 0.3-3.3, up to 100 draws for a box
    smaller than the frame) with cube=True: one box for every frame, filled with per-pixel noise N(0, 1) in
    normalised space, here ImageNet mean + std * z quantised to uint8. In place."""
    T, H, W, _ = clip.shape
    box = data.resized_crop_box(H, W, rng, (0.02, 1 / 3), (0.3, 1 / 0.3), tries=100, largest=(H - 1, W - 1))
    if box:
        x, y, w, h = box
        noise = 255 * (np.array(models.IMAGENET_MEAN) + np.array(models.IMAGENET_STD) * rng.standard_normal((T, h, w, 3)))
        clip[:, y:y + h, x:x + w] = np.clip(noise, 0, 255).astype(np.uint8)
    return clip


def parse_aa(aa):
    """timm's --aa syntax 'rand-m<M>-n<N>[-mstd<S>][-inc1]' -> (magnitude, num_ops, mstd, increasing); None for "none"."""
    if aa in (None, "none"):
        return None
    m = re.fullmatch(r"rand-m([\d.]+)-n(\d+)(?:-mstd([\d.]+))?(-inc1)?", aa)
    if not m:
        raise ValueError(f"--aa {aa!r}: expected rand-m<M>-n<N>[-mstd<S>][-inc1], e.g. rand-m7-n4-mstd0.5-inc1, or none")
    return float(m[1]), int(m[2]), float(m[3] or 0), bool(m[4])


def augment_clip(view, rng, aa, reprob):
    """The reference's per-clip fine-tuning augmentation, in its order: RandAugment (aa from parse_aa), then random
    erasing with probability reprob. In place, on a uint8 (T, H, W, 3) crop (VideoDataset's augment)."""
    if aa:
        view[:] = rand_augment(view, rng, *aa)
    if rng.random() < reprob:
        random_erase(view, rng)


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


if __name__ == "__main__":
    main()
