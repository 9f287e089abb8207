"""Self-supervised VideoMAE pre-training, on one CPU or under torchrun on many GPUs.

    python pretrain.py                     # the tiny model on the built-in demo videos, a few minutes on a CPU
    torchrun --nproc_per_node=8 pretrain.py --data_path UCF-101 --data_set UCF101 --model base

Everything lands in --output_dir: log.jsonl, checkpoint-latest.pth (every epoch), checkpoint-NNNN.pth and a
reconstruction picture recon-NNNN.png (every --save_ckpt_freq epochs). Running the same command again resumes
from the newest checkpoint there. The second half of this file is shared with finetune.py.
"""
import torch

import data
import engine
import evaluate
import mask as masks
import model as models

# The reference's pre-training recipes (github.com/MCG-NJU/VideoMAE scripts/<data set>/..._epoch_<E>/pretrain.sh, ViT-B),
# chosen by --recipe (default: the --data_set's own, else K400's) when --data_path is given; the demo's otherwise.
# Epochs as in the scripts, one more than the name says; blr and min_blr are the scripts' --lr and --min_lr.
K400 = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=32, epochs=801, warmup_epochs=40,
            blr=1.5e-4, min_blr=1e-5, mask_ratio=0.9, num_sample=1, save_ckpt_freq=20, no_norm_pix_loss=False,
            in_memory=False)
UCF101 = {**K400, "batch_size": 24, "epochs": 3201, "blr": 3e-4, "mask_ratio": 0.75,
          "save_ckpt_freq": 100}  # ucf101/..._ratio_0.75_epoch_3200, for 8 GPUs
RECIPES = {
    "K400": K400,  # kinetics/..._ratio_0.9_epoch_800, for 64 GPUs
    "SSv2": {**K400, "sampling_rate": 2},  # ssv2/..._ratio_0.9_epoch_800
    "UCF101": UCF101,
    "HMDB51": {**UCF101, "epochs": 4800},  # no script: the paper's epochs, UCF101's values otherwise
}
# The demo: a 6-block model on 64-pixel clips held in memory, 150 epochs of its 300 training videos in about 10
# minutes on 2 CPU cores. Plain pixels: the picture then shows what the model itself rebuilds, colours included.
DEMO = dict(model="mini", input_size=64, num_frames=8, sampling_rate=4, batch_size=16, epochs=150,
            warmup_epochs=10, blr=2.4e-2, mask_ratio=0.75, num_sample=2, save_ckpt_freq=25,
            no_norm_pix_loss=True, in_memory=True)


def main(argv=None):
    parser = engine.common_parser(__doc__, RECIPES, DEMO)
    parser.add_argument("--mask_type", choices=list(masks.MASKS), default="tube")
    parser.add_argument("--mask_ratio", type=float, help="share of tokens hidden from the encoder (K400: 0.9, UCF101: 0.75)")
    parser.add_argument("--decoder_mask_type", choices=["none", "run_cell"], default="none",
                        help="VideoMAE V2 dual masking: rebuild only a running-cell subset of the tokens")
    parser.add_argument("--decoder_mask_ratio", type=float, default=0.5)
    parser.add_argument("--opt_betas", type=float, nargs=2, default=(0.9, 0.95))
    parser.add_argument("--no_norm_pix_loss", action="store_true", default=None,
                        help="rebuild plain pixels, not per-patch normalised ones (default: normalised; plain on the demo)")
    parser.add_argument("--norm_pix_loss", dest="no_norm_pix_loss", action="store_false", default=None,
                        help="rebuild per-patch normalised pixels (the default, except on the demo)")
    args = engine.finish_args(parser, argv, RECIPES, DEMO)
    for name in ("mask_ratio", "decoder_mask_ratio"):
        if not 0 < getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} must lie strictly between 0 and 1")
    side = args.input_size // models.PATCH_SIZE
    grid = (args.num_frames // models.TUBELET_SIZE, side, side)  # (t, h, w) tokens of a clip
    hidden = masks.MASKS[args.mask_type](1, grid, args.mask_ratio)  # what every clip's mask hides: counts are fixed
    if not hidden.any():
        parser.error(f"--mask_ratio {args.mask_ratio} hides no token of the {grid[0]}x{grid[1]}x{grid[2]} grid "
                     f"(--mask_type {args.mask_type}): nothing to rebuild; raise it or the --input_size")
    if args.decoder_mask_type == "run_cell" and side % 2:
        parser.error(f"--decoder_mask_type run_cell needs an even token grid; --input_size {args.input_size} gives {side}x{side}")
    ctx = engine.setup(args)

    samples = engine.training_subset(data.load_samples(args.data_path, args.data_set, args.split, train=True)[0], args)
    dataset = data.VideoDataset(samples, "pretrain", args.num_frames, args.sampling_rate, args.input_size,
                                num_sample=args.num_sample, seed=args.seed, in_memory=args.in_memory)
    net = models.build_model("pretrain", args.model, img_size=args.input_size, num_frames=args.num_frames,
                             norm_pix_loss=not args.no_norm_pix_loss).to(ctx.device)
    net.encoder.grad_checkpointing = args.grad_ckpt
    optimizer = torch.optim.AdamW(engine.param_groups(net, args.weight_decay), lr=args.lr, betas=tuple(args.opt_betas), fused=True)
    loader, sampler = engine.make_loader(dataset, args, ctx, train=True)
    run = engine.Run(args, ctx, net, optimizer, dataset)
    model = engine.wrap(net, args, ctx)
    demo_clip = dataset[0][0][:1]  # one fixed clip for the reconstruction pictures
    held_out = held_out_samples(samples, args)
    val_set = held_out and data.VideoDataset(held_out[::max(1, len(held_out) // 256)], "test", args.num_frames,
                                             args.sampling_rate, args.input_size, test_num_segment=1, test_num_crop=1)
    labelled = held_out and min(label for _, label in samples + held_out) >= 0
    steps_per_epoch = len(loader) // args.accum_iter
    ctx.print(f"{len(dataset)} videos, {steps_per_epoch} steps/epoch, {grid} tokens per clip, "
              f"{int((~hidden).sum())} visible")

    for epoch in range(run.start_epoch, args.epochs):
        gen = engine.start_epoch(epoch, sampler, args, ctx)  # draws the masks, on the device
        rebuilt = {}

        def step(clips, labels):
            B = clips.shape[0]
            m = masks.MASKS[args.mask_type](B, grid, args.mask_ratio, generator=gen, device=ctx.device)
            d = None if args.decoder_mask_type == "none" else masks.running_cell_mask(
                B, grid, args.decoder_mask_ratio, generator=gen, device=ctx.device)
            loss, pred = model(clips, m, d)
            rebuilt["rebuilt_per_clip"] = pred.shape[1]  # tokens the decoder rebuilt, per clip
            return loss

        stats = {**engine.train_epoch(model, loader, optimizer, run, epoch, step, args, ctx), **rebuilt}
        if run.numbered(epoch) and val_set:  # held-out figures beside each numbered checkpoint
            stats.update(evaluate.reconstruction_scores(net, val_set, args, ctx))
            if labelled:
                stats["knn_top1"] = evaluate.knn_probe(net.encoder, samples, held_out, args, ctx, frames=dataset.frames)["top1"]
        run.end_epoch(epoch, stats, picture=lambda path: evaluate.reconstruction_png(net, demo_clip, args, ctx, path))
    run.close()


def held_out_samples(train_samples, args):
    """The test split's videos that pre-training does not see (none for a single list or an unlabelled folder)."""
    seen = {path for path, _ in train_samples}
    test = data.load_samples(args.data_path, args.data_set, args.split, train=False)[0]
    return [(path, label) for path, label in test if path not in seen]






# ============================================================================= shared with finetune.py


if __name__ == "__main__":
    main()
