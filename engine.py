"""What pretrain.py and finetune.py share, none of it VideoMAE itself: arguments and recipes,
processes under torchrun, the lr schedule, an epoch's bookkeeping, the optimizer step."""
import argparse
import contextlib
import functools
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import model as models
import plots
from weights import CheckpointError, RunFolder, listed, unwritable

# ---------------------------------------------------------------------------------------- arguments

def number(kind=float, least=-math.inf, most=math.inf, above=-math.inf, below=math.inf):
    """An argparse type: a `kind` number with least <= x <= most and above < x < below; argparse refuses any
    other with one line naming the flag and the range."""
    def parse(text):
        value = kind(text)
        if not (least <= value <= most and above < value < below):
            bounds = {"at least": least, "above": above, "at most": most, "below": below}
            words = " and ".join(f"{w} {b:g}" for w, b in bounds.items() if math.isfinite(b))
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {words}")
        return value
    parse.__name__ = kind.__name__  # argparse's words for no number: "invalid int value: 'x'"
    return parse


COUNT, SHARE = number(int, least=1), number(least=0, most=1)  # the commonest ranges


def device(text):
    """An argparse type: cpu, cuda:N or cuda, which becomes cuda:LOCAL_RANK (torchrun: each process its GPU)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is no device: give cpu, cuda or cuda:N")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible; use --device cpu")
    if text.startswith("cuda:") and "LOCAL_RANK" in os.environ:
        raise argparse.ArgumentTypeError(f"{text}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                                         f"give --device cuda, and choose GPUs with CUDA_VISIBLE_DEVICES")
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if text == "cuda" else text


# Flags whose default comes from the recipe (None until finish_args): names (a second: the reference's), type, help.
RECIPE_FLAGS = [
    (["--batch_size"], COUNT, "videos per process and step"),
    (["--epochs"], COUNT, ""),
    (["--input_size"], COUNT, "crop size in pixels"),
    (["--num_frames"], COUNT, "frames per clip"),
    (["--sampling_rate"], COUNT, "frame stride"),
    (["--warmup_epochs"], number(least=0), ""),
    (["--blr", "--lr"], number(above=0), "base lr: lr = blr x videos per optimizer step / 256"),
    (["--min_blr", "--min_lr"], number(least=0), "base lr at the end of the cosine, as blr"),
    (["--num_sample"], COUNT, "crops of each decoded clip (repeated sampling; not in the lr rule)"),
    (["--save_ckpt_freq"], COUNT, "epochs between numbered checkpoints"),
]


def common_parser(doc, recipes, demo):
    p = argparse.ArgumentParser(description=doc.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    arg = p.add_argument
    arg("--model", choices=list(models.PRESETS),
        help=f"model size (default {recipes['K400']['model']}; demo {demo['model']})")
    arg("--data_path", help="UCF-101/ or hmdb51_org/ root, a list file or a folder of videos")
    arg("--data_set", choices=["UCF101", "HMDB51", "list", "folder"], help="(guessed if absent)")
    arg("--recipe", choices=list(recipes), help="the reference's values for this data set, for every flag not "
        "given (default: the --data_set's own, else K400's; README: the recipes)")
    arg("--split", type=int, default=1, choices=[1, 2, 3], help="official UCF101/HMDB51 split")
    arg("--output_dir", help="where logs and checkpoints go (default runs/<script>-<data>)")
    for names, kind, hint in RECIPE_FLAGS:
        name = names[0][2:]
        arg(*names, dest=name, type=kind,
            help=f"{hint} (K400 recipe {recipes['K400'].get(name)}, demo {demo.get(name)})")
    arg("--accum_iter", "--update_freq", dest="accum_iter", type=COUNT,
        help="micro-batches per optimizer step (default: the recipe's videos per step, README)")
    arg("--in_memory", action="store_true", default=None,
        help="decode each video once and keep its frames in memory (default: the demo only)")
    arg("--per_class", type=COUNT, help="train on the first N videos of each class only")
    arg("--weight_decay", type=number(least=0), default=0.05)
    arg("--clip_grad", type=number(above=0), help="clip the gradient norm to this value")
    arg("--num_workers", type=number(int, least=0), help="loading processes per GPU (default: up to 8; 0 in memory)")
    arg("--resume", help="checkpoint to resume from (default: the newest in --output_dir)")
    arg("--latest_every", type=number(least=0), default=10, help="minutes between two writes of the newest "
        "checkpoint besides numbered and last epochs (a kill loses at most that); 0: every epoch")
    arg("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    arg("--dtype", choices=["bf16", "fp16", "fp32"], help="autocast (default: bf16 on GPUs, and in "
        "pretrain.py's demo on CPUs with bf16 instructions; else fp32)")
    arg("--compile", action="store_true", help="torch.compile the model")
    arg("--grad_ckpt", action="store_true", help="gradient checkpointing: less memory, more time")
    arg("--seed", type=number(int, least=0), default=0)
    return p


def finish_args(parser, argv, recipes, demo):
    """Parse (a number out of its type's range is refused there); every flag not given from the
    recipe (without --data_path, the demo's values over K400's); refuse bad values with one line."""
    args = parser.parse_args(argv)
    videos_only = next((k for k in ("predict", "reconstruct") if getattr(args, k, None)), None)
    args.demo = args.data_path is None and not videos_only  # --predict, --reconstruct: no data
    if args.demo:
        args.data_path = str(plots.make_demo_dataset("data/demo"))
        args.data_set = "list"
    if args.data_set is None and args.data_path:
        args.data_set = data.guess_data_set(args.data_path)
    args.recipe = args.recipe or (args.data_set if args.data_set in recipes else "K400")
    recipe = {**recipes[args.recipe], **demo, "gpus": 1} if args.demo else recipes[args.recipe]
    args.recipe_videos = recipe["batch_size"] * recipe["gpus"]  # videos per optimizer step
    args.recipe_defaults = sorted(k for k in recipe if k != "gpus" and getattr(args, k) is None)
    for key in args.recipe_defaults:  # the flags not given
        setattr(args, key, recipe[key])
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] or "run"
    run = videos_only or ("demo" if args.demo else args.data_set or "data")
    args.output_dir = args.output_dir or os.path.join("runs", f"{script}-{run}")
    if unwritable(args.output_dir):
        parser.error(f"--output_dir {args.output_dir}: {unwritable(args.output_dir)}")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.num_workers is None:  # clips cut from frames in memory need no worker processes
        args.num_workers = 0 if args.in_memory else min(8, os.cpu_count() or 1)
    for name, unit, size in (("num_frames", "tubelet", models.TUBELET_SIZE),
                             ("input_size", "patch", models.PATCH_SIZE)):
        if vars(args)[name] % size:
            parser.error(f"--{name} {vars(args)[name]} is not a multiple of the {unit} size {size}")
    return args


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU has bf16 matrix instructions, AVX512-BF16 or AMX, by Linux's flags (elsewhere: no)."""
    flags = Path(cpuinfo).read_text().split() if os.path.isfile(cpuinfo) else []
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------- processes

class Context:
    """Where this process runs, from torchrun's RANK, WORLD_SIZE and LOCAL_RANK: rank, world size,
    device. Only rank 0 prints."""

    def __init__(self, args):
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.main = self.rank == 0
        self.device = torch.device(args.device)
        if self.device.type == "cuda":  # cuda:N, from finish_args
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.world > 1:  # nccl between GPUs, gloo between CPU processes
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def print(self, *a):
        if self.main:
            print(*a, flush=True)


def setup(args):
    """The process's Context, the accumulation, the lr and min_lr, the seed. The reference's rule:
    the base values times videos per optimizer step / 256 (the num_sample clips cut from each video
    do not count). Without --accum_iter, the recipe's videos per step (README: fewer GPUs)."""
    ctx = Context(args)
    per_pass, recipe = args.batch_size * ctx.world, args.recipe_videos
    if args.accum_iter is None:  # exact where per_pass divides the recipe's step, else the nearest
        args.accum_iter = max(round(recipe / per_pass), 1)
    args.videos_per_step = videos = per_pass * args.accum_iter
    args.lr, args.min_lr = args.blr * videos / 256, args.min_blr * videos / 256
    name = "demo" if args.demo else args.recipe
    ctx.print(f"base lr {args.blr:.3g} x {videos} videos per step / 256 = lr {args.lr:.3g}, min_lr {args.min_lr:.3g} "
              f"({args.batch_size} videos x {ctx.world} processes x {args.accum_iter} accum; the {name} recipe: "
              f"{recipe} videos per step)")
    torch.manual_seed(args.seed)
    return ctx


def all_sum(values, ctx):
    """A list of numbers, summed over every process."""
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(t)
    return t.tolist()


def leave_process_group():
    if dist.is_initialized():
        dist.destroy_process_group()


def command(main):
    """main(argv) as a command: a mistake named below (data.DataError, weights.CheckpointError) is
    one line, exit status 2 as argparse's; Ctrl-C stops at once, 130, no traceback, files whole."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except (data.DataError, CheckpointError) as error:
            code, line = 2, f"error: {error}"
        except KeyboardInterrupt:
            code, line = 130, "\nstopped (Ctrl-C): the same command resumes the run"
        print(line, file=sys.stderr)
        leave_process_group()  # under torchrun, every process stops alike
        sys.exit(code)
    return run


def fail(message, ctx, bar):
    """Stop the run: the progress bar closed, `message` as rank 0's last line, exit status 1."""
    bar.close()
    ctx.print(message)
    leave_process_group()
    sys.exit(1)


# --------------------------------------------------------------------------- seeds, model, schedule

def start_epoch(epoch, sampler, args, ctx):
    """Seed the epoch's shuffle, torch's RNG (data workers, drop path, mixup) and a device generator
    (returned: masks, mixup and cutmix draw from it) from (seed, epoch, rank): a resumed run replays
    exactly what the uninterrupted one would."""
    sampler.set_epoch(epoch)
    torch.manual_seed(((args.seed + 1) * 1_000_003 + epoch) * 1009 + ctx.rank)
    seed = (args.seed * 1_000_003 + epoch) * 1009 + ctx.rank
    return torch.Generator(ctx.device).manual_seed(seed)


def wrap(net, args, ctx):
    """The module the loop calls: compiled with --compile, in DistributedDataParallel (torchrun)."""
    model = torch.compile(net) if args.compile else net
    if ctx.world > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


def lr_at(epoch, args):
    """Linear warmup from 0, then a cosine down to min_lr; `epoch` is fractional."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = min((epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8), 1.0)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(args, ctx):
    """Mixed precision for --dtype bf16 or fp16; nothing for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    return torch.autocast(ctx.device.type, dtype, enabled=dtype is not None)


def gradient_sync(model, sync):
    """DistributedDataParallel averages the gradients over processes in backward(); micro-batches
    before a step's last (--accum_iter) only add to them, without that exchange."""
    return contextlib.nullcontext() if sync or not isinstance(model, DistributedDataParallel) else model.no_sync()


# -------------------------------------------------------------------------- the epoch's bookkeeping

class Meter:
    """What a training epoch records beside the method: the progress bar, the loss, clips/s, time
    waiting for data, damaged videos, the finite-loss check, peak memory. steps() yields each
    optimizer step's micro-batches, record() takes their losses, summary() gives the figures."""

    def __init__(self, run, epoch, loader):
        self.run, self.ctx, self.args, self.epoch, self.loader = run, run.ctx, run.args, epoch, loader
        self.num_steps = len(loader) // self.args.accum_iter  # whole optimizer steps only
        self.batches_done, self.clips, self.substituted, self.wait = 0, 0, 0, 0.0
        self.loss_sum, self.lr = torch.zeros((), device=self.ctx.device), None
        self.bar = tqdm(total=self.num_steps, desc=f"epoch {epoch}", disable=not self.ctx.main, dynamic_ncols=True)
        loader.dataset.bad |= run.bad_videos.unreadable  # workers started from now skip these
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        self.start = time.perf_counter()

    def steps(self):
        """(step, its micro-batches) for each optimizer step."""
        batches = iter(self.loader)
        for step in range(self.num_steps):
            yield step, self._micro_batches(batches)
            self.bar.update(1)

    def _micro_batches(self, batches):
        """(video, labels, last) for each of a step's --accum_iter micro-batches: the num_sample
        clips of each video, ImageNet-normalised (B * num_sample, 3, T, H, W) on the device."""
        for k in range(self.args.accum_iter):
            waiting = time.perf_counter()
            try:
                video, labels, index, substituted, truncated = next(batches)
            except data.VideoReadError:  # every video failed (the first came with their names)
                path = self.args.data_path
                fail(f"stopping: none of the {len(self.loader.dataset)} videos of {path} can be "
                     f"read; run `python data.py --check {path}`", self.ctx, self.bar)
            self.wait += time.perf_counter() - waiting
            self.run.bad_videos.add(index, substituted, truncated)
            self.substituted += int(substituted.sum())
            video = data.normalize(video.to(self.ctx.device, non_blocking=True).flatten(0, 1))
            labels = labels.to(self.ctx.device, non_blocking=True).repeat_interleave(self.args.num_sample)  # pinned
            self.clips += video.shape[0]
            yield video, labels, k == self.args.accum_iter - 1

    def record(self, loss, lr):
        """A micro-batch's loss; every 10 micro-batches the checks that need every process."""
        self.loss_sum += loss.detach()
        self.lr = lr
        it = self.batches_done
        self.batches_done += 1
        if it % 10 == 0 or self.batches_done == self.num_steps * self.args.accum_iter:
            self._check(it)
            clips_s = self.clips * self.ctx.world / (time.perf_counter() - self.start)
            mean_loss = self.loss_sum.item() / self.batches_done
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_s:.1f}")

    def _check(self, it):
        """Every process stops together on a non-finite loss or too many unreadable videos."""
        if all_sum([float(not torch.isfinite(self.loss_sum))], self.ctx)[0] > 0:
            fail(f"loss is not finite at epoch {self.epoch} step {it}: stopping. The last good "
                 f"checkpoint is {self.run.latest}; lower --lr or --blr, or use --dtype bf16 "
                 f"instead of fp16, then rerun to resume.", self.ctx, self.bar)
        if self.run.bad_videos.sync(write=tqdm.write):  # (the lines above the progress bar)
            fail(self.run.bad_videos.too_many(self.args, self.run.latest), self.ctx, self.bar)

    def summary(self):
        """The epoch's figures for the log, summed over every process."""
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        totals = [self.loss_sum.item(), self.clips, self.substituted, self.batches_done]
        loss, clips, substituted, batches = all_sum(totals, self.ctx)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, on a CPU
        if self.ctx.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.ctx.device)
        return {"epoch": self.epoch, "loss": loss / batches, "lr": self.lr, "clips_per_s": clips / elapsed,
                "clips_per_step": clips * self.args.accum_iter * self.ctx.world / batches,
                "data_wait": self.wait / elapsed, "peak_mem_mb": round(peak / 2**20),
                "substituted": int(substituted), "epoch_s": elapsed}


class BadVideos:
    """A training run's record of damaged videos, from what the dataset's items report. Each worker loads only
    its share and knows only the broken files it met, so the record lives here, synchronised across the `world`
    processes: each file is named once per run; the unreadable ones all count against max_bad_fraction."""

    def __init__(self, dataset, world=1, main=True):
        self.samples, self.world, self.main = dataset.samples, world, main
        self.limit = max(int(dataset.max_bad_fraction * len(dataset)), 2)  # files tolerated
        self.unreadable, self.truncated = set(), set()
        self.news = []  # (sample index, frames that decode or 0) since the last sync

    def add(self, index, substituted, truncated):
        """A batch's news: item i skipped `substituted` unreadable samples, then read the next."""
        for i, skipped, frames in zip(index.tolist(), substituted.tolist(), truncated.tolist()):
            self.news += [(i + k, 0) for k in range(skipped)]
            if frames:
                self.news.append((i + skipped, frames))

    def sync(self, write):
        """Gather every process's news; write() names each new file. True when over the limit."""
        news = [self.news]
        if self.world > 1:
            news = [None] * self.world
            dist.all_gather_object(news, self.news)
        self.news = []
        for j, frames in (item for part in news for item in part):
            path = self.samples[j % len(self.samples)][0]
            known = self.truncated if frames else self.unreadable
            if path not in known and self.main:
                if frames:
                    write(f"truncated video, only its first {frames} frames decode (the last one repeats): {path}")
                else:
                    write(f"unreadable video, another sample used in its place: {path}")
            known.add(path)
        return len(self.unreadable) > self.limit

    def too_many(self, args, checkpoint):
        names = sorted(self.unreadable)
        check = f"python data.py --check {args.data_path}" + (f" --data_set {args.data_set}" if args.data_set else "")
        last = checkpoint if os.path.exists(checkpoint) else "none (no epoch finished)"
        return (f"stopping: {len(names)} of {len(self.samples)} training videos are unreadable, "
                f"more than the {self.limit} tolerated: {listed(names, 5)}; run `{check}` and remove or "
                f"re-encode them; the last good checkpoint is {last}")


# ------------------------------------------------------------------------------------------ the run

class Run:
    """A training run: its folder (weights.RunFolder: log, checkpoints, resuming from the newest),
    and the optimizer's side of a step (loss scaling, accumulation, clipping). Without an optimizer,
    an evaluation: it appends its lines to the folder's log and leaves every earlier file alone."""

    def __init__(self, args, ctx, net, optimizer, train_set=None):
        self.args, self.ctx, self.net, self.optimizer = args, ctx, net, optimizer
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.dtype == "fp16")
        self.folder = RunFolder(args.output_dir, ctx.main, 60 * args.latest_every)
        self.latest, self.log = self.folder.latest, self.folder.log
        self.bad_videos = BadVideos(train_set, ctx.world, ctx.main) if train_set is not None else None
        self.start_epoch = 0
        config = {"config": dict(vars(args)), "world_size": ctx.world}
        if optimizer is None:  # evaluation only: the caller loaded the weights
            ctx.print(f"evaluation: its lines are appended to {self.folder.log_path}")
            self.folder.log({**config, "evaluation": True})
            return
        resume = self.folder.resume_path(args.resume)  # --resume, else the newest: rank 0's choice
        if resume:
            self.start_epoch = self.folder.restore(resume, net, optimizer, self.scaler, ctx.print)
            ctx.print(f"resumed from {resume}: epoch {self.start_epoch} of {args.epochs}")
        self.folder.start(config, self.start_epoch if resume else None)

    def set_lr(self, lr):
        """The schedule's lr for this step, times each group's layer-wise scale (fine-tuning)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def backward(self, loss):
        """Add this micro-batch's gradient, of loss / accum_iter (as one larger batch would), scaled
        by the fp16 loss scaler (a no-op otherwise)."""
        self.scaler.scale(loss / self.args.accum_iter).backward()

    def step(self):
        """AdamW on the accumulated gradients: unscaled, clipped to --clip_grad, applied, zeroed."""
        if self.args.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def numbered(self, epoch):
        """Epochs with a numbered checkpoint and held-out figures: each save_ckpt_freq, the last."""
        return (epoch + 1) % self.args.save_ckpt_freq == 0 or epoch + 1 == self.args.epochs

    def end_epoch(self, epoch, stats, picture=None):
        """Log the epoch, then checkpoint it (the newest when due, --latest_every; a numbered one,
        and then picture(path), if given, draws recon-NNNN.png beside it)."""
        self.folder.log(stats)
        self.folder.draw_curves()
        ckpt = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "config": vars(self.args)}
        self.folder.save(ckpt, numbered=self.numbered(epoch))
        if picture and self.numbered(epoch) and self.ctx.main:
            picture(os.path.join(self.args.output_dir, f"recon-{epoch:04d}.png"))
        self.ctx.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))

    def close(self):
        leave_process_group()
