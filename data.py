"""Video data, top down: the frames a clip takes and its crops (the reference's rules, from
github.com/MCG-NJU/VideoMAE kinetics.py, ssv2.py, transforms.py), the dataset of uint8 clips, data sets
on disk (the demo set is drawn by plots.py), and frame-exact OpenCV reading that survives broken files.
`python data.py --check DATA_PATH` reports unreadable, truncated, slow and short videos."""
import argparse
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

import plots
from model import IMAGENET_MEAN, IMAGENET_STD, imagenet_stats  # noqa: F401 (shared with the loss)

VIDEO_EXTS = ('.avi', '.mp4', '.mkv', '.webm', '.mov', '.m4v')
SPLIT_DIRS = {'UCF101': 'ucfTrainTestlist', 'HMDB51': 'testTrainMulti_7030_splits'}  # official splits' folders

# DataLoader worker processes (which inherit this) give the parallelism: decoders run one thread, as OpenCV pools
# on 224-pixel crops cost more to sync than they save. A broken file is reported once, by name, by its reader:
# FFmpeg's and OpenCV's lines on it ("moov atom not found") would repeat per worker and epoch.
cv2.setNumThreads(1)
os.environ.setdefault('OPENCV_FFMPEG_LOGLEVEL', '-8')  # AV_LOG_QUIET, read at OpenCV's first open
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def normalize(clips):
    """uint8 RGB (..., T, H, W, 3) -> ImageNet-normalised float32 (..., 3, T, H, W), same device."""
    x = clips.movedim(-1, -4).contiguous().float()  # reorder uint8 (1 byte a value), then convert
    mean, std = (v.view(3, 1, 1, 1) * 255 for v in imagenet_stats(x.device))  # built once a device
    return x.sub_(mean).div_(std)


# --------------------------------------------------------------------------- which frames: sampling

def clip_indices(n, mode, num_frames=16, sampling_rate=4, sampling='i3d', rng=None, test_num_segment=5):
    """Frame indices (num_frames,) of one random clip (pretrain/train) or of test_num_segment test
    clips, as a list, by the reference's rules, short videos included (kinetics.py, ssv2.py)."""
    T, r, S = num_frames, sampling_rate, test_num_segment
    if sampling == 'segment' and mode == 'test':
        tick = n / T  # ssv2.py: T segments, the clips at offsets 0 and 1/2 of one (S = 2)
        clips = [[int(tick * v / S + tick * t) for t in range(T)] for v in range(S)]
    elif sampling == 'segment':
        length = n // T  # ssv2.py: T segments of n // T frames, one drawn in each; all 0 if n < T
        offsets = rng.integers(length, size=T) if length else 0
        clips = [np.arange(T) * length + offsets]
    elif mode == 'pretrain':  # the pre-training loader: stride r from a random start; a step
        start = rng.integers(max(n - T * r, 0) + 1)  # that would reach the last frame (or past it)
        steps = max((n - 2 - start) // r, 0)  # is not taken, and the frame reached last repeats
        clips = [start + r * np.minimum(np.arange(T), steps)]
    elif mode == 'train' and n > T * r:
        end = rng.integers(T * r, n)  # kinetics.py: T frames evenly in [end - T*r, end), end random
        clips = [np.minimum(np.linspace(end - T * r, end, T), end - 1)]
    elif mode == 'train':  # kinetics.py, n <= T*r: n // r frames evenly over [0, n], the last
        clips = [np.concatenate([np.linspace(0, n, n // r), np.full(T - n // r, n)])]  # repeated
    else:  # kinetics.py test: S clips of T evenly spaced in every r-th frame, last repeated to T
        strided = -(-n // r)  # frames at stride r
        every = r * np.minimum(np.arange(max(strided, T)), strided - 1)
        room = len(every) - T  # where clips can start; a single clip starts in the middle
        starts = [int(v * (room / (S - 1))) for v in range(S)] if S > 1 else [room // 2]
        clips = [every[s:s + T] for s in starts]
    return [np.clip(np.asarray(c).astype(np.int64), 0, n - 1) for c in clips]


# ------------------------------------------------------------------------ where in the frame: crops

def multiscale_crop_box(H, W, size, rng):
    """(x, y, w, h) of pre-training's GroupMultiScaleCrop (transforms.py): sides of 1, .875, .75 or
    .66 times the short side, width and height scale indices at most 1 apart, 13 fixed offsets."""
    sides = [int(min(H, W) * s) for s in (1, .875, .75, .66)]
    sides = [size if abs(s - size) < 3 else s for s in sides]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    w, h = pairs[rng.integers(len(pairs))]
    offsets = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0),
               (1, 1), (3, 1), (1, 3), (3, 3)]  # quarters of the room left: corners, centre, edges
    a, b = offsets[rng.integers(13)]
    return a * ((W - w) // 4), b * ((H - h) // 4), w, h


def resized_crop_box(H, W, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries=10, largest=None):
    """(x, y, w, h) of fine-tuning's crop (torchvision's RandomResizedCrop draw): area a uniform
    fraction `scale` of the frame's, aspect w / h log-uniform in `ratio`, sides at most `largest`
    (h, w) (the frame's by default); None after `tries` draws that do not fit."""
    max_h, max_w = largest or (H, W)
    for _ in range(tries):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= max_w and 0 < h <= max_h:
            return int(rng.integers(W - w + 1)), int(rng.integers(H - h + 1)), w, h
    return None


def eval_crop_boxes(H, W, num_crop):
    """Test crops (kinetics.py): short-side squares from end to end of the long side (1: centre)."""
    s, room = min(H, W), abs(W - H)
    starts = np.linspace(0, room, num_crop) if num_crop > 1 else [room / 2]
    return [(int(o), 0, s, s) if W >= H else (0, int(o), s, s) for o in starts]


def _render(frames, indices, box, size, flip, out, area=False):
    """Fill `out`, uint8 (T, size, size, 3), with RGB frames: crop the BGR frames, resize into it,
    colour-convert (and flip) in place, copying no clip. Bilinear; with `area`, crops larger than
    `size` both ways are averaged (INTER_AREA), like the reference pre-training's PIL filter."""
    x, y, w, h = box
    interpolation = cv2.INTER_AREA if area and w > size and h > size else cv2.INTER_LINEAR
    for t, i in enumerate(indices):
        cv2.resize(frames[i][y:y + h, x:x + w], (size, size), dst=out[t], interpolation=interpolation)
    rows = out.reshape(-1, size, 3)  # the frames stacked vertically: one OpenCV call for the clip
    cv2.cvtColor(rows, cv2.COLOR_BGR2RGB, dst=rows)
    if flip:  # mirror each row: every frame flips left-right
        cv2.flip(rows, 1, dst=rows)
    return out


# -------------------------------------------------------------------------------------- the dataset

class VideoDataset(torch.utils.data.Dataset):
    """Items (clips uint8 (V, T, H, W, 3), label, index, substituted, truncated): V = num_sample crops of
    one decoded clip (repeated sampling) in pretrain/train mode, test_num_segment x test_num_crop views
    in test mode; augment(view, rng) alters each train crop in place. Unreadable videos give way to the
    next sample (`substituted` counts those skipped from `index` on, engine.BadVideos names them);
    `truncated`: frames decoded if a file has fewer than it claims."""

    def __init__(self, samples, mode, num_frames=16, sampling_rate=4, input_size=224, num_sample=1,
                 sampling='i3d', flip=None, augment=None, crop_scale=(0.08, 1.0), test_num_segment=5,
                 test_num_crop=3, max_bad_fraction=0.05, seed=0, in_memory=False):
        if mode not in ('pretrain', 'train', 'test') or sampling not in ('i3d', 'segment') or not samples:
            raise ValueError(f"mode {mode!r} (pretrain/train/test), sampling {sampling!r} "
                             f"(i3d/segment), {len(samples)} samples; check the arguments")
        self.samples, self.mode, self.sampling, self.seed = list(samples), mode, sampling, seed
        self.T, self.rate, self.size = num_frames, sampling_rate, input_size
        self.num_sample, self.augment, self.crop_scale = num_sample, augment, tuple(crop_scale)
        self.flip = mode == 'train' if flip is None else flip
        self.segments, self.crops, self.max_bad_fraction = test_num_segment, test_num_crop, max_bad_fraction
        self.views = test_num_segment * test_num_crop if mode == 'test' else num_sample  # V
        self.bad = set()  # unreadable files, skipped untried (workers started later inherit it)
        self.frames = {}  # in_memory: path -> every BGR frame (n, H, W, 3); small sets decode once
        if in_memory:
            paths = sorted({path for path, _ in self.samples})
            with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # decoding releases the GIL
                decoded = dict(zip(paths, pool.map(_decode_all, paths)))
            self.frames = {path: frames for path, frames in decoded.items() if frames is not None}

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        """item: a sample's index, or (index, epoch) from EpochSampler."""
        i, epoch = item if isinstance(item, tuple) else (item, None)
        for substituted in range(len(self)):
            j = (i + substituted) % len(self)
            path = self.samples[j][0]
            if path in self.bad:
                continue
            try:
                clips = torch.from_numpy(self._load(j, epoch))
                return clips, self.samples[j][1], i, substituted, _TRUNCATED.get(path, 0)
            except VideoReadError:
                self.bad.add(path)
        raise VideoReadError(f"none of the {len(self)} videos is readable; run `python data.py --check DATA_PATH`")

    def _load(self, j, epoch=None):
        """The views of sample j, uint8 (V, T, H, W, 3); VideoReadError for an unreadable file. Its
        random draws come from (seed, j, epoch): new each epoch, replayed on resume, the same in any
        worker; without an epoch, from torch's RNG."""
        path = self.samples[j][0]
        video = self.frames.get(path)
        cap, n = _open(path) if video is None else (None, len(video))
        if epoch is None:  # a draw of torch's RNG in its place
            epoch = int(torch.randint(2 ** 62, ()))
        rng = np.random.default_rng([self.seed, j, epoch])
        clips = clip_indices(n, self.mode, self.T, self.rate, self.sampling, rng, self.segments)
        if self.mode != 'test':  # repeated sampling, as the reference's fine-tuning: the same
            clips = clips * self.num_sample  # frames, num_sample crops
        if video is None:
            video = _decode(cap, path, sorted(set(np.concatenate(clips).tolist())))
        H, W = video[clips[0][0]].shape[:2]
        if self.mode == 'test':
            views = [(c, box) for c in clips for box in eval_crop_boxes(H, W, self.crops)]
        elif self.mode == 'pretrain':
            views = [(c, multiscale_crop_box(H, W, self.size, rng)) for c in clips]
        else:  # fine-tuning: random resized crop, the whole frame after 10 misses
            views = [(c, resized_crop_box(H, W, rng, self.crop_scale) or (0, 0, W, H)) for c in clips]
        out = np.empty((len(views), len(clips[0]), self.size, self.size, 3), np.uint8)
        for view, (c, box) in zip(out, views):
            flip = self.flip and rng.random() < 0.5
            _render(video, c, box, self.size, flip, view, area=self.mode == 'pretrain')
            if self.mode == 'train' and self.augment:
                self.augment(view, rng)  # on the crop (the reference: on whole frames, before it)
        return out


class EpochSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler whose items are (index, epoch): DataLoader workers kept from epoch to
    epoch (persistent_workers) keep their own RNG, so the epoch comes with each item instead."""

    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())


def make_loader(dataset, args, ctx, train):
    """A DataLoader over this process's share of the videos; for training shuffled, its workers kept
    across epochs. A test batch holds at most a training batch's clips (or one video's views), so
    its workers' prefetched batches fit where training's do (16 x 15 views would be 578 MB each)."""
    sampler = EpochSampler(dataset, ctx.world, ctx.rank, shuffle=train, seed=args.seed, drop_last=train)
    batch = args.batch_size if train else max(1, args.batch_size * args.num_sample // dataset.views)
    loader = torch.utils.data.DataLoader(
        dataset, batch, sampler=sampler, num_workers=args.num_workers, drop_last=train,
        pin_memory=ctx.device.type == "cuda", persistent_workers=train and args.num_workers > 0,
        prefetch_factor=4 if args.num_workers else None)
    if train and len(loader) < args.accum_iter:  # not one whole step: the loop would run none
        step = f"{args.batch_size} videos x {ctx.world} processes x {args.accum_iter} accum_iter"
        raise DataError(f"{len(dataset)} training videos make no step of {step} = {args.videos_per_step}; "
                        f"lower --batch_size or --accum_iter, or add videos")
    return loader, sampler


# -------------------------------------------------------------------------------- data sets on disk

class DataError(ValueError):
    """A data set unfit for use as given: its one-line message names the file and the fix."""


def load_samples(data_path, data_set=None, split=1, train=True, missing_ok=False):
    """(samples [(path, label)], class_names); labels 0-based, -1 unlabelled. data_set: 'UCF101', 'HMDB51'
    (as distributed, split folder beside or inside), 'list' (a list file, or a folder with train.txt and
    val.txt if any), 'folder' (class subfolders, else unlabelled), 'demo', None: guess. DataError: no
    training video, a listed (linked) one missing (missing_ok: kept)."""
    root = Path(data_path)
    if data_set == 'demo':  # an existing demo set is used whatever its parameters
        if not (root / 'meta.json').is_file():
            root = plots.make_demo_dataset(root)
        data_set = 'list'
    if not root.exists():
        raise DataError(f"--data_path {root} does not exist")
    splits = _split_dirs(root)
    data_set = data_set or guess_data_set(root)
    if data_set in SPLIT_DIRS and data_set not in splits:
        raise DataError(f"{root}: no {SPLIT_DIRS[data_set]}/ inside or beside it for the split "
                        f"files; give the data set's folder as distributed")
    if data_set == 'UCF101':
        # classInd.txt: "1 ApplyEyeMakeup"; the lists: "Class/v_Class_g08_c01.avi[ 1]"
        names = (splits[data_set] / 'classInd.txt').read_text().split()[1::2]
        lst = splits[data_set] / f"{'train' if train else 'test'}list{split:02d}.txt"
        entries = [(root / line.split()[0], names.index(line.split('/')[0]), where)
                   for where, line in _lines(lst)]
    elif data_set == 'HMDB51':
        # <class>_test_split<N>.txt: "<name>.avi <tag>", 1 train, 2 test, 0 unused
        folder, suffix, tag = splits[data_set], f'_test_split{split}.txt', '1' if train else '2'
        names = sorted(p.name[:-len(suffix)] for p in folder.glob('*' + suffix))
        entries = [(root / c / line.split()[0], label, where) for label, c in enumerate(names)
                   for where, line in _lines(folder / (c + suffix)) if line.split()[-1] == tag]
    elif data_set == 'list':
        lst = root / ('train.txt' if train else 'val.txt') if root.is_dir() else root
        entries, names = _list_file(lst) if train or lst.exists() else ([], [])
    elif data_set == 'folder':  # labelled by class subfolder, unless some video lies outside one
        videos = sorted(p.relative_to(root) for p in root.rglob('*')  # broken links too: named
                        if p.suffix.lower() in VIDEO_EXTS and (p.is_file() or p.is_symlink()))
        in_subfolders = all(len(p.parts) > 1 for p in videos)
        names = sorted({p.parts[0] for p in videos}) if in_subfolders else []
        label = {c: k for k, c in enumerate(names)}
        entries = [(root / p, label.get(p.parts[0], -1), 'a broken link') for p in videos]
    else:
        raise DataError(f"--data_set {data_set!r}: expected UCF101, HMDB51, list, folder or demo")
    missing = [f'{where}: {path}' for path, _, where in entries if not path.is_file()]
    if missing and not missing_ok:
        raise DataError(f"{missing[0]} does not exist ({len(missing)} missing); fix the list, the "
                        f"link or --data_path, or remove it")
    if train and not entries:
        raise DataError(f"--data_path {root} holds no training videos: {'/'.join(VIDEO_EXTS)} "
                        f"files in class folders, or a list of 'video label' lines")
    return [(str(path), label) for path, label, _ in entries], names


def training_subset(samples, per_class=None):
    """The first `per_class` videos of each class; all of them without it."""
    kept, count = [], Counter()
    for path, label in samples:
        count[label] += 1
        if per_class is None or count[label] <= per_class:
            kept.append((path, label))
    return kept


def guess_data_set(data_path):
    """data_path's format: 'list', 'UCF101' or 'HMDB51' (split folders found), else 'folder'."""
    root = Path(data_path)
    is_list = root.is_file() or (root / 'train.txt').is_file()
    return 'list' if is_list else next(iter(_split_dirs(root)), 'folder')


def _split_dirs(root):
    """{data set: folder of its official split files}, for those found inside or beside root."""
    return {name: d for name, sub in SPLIT_DIRS.items()
            for d in (root.parent / sub, root / sub) if d.is_dir()}


def _lines(path):
    """(where, text) of each non-empty line, where = 'path:line number'."""
    try:
        rows = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:  # missing; not text (a video given as a list?)
        raise DataError(f"{path} cannot be read as a list of 'video label' lines "
                        f"({getattr(error, 'strerror', None) or 'not text'})") from None
    return [(f'{path}:{k}', line.strip()) for k, line in enumerate(rows, 1) if line.strip()]


def _list_file(lst):
    """'path label' lines (the reference's format; paths absolute or relative to the list's folder),
    label -1 if absent. Class names: each label's common parent folder, else the label."""
    entries, parents = [], {}
    for where, line in _lines(lst):
        m = re.fullmatch(r'(.+?)\s+(-?\d+)', line)
        path, label = (m[1], int(m[2])) if m else (line, -1)
        if not m and len(line.split()) > 1 and not (lst.parent / line).exists():  # no path either
            raise DataError(f"{where}: label {line.split()[-1]!r} is not a whole number; write "
                            f"'video label', labels from 0 to the number of classes - 1")
        entries.append((lst.parent / path, label, where))
        parents.setdefault(label, set()).add(Path(path).parent.name)
    names = range(max(parents, default=-1) + 1)
    return entries, [min(parents[c]) if len(parents.get(c, ())) == 1 else str(c) for c in names]


# ----------------------------------------------------------------- reading frames, broken files too

SEEK_MIN = 32  # before this frame, decoding from 0 costs no more than a seek (measured, XVID/mp4v)
_SEEK_UNSAFE = set()  # files whose seek missed in this process: read from frame 0 from then on
_TRUNCATED = {}  # file -> frames that decode, where the stream ends before the container's count


class VideoReadError(RuntimeError):
    """A video that cannot be opened or yields no frame."""


def _open(path):
    """(capture at frame 0, frame count the container claims; a damaged file may hold fewer)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    if n <= 0:
        raise VideoReadError(f"{path}: not a readable video (missing, empty or no frames); re-encode or remove it")
    return cap, n


def video_length(path):
    return _open(path)[1]


def read_frames(path, indices):
    """uint8 RGB frames (len(indices), H, W, 3) at `indices` (any order, repeats), frame-exact."""
    indices = [int(i) for i in indices]
    frames = _decode(_open(path)[0], path, sorted(set(indices)))
    return np.stack([cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB) for i in indices])


def _decode(cap, path, wanted, seek=True):
    """{index: BGR frame} for the sorted unique `wanted` indices as a sequential decode from 0 gives them
    (past the real end: its last frame), converting only those (retrieve). From SEEK_MIN on it seeks
    (exact by timestamp at constant frame rates: XVID, mp4v, H.264 with B-frames, see the tests); if the
    frame after the seek lacks wanted[0]'s timestamp, the file is decoded from 0."""
    path, first, last = str(path), wanted[0], wanted[-1]
    fps = cap.get(cv2.CAP_PROP_FPS)
    seek = seek and first >= SEEK_MIN and fps > 0 and path not in _SEEK_UNSAFE
    if seek:
        cap.set(cv2.CAP_PROP_POS_FRAMES, first)
        if not (cap.grab() and abs(cap.get(cv2.CAP_PROP_POS_MSEC) * fps / 1000 - first) < 0.5):
            _SEEK_UNSAFE.add(path)
            return _decode(_open(path)[0], path, wanted)
        pos, ok = first, True
    else:
        pos, ok = 0, cap.grab()
    keep, frames = set(wanted), {}
    while ok:
        if pos in keep:
            ok, frame = cap.retrieve()
            if not ok:
                break
            frames[pos] = frame
        if pos == last:
            return frames
        pos, ok = pos + 1, cap.grab()
    # The stream ended at `pos`, before the container's count: repeat its last frame, pos - 1.
    if pos == 0:
        raise VideoReadError(f"{path}: no frame decodes; re-encode or remove it")
    _TRUNCATED[path] = pos
    if pos - 1 not in frames:
        frames.update(_decode(_open(path)[0], path, [pos - 1]))
    return {i: frames[min(i, pos - 1)] for i in wanted}


def _decode_all(path):
    """Every BGR frame (n, H, W, 3) of a video; None if unreadable (the dataset reports it)."""
    try:
        cap, n = _open(path)
        return np.stack(list(_decode(cap, path, list(range(n)), seek=False).values()))
    except VideoReadError:
        return None


def _probe(path, min_frames):
    """'' for a sound file, else a report line: unreadable, fewer frames than the container claims,
    missed seeks (the middle frame read both ways; such files decode from 0, slowly), too short."""
    try:
        cap, n = _open(path)
        count = sum(1 for _ in iter(cap.grab, False))  # the frames that decode
        ref, sought = (_decode(_open(path)[0], path, [n // 2], seek)[n // 2] for seek in (False, True))
    except VideoReadError as e:
        return f'UNREADABLE {e}'
    if count < n:  # (a seek past the real end misses too: this says why)
        return f'TRUNCATED  {path}: the container claims {n} frames, {count} decode; the last one repeats'
    if str(path) in _SEEK_UNSAFE or not np.array_equal(sought, ref):
        return (f'SEEK       {path}: seeking misses frames, so its clips decode from frame 0 '
                f'(slow); re-encode it at a constant frame rate')
    if count < min_frames:
        return f'SHORT      {path}: {count} frames < {min_frames}; frames repeat'
    return ''


def main():
    ap = argparse.ArgumentParser(description='Report unreadable, truncated and short videos, and class counts.')
    ap.add_argument('--check', metavar='DATA_PATH', required=True)
    ap.add_argument('--data_set', choices=['UCF101', 'HMDB51', 'list', 'folder', 'demo'])
    ap.add_argument('--split', type=int, default=1, choices=[1, 2, 3])
    ap.add_argument('--min_frames', type=int, default=64, help='num_frames x sampling_rate of the runs')
    args = ap.parse_args()
    try:  # missing videos are kept: named below, as the unreadable ones
        sets = {name: load_samples(args.check, args.data_set, args.split, name == 'train', True)
                for name in ('train', 'test')}
    except DataError as error:
        ap.error(str(error))
    if sets['train'] == sets['test']:  # one list or folder
        sets = {'all': sets['train']}
    paths = sorted({p for samples, _ in sets.values() for p, _ in samples})
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # decoding releases the GIL
        reports = [r for r in pool.map(lambda p: _probe(p, args.min_frames), paths) if r]
    bad = sum(r.startswith('UNREADABLE') for r in reports)
    print(*reports, f'{len(paths)} files: {bad} unreadable, {len(reports) - bad} other findings', sep='\n')
    for name, (samples, classes) in sets.items():
        counts = sorted(Counter(label for _, label in samples).items())
        per_class = ', '.join(f'{classes[c] if c >= 0 else c} {k}' for c, k in counts)
        print(f'{name}: {len(samples)} videos;', per_class)
    raise SystemExit(1 if bad else 0)


if __name__ == '__main__':
    main()
