"""Self-supervised VideoMAE pre-training (Sec. 3 of the paper), on a CPU or under torchrun on GPUs.

    python pretrain.py          # the demo: a small model on built-in synthetic videos, on a CPU
    torchrun --nproc_per_node=8 pretrain.py --data_path UCF-101 --data_set UCF101 --model base
    python pretrain.py --init checkpoint.pth --data_path ...   # start from pre-training weights
    python pretrain.py --reconstruct a.mp4 b.avi --init checkpoint.pth  # pictures and losses

Each step hides most of each clip's tubelets (tube masking), has the encoder look at the rest, has
the decoder rebuild the hidden pixels, and descends their mean squared error. Everything lands in
--output_dir: log.jsonl, checkpoint-latest.pth (at most every --latest_every minutes), and every
--save_ckpt_freq epochs checkpoint-NNNN.pth with the held-out figures and a reconstruction picture
recon-NNNN.png. Running the same command again resumes from the newest checkpoint.
"""
import functools

import torch

import data
import engine
import evaluate
import mask as masks
import model as models

# The reference's pre-training recipes (ViT-B; github.com/MCG-NJU/VideoMAE, scripts/<data set>/
# ..._epoch_<E>/pretrain.sh), chosen by --recipe (default: the --data_set's own, else K400's) when
# --data_path is given; the demo's otherwise. Epochs as in the scripts, one more than the name says;
# blr and min_blr are the scripts' --lr and --min_lr; gpus, the scripts' processes: batch_size x
# gpus videos make an optimizer step, on any number of processes (engine.setup accumulates).
K400 = dict(model="base", input_size=224, num_frames=16, sampling_rate=4, batch_size=32, epochs=801,
            warmup_epochs=40, blr=1.5e-4, min_blr=1e-5, mask_ratio=0.9, num_sample=1,
            save_ckpt_freq=20, no_norm_pix_loss=False, in_memory=False, gpus=64)
UCF101 = {**K400, "batch_size": 24, "epochs": 3201, "blr": 3e-4, "mask_ratio": 0.75,
          "save_ckpt_freq": 100, "gpus": 8}
RECIPES = {
    "K400": K400,  # kinetics/..._ratio_0.9_epoch_800
    "SSv2": {**K400, "sampling_rate": 2},  # ssv2/..._ratio_0.9_epoch_800
    "UCF101": UCF101,  # ucf101/..._ratio_0.75_epoch_3200
    "HMDB51": {**UCF101, "epochs": 4800},  # no script: the paper's epochs, UCF101's otherwise
}
# The demo: a 6-block model on 64-pixel clips held in memory, 300 epochs of its 300 training videos:
# the length at which pre-training paid off on validation videos (README: data efficiency at demo
# scale). Plain pixels: the picture then shows what the model itself rebuilds, colours included.
# bf16 autocast on CPUs with bf16 instructions (0.84 of fp32's time here; README), as on GPUs.
DEMO = dict(model="mini", input_size=64, num_frames=8, sampling_rate=4, batch_size=16, epochs=300,
            warmup_epochs=10, blr=2.4e-2, mask_ratio=0.75, num_sample=2, save_ckpt_freq=50,
            no_norm_pix_loss=True, in_memory=True, dtype="bf16" if engine.cpu_has_bf16() else None)


def parse_args(argv=None):
    parser = engine.common_parser(__doc__, RECIPES, DEMO)
    arg = parser.add_argument
    share = engine.number(above=0, below=1)  # some of the tokens, not none, not all
    arg("--mask_type", choices=list(masks.MASKS), default="tube")
    arg("--mask_ratio", type=share, help="share of tokens hidden (K400 0.9, UCF101 0.75)")
    arg("--decoder_mask_type", choices=["none", "run_cell"], default="none",
        help="VideoMAE V2 dual masking: rebuild only a running-cell subset of the tokens")
    arg("--decoder_mask_ratio", type=share, default=0.5)
    arg("--opt_betas", type=engine.number(least=0, below=1), nargs=2, default=(0.9, 0.95))
    arg("--no_norm_pix_loss", action="store_true", default=None,
        help="rebuild plain pixels, not per-patch normalised ones (default: normalised; demo: plain)")
    arg("--norm_pix_loss", dest="no_norm_pix_loss", action="store_false", default=None,
        help="rebuild per-patch normalised pixels (the default, except on the demo)")
    arg("--init", metavar="CKPT", help="start from these pre-training weights, encoder and decoder "
        "(this project's, the reference's, HuggingFace's); epochs, AdamW and lr start afresh")
    arg("--reconstruct", nargs="+", metavar="VIDEO", help="only draw each video's reconstruction "
        "by the --init weights, with its loss beside the trivial predictors'; needs no data set")
    args = engine.finish_args(parser, argv, RECIPES, DEMO)
    if args.reconstruct and not args.init:
        parser.error("--reconstruct needs pre-training weights to draw with: --init PATH")
    args.inherited = {}  # --reconstruct: the checkpoint's sizes, mask ratio, target, unless given
    if args.init:  # refused before any video is read: no file, a classifier, sizes not --model's
        from_checkpoint = args.reconstruct and "model" in args.recipe_defaults
        try:
            saved = evaluate.pretraining_config(args.init, None if from_checkpoint else args.model)
        except ValueError as error:
            parser.error(f"--init {error}")
        if args.reconstruct:
            args.inherited = {k: v for k, v in saved.items() if k in args.recipe_defaults}
            vars(args).update(args.inherited)
    side = args.input_size // models.PATCH_SIZE
    grid = (args.num_frames // models.TUBELET_SIZE, side, side)  # (t, h, w) tokens of a clip
    hidden = masks.MASKS[args.mask_type](1, grid, args.mask_ratio)  # every clip hides as many
    if not hidden.any():
        t, h, w = grid
        parser.error(f"--mask_ratio {args.mask_ratio} hides no token of the {t}x{h}x{w} grid "
                     f"(--mask_type {args.mask_type}): nothing to rebuild; raise it or the --input_size")
    if args.decoder_mask_type == "run_cell" and side % 2:
        parser.error(f"--decoder_mask_type run_cell needs an even token grid; --input_size "
                     f"{args.input_size} gives {side}x{side}")
    return args


@engine.command  # a mistake found below: its one line, exit status 2; Ctrl-C: 130
def main(argv=None):
    args = parse_args(argv)
    if args.reconstruct:  # only pictures and losses of the --init weights (evaluate.py)
        return evaluate.reconstruct(args, engine.Context(args))
    ctx = engine.setup(args)  # this process (under torchrun: its rank and GPU), the lr, the seed

    # The videos: the training split (no labels needed), and held-out ones to score the model on.
    samples = data.load_samples(args.data_path, args.data_set, args.split, train=True)[0]
    samples = data.training_subset(samples, args.per_class)
    dataset = data.VideoDataset(samples, "pretrain", args.num_frames, args.sampling_rate,
                                args.input_size, num_sample=args.num_sample, seed=args.seed,
                                in_memory=args.in_memory)
    loader, sampler = data.make_loader(dataset, args, ctx, train=True)
    held_out = held_out_samples(samples, args)

    # The model (Fig. 1): an encoder over the visible tubelets, a narrow decoder for the hidden.
    net = models.build_model("pretrain", args.model, img_size=args.input_size,
                             num_frames=args.num_frames, norm_pix_loss=not args.no_norm_pix_loss)
    net = net.to(ctx.device)
    net.encoder.grad_checkpointing = args.grad_ckpt
    optimizer = torch.optim.AdamW(models.param_groups(net, args.weight_decay), lr=args.lr,
                                  betas=tuple(args.opt_betas), fused=True)
    run = engine.Run(args, ctx, net, optimizer, dataset)  # the output folder; resumes if it can
    if args.init and run.start_epoch == 0:  # existing weights; not a resume: epoch 0, fresh AdamW
        ctx.print(f"--init: {evaluate.load_pretraining(net, args.init)}")
    elif args.init:
        ctx.print(f"--init {args.init} not loaded: the run resumes from its own checkpoint")
    model = engine.wrap(net, args, ctx)  # compiled (--compile); DistributedDataParallel (torchrun)
    grid = net.encoder.grid  # (t, h, w) tokens of a clip
    make_mask = masks.MASKS[args.mask_type]
    n_visible = int((~make_mask(1, grid, args.mask_ratio, generator=torch.Generator())).sum())
    # Every clip's masks hide as many tokens: the model gathers them with fixed shapes.
    counts = {"num_hidden": masks.hidden_per_clip(args.mask_type, grid, args.mask_ratio),
              "num_not_rebuilt": masks.hidden_per_clip("run_cell", grid, args.decoder_mask_ratio)}
    ctx.print(f"{len(dataset)} videos, {len(loader) // args.accum_iter} steps/epoch, {grid} tokens "
              f"per clip, {n_visible} visible")
    clip = dataset[0][0][:1]  # one fixed clip, for the reconstruction picture of each checkpoint
    picture = functools.partial(evaluate.reconstruction_png, net, clip, args, ctx)

    for epoch in range(run.start_epoch, args.epochs):
        generator = engine.start_epoch(epoch, sampler, args, ctx)  # a resumed run draws alike
        meter = engine.Meter(run, epoch, loader)  # progress bar, loss, clips/s, damaged videos
        for step, batches in meter.steps():
            lr = run.set_lr(engine.lr_at(epoch + step / meter.num_steps, args))  # warmup, cosine
            for video, _, last in batches:  # video (B, 3, T, H, W), normalised; labels unused
                B = len(video)
                # Sec. 3.3: tube masking hides the same spatial positions in every frame.
                mask = make_mask(B, grid, args.mask_ratio, generator=generator, device=ctx.device)
                decode_mask = None  # VideoMAE V2: the decoder may rebuild a running-cell subset
                if args.decoder_mask_type == "run_cell":
                    decode_mask = masks.running_cell_mask(B, grid, args.decoder_mask_ratio,
                                                          generator=generator, device=ctx.device)
                with engine.gradient_sync(model, last), engine.autocast(args, ctx):
                    loss, pred = model(video, mask, decode_mask, **counts)  # MSE, hidden tubelets
                run.backward(loss)  # accumulated over --accum_iter micro-batches
                meter.record(loss, lr)
            run.step()  # AdamW on the accumulated gradient (clipped with --clip_grad)

        stats = meter.summary()
        stats["rebuilt_per_clip"] = pred.shape[1]  # tokens the decoder rebuilt, per clip
        if run.numbered(epoch) and held_out:  # has it learnt anything of videos? (evaluate.py)
            stats.update(evaluate.reconstruction_scores(net, held_out, args, ctx))
            if min(label for _, label in samples + held_out) >= 0:  # labelled: probe the encoder
                probe = evaluate.knn_probe(net.encoder, samples, held_out, args, ctx,
                                           frames=dataset.frames)
                stats["knn_top1"] = probe["top1"]
        run.end_epoch(epoch, stats, picture)
    run.close()


def held_out_samples(train_samples, args):
    """The test split's videos that pre-training does not see (none for one list or an unlabelled
    folder)."""
    seen = {path for path, _ in train_samples}
    test = data.load_samples(args.data_path, args.data_set, args.split, train=False)[0]
    return [(path, label) for path, label in test if path not in seen]


if __name__ == "__main__":
    main()
