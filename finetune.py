"""Fine-tune a VideoViT on labelled videos and test it with multi-view testing (Sec. 4 of the
paper).

    python finetune.py       # the demo: from the demo's pre-training if there is one
    torchrun --nproc_per_node=8 finetune.py --data_path UCF-101 --data_set UCF101 --model base \
        --finetune runs/pretrain-UCF101/checkpoint-latest.pth
    python finetune.py --eval --finetune model.pth --data_path ...  # test only: top-1, top-5 and
                                                                    # mean class accuracy
    python finetune.py --knn --finetune model.pth                   # score the frozen encoder: k-NN
    python finetune.py --linprobe --features --finetune model.pth   # linear probe; features.npz
    python finetune.py --predict a.avi b.mp4 --finetune model.pth   # each video's top-5 class names

Each step augments the clips (RandAugment, random erasing in the data workers; mixup or CutMix
here), classifies them from the mean of the encoder's tokens, and descends the cross-entropy with
smoothed labels. Checkpoints, resuming and the log work as in pretrain.py.
"""
import functools
import os
import re

import cv2
import numpy as np
import torch
import torch.nn.functional as F

import data
import engine
import evaluate
import model as models
from weights import (CheckpointError, RunFolder, canonical_weights, checkpoint_config,
                     from_main, listed, load_checkpoint, read_file)

# The reference's fine-tuning recipes (github.com/MCG-NJU/VideoMAE scripts/<data set>/
# ..._epoch_<E>/finetune.sh, ViT-B; values the scripts leave out are run_class_finetuning.py's
# defaults), chosen as in pretrain.py.
K400 = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=8, epochs=100,
            warmup_epochs=5, blr=1e-3, min_blr=1e-6, num_sample=1, save_ckpt_freq=10,
            layer_decay=0.75, drop_path=0.1, head_drop_rate=0.0, no_flip=False, sampling="i3d",
            test_num_segment=5, test_num_crop=3, aa="rand-m7-n4-mstd0.5-inc1", reprob=0.25,
            mixup=0.8, cutmix=1.0, crop_scale=(0.08, 1.0), in_memory=False, gpus=64)
UCF101 = {**K400, "batch_size": 16, "blr": 5e-4, "min_blr": 1e-5, "num_sample": 2, "gpus": 8,
          "save_ckpt_freq": 50, "layer_decay": 0.7, "drop_path": 0.2, "head_drop_rate": 0.5}
RECIPES = {
    "K400": K400,  # kinetics/..._ratio_0.9_epoch_800, for 64 GPUs
    "SSv2": {**K400, "epochs": 50, "blr": 5e-4, "no_flip": True, "sampling": "segment",
             "test_num_segment": 2},  # ssv2/..._epoch_800
    "UCF101": UCF101,  # ucf101/..._epoch_3200, for 8 GPUs
    "HMDB51": UCF101,  # no script: the UCF101 script's values, the closest released recipe
}
# The demo: its classes name directions (no flips); its one object must stay in view (larger
# crops); light regularisation and no layer-wise decay (with 6 blocks and few steps it kept the
# pre-trained start at 42% on validation videos of another seed, 73% without; 91% and 90% from
# scratch): 6 classes learnt in minutes.
DEMO = dict(model="mini", input_size=64, num_frames=8, sampling_rate=4, batch_size=16, epochs=35,
            warmup_epochs=3, blr=1.6e-2, num_sample=2, save_ckpt_freq=10, layer_decay=1.0,
            drop_path=0.1, no_flip=True, in_memory=True, aa="none", reprob=0.0, mixup=0.0,
            cutmix=0.0, crop_scale=(0.4, 1.0))
DEMO_PRETRAINED = "runs/pretrain-demo/checkpoint-latest.pth"
SIZE_KEYS = ("model", "input_size", "num_frames", "sampling_rate")  # a checkpoint's, unless given


def parse_args(argv=None):
    parser = engine.common_parser(__doc__, RECIPES, DEMO)
    arg = parser.add_argument
    arg("--nb_classes", type=engine.COUNT, help="number of classes (default: from the data)")
    arg("--finetune", help="initial weights: this project's, the reference's or HuggingFace's "
                           "checkpoint; 'none' trains from scratch (default: the demo "
                           "pre-training, for the demo set)")
    rate = engine.number(least=0, below=1)  # a share dropped or smoothed away: not all of it
    arg("--layer_decay", type=engine.number(above=0, most=1),
        help="layer-wise lr decay (K400 0.75, UCF101 0.7)")
    arg("--drop_path", type=rate, help="stochastic depth rate (K400 0.1, UCF101 0.2)")
    arg("--head_drop_rate", "--fc_drop_rate", dest="head_drop_rate", type=rate,
        help="dropout before the head (K400 0, UCF101 0.5)")
    arg("--smoothing", type=rate, default=0.1, help="label smoothing")
    arg("--mixup", type=engine.number(least=0), help="mixup alpha; 0 = off (paper 0.8, demo 0)")
    arg("--cutmix", type=engine.number(least=0), help="cutmix alpha; 0 = off (paper 1.0, demo 0)")
    arg("--mixup_prob", type=engine.SHARE, default=1.0, help="probability of mixing a batch")
    arg("--mixup_switch_prob", type=engine.SHARE, default=0.5,
        help="probability of cutmix instead of mixup")
    arg("--aa", help="RandAugment policy, or 'none' (paper rand-m7-n4-mstd0.5-inc1, demo none)")
    arg("--reprob", type=engine.SHARE, help="random erasing probability (paper 0.25, demo 0)")
    arg("--crop_scale", type=engine.number(above=0, most=1), nargs=2,
        help="area share of a training crop, min and max (paper 0.08 1, demo 0.4 1)")
    arg("--no_flip", action="store_true", default=None,
        help="no horizontal flip, for classes that name a direction (default: flip, but not for "
             "SSv2 or the demo)")
    arg("--sampling", choices=["i3d", "segment"],
        help="frame sampling: i3d (UCF/HMDB/K400), segment (SSv2)")
    arg("--test_num_segment", type=engine.COUNT, help="clips per test video (K400 5, SSv2 2)")
    arg("--test_num_crop", type=engine.COUNT, help="crops per test clip (3)")
    arg("--eval", action="store_true", help="only test the weights of --finetune or --resume")
    arg("--knn", action="store_true", help="only score the frozen encoder of --finetune by k-NN "
        "(k 20, cosine similarity of mean-pooled features) from the training to the test videos")
    arg("--linprobe", action="store_true", help="only score the frozen encoder of --finetune by "
        "MAE's linear probe (BatchNorm, a linear layer) on the features --knn uses")
    arg("--features", action="store_true", help="only write features.npz: the frozen encoder's "
        "features (as --knn's) of every video of both splits, labels, paths, split")
    arg("--predict", nargs="+", metavar="VIDEO",
        help="print the top-5 classes of each video (multi-view test) with the weights of "
             "--finetune; needs no data set")
    args = engine.finish_args(parser, argv, RECIPES, DEMO)
    if (args.eval or args.predict) and (args.finetune or args.resume) in (None, "none"):
        mode = "predict" if args.predict else "eval"
        parser.error(f"--{mode} needs the weights to test: --finetune PATH or --resume PATH")
    args.frozen = [f"--{k}" for k in ("knn", "linprobe", "features") if getattr(args, k)]
    if args.frozen and args.finetune in (None, "none"):
        parser.error(f"{args.frozen[0]} reads a trained encoder: give it with --finetune PATH")
    if args.crop_scale[0] > args.crop_scale[1]:
        parser.error(f"--crop_scale {args.crop_scale[0]} {args.crop_scale[1]}: min above max")
    try:
        parse_aa(args.aa)
    except ValueError as e:
        parser.error(str(e))
    return args


@engine.command  # a mistake found below: its one line, exit status 2; Ctrl-C: 130
def main(argv=None):
    args = parse_args(argv)
    if args.predict:
        return predict(args, engine.Context(args))
    ctx = engine.setup(args)  # process (torchrun's rank, device), the batch size's lr, the seed
    train_samples, test_samples, classes = labelled_samples(args)
    resuming = None  # a training run's own newest checkpoint: its weights replace any others
    if not (args.eval or args.frozen):
        resuming = RunFolder(args.output_dir, ctx.main).resume_path(args.resume)  # rank 0's
    weights = None if resuming else initial_weights(args)
    net, _ = build_classifier(args, weights, ctx, resuming)
    if args.eval or args.frozen:  # --knn, --linprobe, --features: the frozen encoder only
        return score_only(net, train_samples, test_samples, classes, args, ctx)

    # Videos augmented per clip in the data workers (RandAugment, random erasing, flips, crops).
    augment = functools.partial(augment_clip, aa=parse_aa(args.aa), reprob=args.reprob)
    train_set = data.VideoDataset(
        train_samples, "train", args.num_frames, args.sampling_rate, args.input_size,
        num_sample=args.num_sample, sampling=args.sampling, flip=not args.no_flip, augment=augment,
        crop_scale=args.crop_scale, seed=args.seed, in_memory=args.in_memory)
    test_set = test_dataset(test_samples, args, args.test_num_segment, args.test_num_crop, args.in_memory)
    val_set = test_dataset(test_samples, args, 1, 1)  # one centre clip per video, after each epoch
    val_set.frames = test_set.frames  # the same videos: decoded once when held in memory
    loader, sampler = data.make_loader(train_set, args, ctx, train=True)

    # AdamW, layer-wise lr decay: blocks near the input, which pre-training taught most, move least.
    groups = models.param_groups(net, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)
    run = engine.Run(args, ctx, net, optimizer, train_set)  # the output folder; resumes if it can
    model = engine.wrap(net, args, ctx)  # compiled (--compile); DistributedDataParallel by torchrun

    for epoch in range(run.start_epoch, args.epochs):
        engine.start_epoch(epoch, sampler, args, ctx)  # seeds torch's RNG: mixup and cutmix draw
        # The progress bar, loss, clips/s, damaged videos and the check that the loss is finite.
        meter = engine.Meter(run, epoch, loader)
        for step, batches in meter.steps():
            lr = run.set_lr(engine.lr_at(epoch + step / meter.num_steps, args))  # warmup + cosine
            for video, labels, last in batches:  # video (B, 3, T, H, W), ImageNet-normalised
                video, target = mix(video, labels, args.nb_classes, args)  # soft targets
                with engine.gradient_sync(model, last), engine.autocast(args, ctx):
                    loss = soft_cross_entropy(model(video), target)
                run.backward(loss)  # accumulated over --accum_iter micro-batches
                meter.record(loss, lr)
            run.step()  # AdamW on the accumulated gradient (clipped with --clip_grad)

        stats = meter.summary()
        stats["val_top1"] = evaluate.predict_and_score(net, val_set, args, ctx)["top1"]
        run.end_epoch(epoch, stats)
    evaluate.multi_view_test(net, test_set, args, ctx, run, classes)
    run.close()


def labelled_samples(args):
    """(training samples, test samples, class names); --nb_classes from the data unless given."""
    train_samples, classes = data.load_samples(args.data_path, args.data_set, args.split, train=True)
    train_samples = data.training_subset(train_samples, args.per_class)
    test_samples, _ = data.load_samples(args.data_path, args.data_set, args.split, train=False)
    guessed, args.nb_classes = args.nb_classes is None, args.nb_classes or len(classes)
    args.classes = classes  # saved in every checkpoint's config: --predict names its classes
    labels = sorted({label for _, label in train_samples + test_samples})
    empty = sorted(set(range(args.nb_classes)) - set(labels))  # classes without a video
    if not test_samples:
        raise data.DataError(f"{args.data_path}: no test videos (a list's are in val.txt)")
    if labels[0] < 0:  # -1: a list line without a label, or a video outside the class folders
        raise data.DataError(f"{args.data_path} has videos without a label; give each one, in "
                             f"'video label' lines or class folders")
    if labels[-1] >= args.nb_classes:
        raise data.DataError(f"labels of {args.data_path} reach {labels[-1]}, past --nb_classes "
                             f"{args.nb_classes}: raise it, or leave it out")
    if guessed and empty:  # e.g. labels 0 and 100 only: 99 of 101 classes without a video
        raise data.DataError(f"labels of {args.data_path} leave {len(empty)} of the classes 0.."
                             f"{labels[-1]} without a video ({listed(empty)}); number them 0..N-1,"
                             f" or give --nb_classes {args.nb_classes} to keep the empty ones")
    return train_samples, test_samples, classes


def initial_weights(args):
    """The checkpoint to start from: --finetune (--resume too with --eval); for the demo, the demo's
    pre-training when there is one; None from scratch."""
    weights = args.finetune or (args.resume if args.eval else None)
    if weights is None and args.demo and os.path.exists(DEMO_PRETRAINED):
        weights = DEMO_PRETRAINED
    return None if weights == "none" else weights


def test_dataset(samples, args, segments, crops, in_memory=False):
    return data.VideoDataset(samples, "test", args.num_frames, args.sampling_rate, args.input_size,
                             sampling=args.sampling, test_num_segment=segments, test_num_crop=crops,
                             seed=args.seed, in_memory=in_memory)


def build_classifier(args, weights, ctx, resuming=None):
    """The VideoViT with `weights` loaded (None: from scratch), on the device. Model size, input
    size, frames and stride not given as flags come from the configuration of the checkpoint to
    resume, else of `weights`. Returns (net, that configuration)."""
    saved = {}
    if resuming or weights:  # rank 0's reading: the newest checkpoint may be on its disk only
        saved = from_main(checkpoint_config(resuming or weights) if ctx.main else None)
    inherited = {k: saved[k] for k in SIZE_KEYS if k in saved and k in args.recipe_defaults}
    if inherited:
        vars(args).update(inherited)
        ctx.print("from the checkpoint's config: " + ", ".join(f"--{k} {v}" for k, v in inherited.items()))
    net = models.build_model("finetune", args.model, num_classes=args.nb_classes,
                             img_size=args.input_size, num_frames=args.num_frames,
                             drop_path_rate=args.drop_path, head_drop_rate=args.head_drop_rate)
    net.grad_checkpointing = args.grad_ckpt
    if weights:
        ctx.print(f"initial weights: {weights}")
        load_checkpoint(net, weights, ctx.main, fresh_head=not (args.eval or args.predict))
    elif not resuming:
        ctx.print("no --finetune checkpoint: training from scratch")
    return net.to(ctx.device), saved


def score_only(net, train_samples, test_samples, classes, args, ctx):
    """--knn, --linprobe, --features (the frozen encoder) or --eval (multi-view test), logged."""
    run = engine.Run(args, ctx, net, None)
    if args.knn:
        scores = evaluate.knn_probe(net, train_samples, test_samples, args, ctx)
        ctx.print(f"k-NN (k {scores['k']}) from {len(train_samples)} training videos to "
                  f"{scores['num_videos']} test videos: top-1 {scores['top1']:.2%}, "
                  f"top-5 {scores['top5']:.2%}")
        run.folder.log({"knn": scores})
    if args.linprobe or args.features:
        splits = {"train": train_samples, "test": test_samples}
        evaluate.features_and_linear_probe(net, splits, args, ctx, run)
    if args.eval:
        test_set = test_dataset(test_samples, args, args.test_num_segment, args.test_num_crop,
                                args.in_memory)
        evaluate.multi_view_test(net, test_set, args, ctx, run, classes)
    run.close()


def predict(args, ctx):
    """--predict: each video's top-5 classes by name, from its test_num_segment x test_num_crop
    views' averaged softmax; printed, and written to predictions.jsonl. An unreadable video gets one
    line; the others still run."""
    weights = args.finetune or args.resume
    head = canonical_weights(read_file(weights)).get("head.bias")
    if head is None:
        raise CheckpointError(f"{weights} has no classification head (a pre-training checkpoint): "
                              f"fine-tune it first with --finetune {weights}, then predict")
    args.nb_classes = len(head)
    net, saved = build_classifier(args, weights, ctx)
    videos = [(video, -1) for video in args.predict]
    dataset = test_dataset(videos, args, args.test_num_segment, args.test_num_crop)
    evaluate.predict_videos(net, dataset, saved.get("classes") or [], args, ctx)


# ----------------------------------------------------------------- mixup / cutmix with soft targets

def mix(video, labels, num_classes, args, gen=None):
    """Mixup or CutMix (one box, cut out of every frame) of the batch with itself reversed, and
    label-smoothed soft targets. Returns (video, targets (B, num_classes) summing to one). The draws
    steer Python code, so they come from a CPU generator (default: torch's, seeded per epoch): drawn
    on a GPU, each would make the host wait for it."""
    gen = gen or torch.default_generator
    off = args.smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, device=video.device)
    target.scatter_(1, labels[:, None], 1.0 - args.smoothing + off)
    if args.mixup <= 0 and args.cutmix <= 0:
        return video, target
    if torch.rand((), generator=gen, device=gen.device) >= args.mixup_prob:
        return video, target
    if args.cutmix <= 0:
        cut = False
    elif args.mixup <= 0:
        cut = True
    else:
        cut = bool(torch.rand((), generator=gen, device=gen.device) < args.mixup_switch_prob)
    alpha = args.cutmix if cut else args.mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # global RNG, seeded per epoch
    if cut:
        H, W = video.shape[-2:]
        h, w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy = int(torch.randint(H, (), generator=gen, device=gen.device))
        cx = int(torch.randint(W, (), generator=gen, device=gen.device))
        y0, y1 = max(cy - h // 2, 0), min(cy + h // 2, H)
        x0, x1 = max(cx - w // 2, 0), min(cx + w // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the share of pixels actually kept
    else:
        video = video * lam + video.flip(0) * (1 - lam)
    return video, target * lam + target.flip(0) * (1 - lam)


def soft_cross_entropy(logits, target):
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


# ------------------------------------------------------------- per-clip augmentation (data workers)

_FILL = (128, 128, 128)  # geometric ops' border: timm's default, as the reference gives no img_mean

# timm's RandAugment ops in the order of rand_augment.py's _RAND_INCREASING_TRANSFORMS (-inc1)
RAND_OPS = ("autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add",
            "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
            "translate_y")
LOOKUP_OPS = ("autocontrast", "equalize", "invert", "solarize", "solarize_add", "posterize")
ENHANCE_OPS = ("color", "contrast", "brightness", "sharpness")


def parse_aa(aa):
    """timm's --aa syntax 'rand-m<M>-n<N>[-mstd<S>][-inc1]' -> (magnitude, num_ops, mstd,
    increasing); None for "none"."""
    if aa in (None, "none"):
        return None
    m = re.fullmatch(r"rand-m([\d.]+)-n(\d+)(?:-mstd([\d.]+))?(-inc1)?", aa)
    if not m:
        raise ValueError(f"--aa {aa!r}: expected rand-m<M>-n<N>[-mstd<S>][-inc1], "
                         f"e.g. rand-m7-n4-mstd0.5-inc1, or none")
    return float(m[1]), int(m[2]), float(m[3] or 0), bool(m[4])


def augment_clip(view, rng, aa, reprob):
    """VideoDataset's augment, in place on a uint8 (T, H, W, 3) crop: the reference's per-clip
    fine-tuning augmentation, RandAugment (aa from parse_aa) then random erasing at rate reprob."""
    if aa:
        view[:] = rand_augment(view, rng, *aa)
    if rng.random() < reprob:
        random_erase(view, rng)


def rand_augment(clip, rng, magnitude=7.0, num_ops=4, mstd=0.5, inc=True):
    """timm's RandAugment as the reference sets it up: num_ops ops drawn uniformly from RAND_OPS,
    each applied with p 0.5 at a magnitude ~ N(magnitude, mstd) clipped to [0, 10]; the same op and
    magnitude on every frame of a uint8 (T, H, W, 3) RGB clip."""
    for op in rng.choice(RAND_OPS, num_ops):
        if rng.random() < 0.5:
            mag = float(np.clip(rng.normal(magnitude, mstd), 0, 10)) / 10
            sign = 1 if rng.random() < 0.5 else -1
            clip = augment_op(clip, op, mag, sign, inc)
    return clip


def augment_op(clip, op, mag, sign=1, inc=True):
    """One op of RAND_OPS at magnitude mag in [0, 1] (timm's level / 10) on a uint8 (T, H, W, 3) RGB
    clip, with PIL's formulas; histogram ops use the whole clip's statistics. sign negates rotate,
    shear, translate and the -inc1 enhance ops; inc: the -inc1 variants (solarize, posterize,
    enhance ops stronger as mag grows)."""
    T, H, W, _ = clip.shape
    img = clip.reshape(T * H, W, 3)  # frames stacked vertically: per-pixel ops in one OpenCV call
    if op in LOOKUP_OPS:
        lut = np.clip(_lookup_table(img, op, mag, inc) * np.ones(3), 0, 255).astype(np.uint8)
        img = cv2.LUT(img, lut[:, None, :])  # lut (256, 3)
    elif op in ENHANCE_OPS:  # PIL ImageEnhance: blend with a degenerate image
        if inc:
            factor = 1 + sign * 0.9 * mag  # timm: 1 +- 0.9 level / 10
        else:
            factor = 0.1 + 1.8 * mag  # timm: 0.1 + 1.8 level / 10
        img = cv2.addWeighted(img, factor, _degenerate(img, op, T), 1 - factor, 0)
    else:  # geometric, as inverse maps (output pixel -> input pixel), PIL's convention
        s, t = sign * 0.3 * mag, sign * 0.45 * mag
        centre = ((W - 1) / 2, (H - 1) / 2)  # as PIL; -angle: PIL turns anticlockwise
        matrices = {"rotate": cv2.getRotationMatrix2D(centre, -sign * 30 * mag, 1),
                    "shear_x": [[1, s, 0], [0, 1, 0]], "shear_y": [[1, 0, 0], [s, 1, 0]],
                    "translate_x": [[1, 0, t * W], [0, 1, 0]],
                    "translate_y": [[1, 0, 0], [0, 1, t * H]]}
        M = np.float32(matrices[op])
        flags = cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP  # bicubic; a grey border
        frames = [cv2.warpAffine(f, M, (W, H), flags=flags, borderValue=_FILL)
                  for f in img.reshape(T, H, W, 3)]
        img = np.concatenate(frames)
    return img.reshape(T, H, W, 3)


def _lookup_table(img, op, mag, inc):
    """Value map (256, 1) or (256, 3) of a per-pixel op, from the clip's statistics if needed."""
    v = np.arange(256)[:, None]
    if op == "autocontrast":
        lo, hi = img.min((0, 1)).astype(float), img.max((0, 1)).astype(float)
        return np.where(hi > lo, (v - lo) * 255 / np.maximum(hi - lo, 1), v)
    if op == "equalize":  # PIL ImageOps.equalize on the clip's histogram, hist (256, 3)
        hist = np.stack([np.bincount(img[..., c].ravel(), minlength=256) for c in range(3)], 1)
        last = hist[[np.flatnonzero(hist[:, c])[-1] for c in range(3)], range(3)]
        step = (hist.sum(0) - last) // 255  # last: the count of each channel's top value
        cum = np.vstack([np.zeros((1, 3), int), np.cumsum(hist, 0)[:-1]])
        return np.where(step > 0, (step // 2 + cum) // np.maximum(step, 1), v)
    if op == "invert":
        return 255 - v
    if op == "solarize":  # invert values at or above the threshold
        threshold = 256 - int(256 * mag) if inc else int(256 * mag)
        return np.where(v < threshold, v, 255 - v)
    if op == "solarize_add":  # add up to 110 to values below 128
        return np.where(v < 128, np.minimum(v + int(110 * mag), 255), v)
    bits = 4 - int(4 * mag) if inc else int(4 * mag)  # posterize: keep the top `bits` bits
    return v & (0xFF << (8 - bits)) & 0xFF


def _degenerate(img, op, T):
    """PIL ImageEnhance's other image: grey (color), mean grey (contrast), black (brightness),
    smoothed (sharpness, PIL's SMOOTH filter frame by frame)."""
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    if op == "color":
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if op == "contrast":
        return np.full_like(img, round(gray.mean()))
    if op == "brightness":
        return np.zeros_like(img)
    smooth = np.float32([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    return np.concatenate([cv2.filter2D(f, -1, smooth) for f in img.reshape(T, -1, *img.shape[1:])])


def random_erase(clip, rng):
    """The reference's RandomErasing (timm's, mode "pixel", area 2%-1/3, aspect 0.3-3.3, up to 100
    draws for a box smaller than the frame) with cube=True, in place: one box for all frames, filled
    with per-pixel noise N(0, 1) in normalised space, here ImageNet mean + std * z as uint8."""
    T, H, W, _ = clip.shape
    box = data.resized_crop_box(H, W, rng, (0.02, 1 / 3), (0.3, 1 / 0.3), tries=100,
                                largest=(H - 1, W - 1))
    if box:
        x, y, w, h = box
        z = rng.standard_normal((T, h, w, 3))
        noise = 255 * (np.array(models.IMAGENET_MEAN) + np.array(models.IMAGENET_STD) * z)
        clip[:, y:y + h, x:x + w] = np.clip(noise, 0, 255).astype(np.uint8)
    return clip


if __name__ == "__main__":
    main()
