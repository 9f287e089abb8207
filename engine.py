"""What pretrain.py and finetune.py share: arguments and recipes, processes (torchrun), loaders, the lr
schedule, the epoch's bookkeeping, checkpoints, resuming and the log."""
import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import model as models
import plots
from weights import atomic_write, read_file


def common_parser(doc, recipes, demo):
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arg = p.add_argument
    arg("--model", choices=list(models.PRESETS), help=f"model size (default {recipes['K400']['model']}; demo {demo['model']})")
    arg("--data_path", help="UCF-101/ or hmdb51_org/ root, a list file or a folder of videos (default: the demo set)")
    arg("--data_set", choices=["UCF101", "HMDB51", "list", "folder"], help="format of --data_path (guessed if absent)")
    arg("--recipe", choices=list(recipes), help="the reference's values for this data set, for every flag not given "
                                                "(default: the --data_set's own, else K400's; README: the recipes)")
    arg("--split", type=int, default=1, choices=[1, 2, 3], help="official UCF101/HMDB51 split")
    arg("--output_dir", help="where logs and checkpoints go (default runs/<script>-<data>)")
    # Recipe values (None until finish_args): names as in this project, then the reference's spelling where it differs.
    for names, kind, hint in [(["--batch_size"], int, "videos per process and step"), (["--epochs"], int, ""),
                              (["--input_size"], int, "crop size in pixels"), (["--num_frames"], int, "frames per clip"),
                              (["--sampling_rate"], int, "frame stride"), (["--warmup_epochs"], float, ""),
                              (["--blr", "--lr"], float, "base lr: lr = blr x videos per optimizer step / 256"),
                              (["--min_blr", "--min_lr"], float, "base lr at the end of the cosine, scaled as blr"),
                              (["--num_sample"], int, "crops of each decoded clip (repeated sampling; not counted by the lr)"),
                              (["--save_ckpt_freq"], int, "epochs between numbered checkpoints")]:
        name = names[0][2:]
        arg(*names, dest=name, type=kind, help=f"{hint} (K400 recipe {recipes['K400'].get(name)}, demo {demo.get(name)})")
    arg("--accum_iter", "--update_freq", dest="accum_iter", type=int, default=1,
        help="steps of gradient accumulation per optimizer step")
    arg("--in_memory", action="store_true", default=None,
        help="decode each training video once and keep its frames in memory, for small sets (default: on the demo only)")
    arg("--per_class", type=int, help="train on the first N videos of each class only (data-efficiency studies)")
    arg("--weight_decay", type=float, default=0.05)
    arg("--clip_grad", type=float, help="clip the gradient norm to this value")
    arg("--num_workers", type=int, help="data loading processes per GPU (default: up to 8; none with --in_memory)")
    arg("--resume", help="checkpoint to resume from (default: the newest in --output_dir)")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arg("--dtype", choices=["bf16", "fp16", "fp32"], help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    arg("--compile", action="store_true", help="torch.compile the model")
    arg("--grad_ckpt", action="store_true", help="gradient checkpointing: less memory for large models")
    arg("--seed", type=int, default=0)
    return p


def finish_args(parser, argv, recipes, demo):
    """Parse, fill every flag not given from the recipe (the demo's values over K400's without --data_path) and
    reject bad values with one line."""
    args = parser.parse_args(argv)
    args.demo = args.data_path is None and not getattr(args, "predict", None)  # finetune.py --predict reads no data set
    if args.demo:
        args.data_path, args.data_set = str(data.make_demo_dataset("data/demo")), "list"
    elif args.data_path is not None and not os.path.exists(args.data_path):
        parser.error(f"--data_path {args.data_path} does not exist")
    args.data_set = args.data_set or (data.guess_data_set(args.data_path) if args.data_path else None)
    args.recipe = args.recipe or (args.data_set if args.data_set in recipes else "K400")
    recipe = {**recipes[args.recipe], **demo} if args.demo else recipes[args.recipe]
    args.recipe_defaults = sorted(k for k in recipe if getattr(args, k, None) is None)  # flags not given
    for key in args.recipe_defaults:
        setattr(args, key, recipe[key])
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "run"
    run = "predict" if getattr(args, "predict", None) else "demo" if args.demo else args.data_set or "data"
    args.output_dir = args.output_dir or os.path.join("runs", f"{script}-{run}")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.num_workers is None:  # clips cut from frames held in memory cost less than starting worker processes
        args.num_workers = 0 if args.in_memory else min(8, os.cpu_count() or 1)
    if args.num_frames % models.TUBELET_SIZE:
        parser.error(f"--num_frames {args.num_frames} is not a multiple of the tubelet size {models.TUBELET_SIZE}")
    if args.input_size % models.PATCH_SIZE:
        parser.error(f"--input_size {args.input_size} is not a multiple of the patch size {models.PATCH_SIZE}")
    for name in ("batch_size", "epochs", "sampling_rate", "num_sample", "accum_iter", "save_ckpt_freq", "per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible; use --device cpu")
    return args


class Context:
    """Where this process runs: rank, world size, device; only rank 0 prints."""

    def __init__(self, args):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.world > 1:  # started by torchrun: nccl between GPUs, gloo between CPU processes
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def print(self, *a):
        if self.main:
            print(*a, flush=True)


def setup(args):
    """The process's Context, the lr and min_lr from the base values, the seed. The reference's rule: the base
    values times videos per optimizer step / 256; the num_sample clips cut from each video are not counted."""
    ctx = Context(args)
    videos = args.batch_size * ctx.world * args.accum_iter  # videos per optimizer step
    args.lr = args.blr * videos / 256
    args.min_lr = args.min_blr * videos / 256
    ctx.print(f"base lr {args.blr:.3g} x {videos} videos per step / 256 = lr {args.lr:.3g}, min_lr {args.min_lr:.3g}"
              f" ({args.batch_size} videos x {ctx.world} processes x {args.accum_iter} accum; recipe {'demo' if args.demo else args.recipe})")
    torch.manual_seed(args.seed)
    return ctx


def training_subset(samples, args):
    """The first --per_class training videos of each class; all of them without the flag."""
    kept, count = [], {}
    for path, label in samples:
        count[label] = count.get(label, 0) + 1
        if args.per_class is None or count[label] <= args.per_class:
            kept.append((path, label))
    return kept


def start_epoch(epoch, sampler, args, ctx):
    """Seed the epoch's shuffle, torch's RNG (data workers, drop path, mixup) and a device generator from (seed,
    epoch, rank): a resumed run replays exactly what the uninterrupted one would."""
    sampler.set_epoch(epoch)
    torch.manual_seed(((args.seed + 1) * 1_000_003 + epoch) * 1009 + ctx.rank)
    return torch.Generator(ctx.device).manual_seed((args.seed * 1_000_003 + epoch) * 1009 + ctx.rank)


def param_groups(model, weight_decay, layer_decay=None):
    """AdamW groups: decay only on matrices (dim >= 2; not biases, norms, mask_token); with layer_decay,
    lr scale layer_decay^(L+1-k): k = 0 for the patch embedding, i+1 for block i, L+1 for fc_norm and head."""
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and name != "mask_token"
        layer = (0 if name.startswith("patch_embed") else int(name.split(".")[1]) + 1 if name.startswith("blocks.")
                 else depth + 1)
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        g = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale})
        g["params"].append(p)
    return list(groups.values())


def lr_at(epoch, args):
    """Linear warmup from 0, then a cosine down to min_lr; `epoch` is fractional (a pure function)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast(args, ctx):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    return torch.autocast(ctx.device.type, dtype) if dtype else contextlib.nullcontext()


def make_loader(dataset, args, ctx, train):
    from torch.utils.data import DataLoader, DistributedSampler
    sampler = DistributedSampler(dataset, ctx.world, ctx.rank, shuffle=train, seed=args.seed, drop_last=train)
    loader = DataLoader(dataset, args.batch_size, sampler=sampler, num_workers=args.num_workers, drop_last=train,
                        pin_memory=ctx.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if args.num_workers else None)
    if train and len(loader) < args.accum_iter:  # drop_last: not one whole step; the loop would run none
        fail(f"{len(dataset)} training videos make no step of {args.batch_size} videos x {ctx.world} processes x "
             f"{args.accum_iter} accum_iter = {args.batch_size * ctx.world * args.accum_iter}; lower --batch_size "
             f"or --accum_iter, or add videos", ctx)
    return loader, sampler


def wrap(net, args, ctx):
    model = torch.compile(net) if args.compile else net
    if ctx.world > 1:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


def all_sum(values, ctx):
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def gather(t, ctx):
    """Rows of every process, concatenated (each holds the same number: the sampler pads)."""
    if ctx.world == 1:
        return t
    parts = [torch.empty_like(t.to(ctx.device)) for _ in range(ctx.world)]
    dist.all_gather(parts, t.to(ctx.device))
    return torch.cat(parts).cpu()


def train_epoch(model, loader, optimizer, run, epoch, step, args, ctx):
    """One epoch of `loss = step(clips, labels)` with accumulation, lr schedule, clipping and the epoch's figures."""
    model.train()
    n_steps = len(loader) // args.accum_iter
    loss_sum, clips, subst, wait, t0 = torch.zeros((), device=ctx.device), 0, 0, 0.0, time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"epoch {epoch}", disable=not ctx.main, dynamic_ncols=True)
    loader.dataset.bad |= run.bad_videos.unreadable  # this epoch's workers skip the files known to be broken
    batches = iter(loader)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    for it in range(n_steps * args.accum_iter):
        tw = time.perf_counter()
        try:
            video, labels, index, substituted, truncated = next(batches)
        except data.VideoReadError:  # every video failed (the first failures came with their names)
            fail(f"stopping: none of the {len(loader.dataset)} videos of {args.data_path} can be read; run "
                 f"`python data.py --check {args.data_path}`", ctx, bar)
        wait += time.perf_counter() - tw
        run.bad_videos.add(index, substituted, truncated)
        video = data.normalize(video.to(ctx.device, non_blocking=True).flatten(0, 1))  # (B*num_sample, 3, T, H, W)
        labels = labels.to(ctx.device).repeat_interleave(args.num_sample)
        if it % args.accum_iter == 0:  # one lr per optimizer step, set at its first batch: as with a bigger batch
            lr = lr_at(epoch + it // args.accum_iter / n_steps, args)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        sync = (it + 1) % args.accum_iter == 0
        with (contextlib.nullcontext() if sync or ctx.world == 1 else model.no_sync()), autocast(args, ctx):
            loss = step(video, labels)
        run.scaler.scale(loss / args.accum_iter).backward()
        if sync:
            if args.clip_grad:
                run.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            run.scaler.step(optimizer)
            run.scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        clips, subst = clips + video.shape[0], subst + int(substituted.sum())
        if it % 10 == 0 or it == n_steps * args.accum_iter - 1:
            check_finite(loss_sum, epoch, it, run, ctx, bar)
            if run.bad_videos.sync():
                fail(run.bad_videos.too_many(args, run.latest), ctx, bar)
            bar.set_postfix(loss=f"{loss_sum.item() / (it + 1):.4f}", lr=f"{lr:.2e}",
                            clips_s=f"{clips * ctx.world / (time.perf_counter() - t0):.1f}")
        bar.update(sync)
    bar.close()
    elapsed = time.perf_counter() - t0
    total_loss, total_clips, total_subst, total_steps = all_sum([loss_sum.item(), clips, subst, it + 1], ctx)
    peak = (torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"epoch": epoch, "loss": total_loss / total_steps, "lr": lr, "clips_per_s": total_clips / elapsed,
            "clips_per_step": total_clips * args.accum_iter * ctx.world / total_steps, "data_wait": wait / elapsed,
            "peak_mem_mb": round(peak), "substituted": int(total_subst), "epoch_s": elapsed}


def check_finite(loss_sum, epoch, it, run, ctx, bar):
    if all_sum([float(not torch.isfinite(loss_sum))], ctx)[0] > 0:  # every process stops together
        fail(f"loss is not finite at epoch {epoch} step {it}: stopping. The last good checkpoint is "
             f"{run.latest}; lower --lr or --blr, or use --dtype bf16 instead of fp16, then rerun to resume.", ctx, bar)


def fail(message, ctx, bar=None):
    """Stop the run: progress bar closed, `message` as rank 0's last line, exit status 1 on every process, no
    traceback; the checkpoints stay as they are."""
    if bar is not None:
        bar.close()
    ctx.print(message)
    leave_process_group(ctx)
    sys.exit(1)


def leave_process_group(ctx):
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


class BadVideos:
    """The run's record of damaged training videos, from what the items report. Workers restart every epoch and
    each loads only its share, so the record lives here, synchronised across processes: each file is named once
    per run, and the unreadable ones of all workers and processes count against the dataset's max_bad_fraction."""

    def __init__(self, dataset, ctx):
        self.samples, self.ctx = dataset.samples, ctx
        self.limit = max(int(dataset.max_bad_fraction * len(dataset)), 2)  # unreadable files tolerated
        self.unreadable, self.truncated, self.news = set(), set(), []  # news: (sample, frames that decode or 0)

    def add(self, index, substituted, truncated):
        """A batch's items: item i skipped `substituted` unreadable samples, then read i + substituted."""
        for i, skipped, frames in zip(index.tolist(), substituted.tolist(), truncated.tolist()):
            self.news += [(i + k, 0) for k in range(skipped)] + ([(i + skipped, frames)] if frames else [])

    def sync(self):
        """Gather every process's news; name each new file (above the progress bar). True when over the limit."""
        mine, self.news = self.news, []
        news = [mine]
        if self.ctx.world > 1:
            news = [None] * self.ctx.world
            dist.all_gather_object(news, mine)
        for j, frames in (item for part in news for item in part):
            path = self.samples[j % len(self.samples)][0]
            known = self.truncated if frames else self.unreadable
            if path not in known and self.ctx.main:
                tqdm.write(f"truncated video, only its first {frames} frames decode (the last one repeats): {path}"
                           if frames else f"unreadable video, another sample used in its place: {path}")
            known.add(path)
        return len(self.unreadable) > self.limit

    def too_many(self, args, checkpoint):
        names = sorted(self.unreadable)
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        check = f"python data.py --check {args.data_path}" + (f" --data_set {args.data_set}" if args.data_set else "")
        return (f"stopping: {len(names)} of {len(self.samples)} training videos are unreadable, more than the "
                f"{self.limit} tolerated: {listed}; run `{check}` and remove or re-encode them; the last good "
                f"checkpoint is {checkpoint if os.path.exists(checkpoint) else 'none (no epoch finished)'}")


def resume_path(args):
    """--resume, else the newest checkpoint in --output_dir; None for a fresh run."""
    latest = os.path.join(args.output_dir, "checkpoint-latest.pth")
    return args.resume or (latest if os.path.exists(latest) else None)


CURVES = {"loss": "training loss", "lr": "learning rate", "val_top1": "validation top-1",
          "knn_top1": "k-NN probe top-1, frozen encoder"}  # what curves.png draws, when the log has it


def curves_png(log_path, path):
    """curves.png: one panel for each figure of CURVES that log.jsonl holds, against the epoch."""
    records = [r for r in map(json.loads, Path(log_path).read_text().splitlines()) if "epoch" in r]
    panels = [plots.line_chart([(r["epoch"], r[key]) for r in records if key in r], title,
                               percent=key.endswith("top1"))
              for key, title in CURVES.items() if any(key in r for r in records)]
    write_png(path, np.hstack(panels))


def write_png(path, img):
    atomic_write(path, lambda tmp: cv2.imwrite(tmp, img), suffix=".png")


class Run:
    """The output folder: log.jsonl, atomic checkpoints, and resuming from the newest one. Without an optimizer,
    an evaluation: it appends its lines to the log and leaves every earlier file alone."""

    def __init__(self, args, ctx, net, optimizer, train_set=None):
        self.args, self.ctx, self.net, self.optimizer = args, ctx, net, optimizer
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.dtype == "fp16")
        self.log_path = os.path.join(args.output_dir, "log.jsonl")
        self.latest = os.path.join(args.output_dir, "checkpoint-latest.pth")
        self.bad_videos = None if train_set is None else BadVideos(train_set, ctx)
        self.start_epoch = 0
        config = {"config": {k: v for k, v in vars(args).items()}, "world_size": ctx.world}
        if optimizer is None:  # evaluation only: weights were loaded by the caller
            if ctx.main:
                os.makedirs(args.output_dir, exist_ok=True)
                ctx.print(f"evaluation: its lines are appended to {self.log_path}")
            self.log({**config, "evaluation": True})
            return
        resume = resume_path(args)
        if resume:
            ckpt = read_file(resume)
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.start_epoch = ckpt["epoch"] + 1
            ctx.print(f"resumed from {resume}: epoch {self.start_epoch} of {args.epochs}")
        if ctx.main:
            os.makedirs(args.output_dir, exist_ok=True)
            for name in os.listdir(args.output_dir):  # half-written files of a killed run
                if ".tmp" in name:
                    os.remove(os.path.join(args.output_dir, name))
            # an epoch is logged before its checkpoint is written: a killed run may have logged epochs that its
            # checkpoint does not hold (or half a line). They are run, and logged, again.
            old = [line for line in open(self.log_path)] if resume and os.path.exists(self.log_path) else []
            keep = [line for line in old if logged_epoch(line) < self.start_epoch]
            config["resumed_at_epoch"] = self.start_epoch if resume else None
            atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(keep) + json.dumps(config) + "\n"))

    def log(self, record):
        if self.ctx.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def end_epoch(self, epoch, stats, picture=None):
        """Log, then checkpoint (latest every epoch, numbered every save_ckpt_freq and at the end): whenever the
        run is killed, the log holds every epoch of the newest checkpoint, and a resume drops the lines past it."""
        args, ctx = self.args, self.ctx
        self.log(stats)
        if ctx.main:
            curves_png(self.log_path, os.path.join(args.output_dir, "curves.png"))
        if ctx.main:
            ckpt = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict(), "epoch": epoch, "config": vars(args)}
            atomic_write(self.latest, lambda tmp: torch.save(ckpt, tmp))
            if self.numbered(epoch):
                atomic_write(os.path.join(args.output_dir, f"checkpoint-{epoch:04d}.pth"), lambda tmp: torch.save(ckpt, tmp))
                if picture:
                    picture(os.path.join(args.output_dir, f"recon-{epoch:04d}.png"))
        ctx.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))

    def numbered(self, epoch):
        """Epochs that get a numbered checkpoint (and the held-out figures): every save_ckpt_freq, and the last."""
        return (epoch + 1) % self.args.save_ckpt_freq == 0 or epoch + 1 == self.args.epochs

    def close(self):
        leave_process_group(self.ctx)


def logged_epoch(line):
    """The epoch of a log line; -1 for other lines; inf for half a line (a killed write), which is dropped."""
    try:
        return json.loads(line).get("epoch", -1)
    except json.JSONDecodeError:
        return math.inf
