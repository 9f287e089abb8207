"""Weights and checkpoints in and out: the checkpoints people already have, a run's own folder, and
the export to HuggingFace's layout.

load_checkpoint     weights of this project, of the reference code (pre-training or fine-tuned) or
                    of HuggingFace, into a VideoMAE or a VideoViT, checking sizes and shapes.
CheckpointError     a file that cannot be used as given: its one line names the file and the fix.
RunFolder           a training run's log and checkpoints, and resuming from the newest one.
export_huggingface  load_checkpoint's inverse: config.json and model.safetensors for transformers.
atomic_write        every file written here goes through it: a killed run never leaves half a file.
    python weights.py --export runs/finetune-demo/checkpoint-latest.pth runs/finetune-demo/hf
"""
import argparse
import json
import math
import os
import re
import time
from pathlib import Path

import cv2
import torch
import torch.distributed as dist

import plots
from model import PATCH_SIZE, PRESETS, TUBELET_SIZE, VideoViT, build_model

# The reference's checkpoints hold its flags as an argparse.Namespace, which a safe load may rebuild.
torch.serialization.add_safe_globals([argparse.Namespace])


class CheckpointError(ValueError):
    """A checkpoint unfit for use as given: its one-line message names the file and the fix."""


def atomic_write(path, write, suffix=""):
    """write(tmp_path), then rename: a reader (or a killed run) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # interrupted (Ctrl-C, an error): no half file left behind
            os.remove(tmp)


def write_png(path, img):
    atomic_write(path, lambda tmp: cv2.imwrite(tmp, img), suffix=".png")


# ----------------------------------------------------------------- names: HuggingFace <-> reference

# The start of a HuggingFace key <-> the same tensor's key in the reference's pre-training layout.
_HF_TOP = [
    ("videomae.embeddings.patch_embeddings.projection.", "encoder.patch_embed.proj."),
    ("videomae.encoder.layer.", "encoder.blocks."),
    ("videomae.layernorm.", "encoder.norm."),
    ("decoder.decoder_layers.", "decoder.blocks."),
    ("classifier.", "head."),
]
# Inside one transformer layer, after its index; the first pair matching a name wins.
_HF_BLOCK = [
    ("attention.attention.q_bias", "attn.q_bias"),
    ("attention.attention.v_bias", "attn.v_bias"),
    ("attention.attention.query.bias", "attn.q_bias"),  # transformers 5 spells the biases so
    ("attention.attention.value.bias", "attn.v_bias"),
    ("attention.output.dense.", "attn.proj."),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]
_HF_QKV = tuple(f"attention.attention.{name}.weight" for name in ("query", "key", "value"))
DECODER_KEYS = ("decoder.", "encoder_to_decoder.", "mask_token")


def _rename(key, to_hf):
    """One key from HuggingFace's names to the reference's, or back (to_hf), by the tables above."""
    src, dst = (1, 0) if to_hf else (0, 1)
    for pair in _HF_TOP:
        if key.startswith(pair[src]):
            key = pair[dst] + key[len(pair[src]):]
            break
    layer = re.fullmatch(r"(.*?\.\d+\.)(.*)", key)  # ('encoder.blocks.3.', 'attn.proj.weight')
    if layer is None:
        return key
    for pair in _HF_BLOCK:
        if layer[2].startswith(pair[src]):
            return layer[1] + pair[dst] + layer[2][len(pair[src]):]
    return key


def _convert(sd, to_hf):
    """HuggingFace VideoMAE names -> the reference's, or back (to_hf). The reference's one qkv
    matrix is HuggingFace's query, key and value matrices stacked in rows. Biases are written as the
    files on the hub spell them (q_bias, v_bias), which transformers 4 and 5 both read."""
    if not to_hf:  # a VideoMAEModel's keys lack the 'videomae.' prefix
        bare = ("embeddings.", "encoder.layer.", "layernorm.")
        sd = {("videomae." + k if k.startswith(bare) else k): v for k, v in sd.items()}
    out = {}
    for key, value in sd.items():
        if to_hf and key.endswith("attn.qkv.weight"):
            stem = _rename(key.removesuffix("attn.qkv.weight"), to_hf)
            for name, part in zip(_HF_QKV, value.chunk(3)):
                out[stem + name] = part.contiguous()
        elif not to_hf and key.endswith(_HF_QKV[0]):
            stem = key.removesuffix(_HF_QKV[0])
            qkv = torch.cat([sd[stem + name] for name in _HF_QKV])
            out[_rename(stem, to_hf) + "attn.qkv.weight"] = qkv
        elif to_hf or not key.endswith(_HF_QKV[1:]):
            out[_rename(key, to_hf)] = value.contiguous()
    return out


# ------------------------------------------------------------------------------------------ reading

def canonical_weights(ckpt):
    """A checkpoint's weights in any known format, named as in the reference's pre-training
    checkpoint (encoder weights under 'encoder.'); fixed positions dropped: rebuilt, not loaded."""
    # 'model' (this project, the reference's pre-training), 'module' (its fine-tuning), 'state_dict'
    sd = next((ckpt[k] for k in ("model", "module", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    sd = {k.replace("module.", "", 1).replace("_orig_mod.", ""): v
          for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in sd):
        sd = _convert(sd, to_hf=False)
    own_prefixes = ("encoder.", "fc_norm.", "head.") + DECODER_KEYS
    return {(k if k.startswith(own_prefixes) else "encoder." + k): v
            for k, v in sd.items() if "pos_embed" not in k}


def read_file(path):
    """A checkpoint file as saved (a dict), tensors memory-mapped; never runs code (weights_only).
    CheckpointError for a file that is missing, empty or no checkpoint."""
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise RuntimeError(f"{path}: reading .safetensors needs `pip install safetensors`") from None
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        what = "is empty (0 bytes)" if os.path.isfile(path) else "is not a file"
        raise CheckpointError(f"{path} {what}; give a checkpoint file (.pth or .safetensors)")
    try:
        if str(path).endswith(".safetensors"):
            return load_file(str(path))
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # torch's legacy (pre-1.6) format cannot be memory-mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's reasons are many (pickle, zip, end of file) and long
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        why = "not written by torch.save, or cut short"
        if unsafe:
            why = f"it holds a {unsafe[1]} object, which a safe load refuses"
        raise CheckpointError(f"{path} is no checkpoint: {why}; give a whole one") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint's dict")
    return ckpt


def encoder_size(sd):
    """(preset or 'custom', 'W wide, D blocks') of the encoder in a state dict of any naming."""
    width = next((v.shape[0] for k, v in sd.items() if k.endswith("patch_embed.proj.weight")), None)
    blocks = (re.match(r"blocks\.(\d+)\.", k.removeprefix("encoder.")) for k in sd)
    depth = len({m[1] for m in blocks if m})
    preset = [name for name, p in PRESETS.items() if (p["embed_dim"], p["depth"]) == (width, depth)]
    return (preset or ["custom"])[0], f"{width} wide, {depth} blocks"


def size_mismatch(source, theirs, ours, path=None):
    """None if two state dicts hold encoders of one size, else the error's words: what differs and
    the --model that fits (or none, if the file at `path` names its own: the checkpoint's)."""
    (their_preset, their_size), (our_preset, our_size) = encoder_size(theirs), encoder_size(ours)
    if their_size == our_size:
        return None
    fix = f"give --model {their_preset}" if their_preset in PRESETS else "no --model has that size"
    if path and checkpoint_config(path).get("model"):
        fix += ", or leave --model out to let the checkpoint choose"
    return (f"{source} holds a {their_preset} encoder ({their_size}), the model is {our_preset} "
            f"({our_size}); {fix}")


def load_checkpoint(model, path_or_state_dict, verbose=True, fresh_head=True):
    """Load a checkpoint of any format canonical_weights reads into a VideoMAE or VideoViT; returns
    (missing, unexpected) key lists. A pre-training checkpoint fills a VideoViT's encoder (its
    decoder is ignored, fc_norm and head start fresh); a head of another class count is dropped.
    An encoder of another size, a tensor of another shape or one the model would keep at random
    (anything but a fresh fc_norm and head, if fresh_head) is a CheckpointError naming it."""
    from_file = not isinstance(path_or_state_dict, dict)
    ckpt = read_file(path_or_state_dict) if from_file else path_or_state_dict
    source = str(path_or_state_dict) if from_file else "state dict"
    sd = canonical_weights(ckpt)
    own = model.state_dict()
    notes = []
    if isinstance(model, VideoViT):
        if any(k.startswith(DECODER_KEYS) for k in sd):
            notes.append("pre-training decoder ignored")
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if not k.startswith(DECODER_KEYS)}
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}  # mean pooling: fc_norm instead
    if ("head.weight" in sd and "head.weight" in own
            and sd["head.weight"].shape != own["head.weight"].shape):
        notes.append(f"head for {sd['head.weight'].shape[0]} classes dropped "
                     f"(model has {own['head.weight'].shape[0]})")
        del sd["head.weight"], sd["head.bias"]
    if not set(own) & set(sd):
        raise CheckpointError(f"{source}: no tensor matches this model; give a VideoMAE checkpoint")
    mismatch = size_mismatch(source, sd, own, path_or_state_dict if from_file else None)
    if mismatch:
        raise CheckpointError(mismatch)
    for key, value in sd.items():
        if key in own and value.shape != own[key].shape:
            raise CheckpointError(f"{source}: tensor '{key}' is {tuple(value.shape)}, the model's "
                                  f"{tuple(own[key].shape)}; give the sizes it was saved with")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    expected = ("fc_norm.", "head.") if fresh_head and isinstance(model, VideoViT) else ()
    fresh = [k for k in missing if k.startswith(expected)]
    at_random = [k for k in missing if k not in fresh]
    if at_random:
        raise CheckpointError(f"{source} lacks {len(at_random)} tensors of the model, which would "
                              f"start at random ({listed(at_random)}); give a whole checkpoint")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    if fresh:
        notes.append(f"starting fresh as expected: {', '.join(fresh)}")
    if unexpected:
        notes.append(f"ignored: {listed(unexpected)}")
    if verbose:
        loaded = f"loaded {len(own) - len(missing)}/{len(own)} tensors from {source}"
        print("; ".join([loaded, *notes]))
    return missing, unexpected


def listed(names, most=3):
    """The first `most` names, and how many more: a line stays short."""
    more = f" and {len(names) - most} more" if names[most:] else ""
    return ", ".join(map(str, names[:most])) + more


# -------------------------------------------------------------------------- a training run's folder

def unwritable(folder):
    """Why a run could not write in `folder` (a file in its way, no permission), or None."""
    there = Path(folder).absolute()
    while not there.exists():  # the folder, else the nearest one above it that exists
        there = there.parent
    if there.is_dir() and os.access(there, os.W_OK | os.X_OK):
        return None
    return f"{there} is {'not writable' if there.is_dir() else 'a file'}; choose another folder"


class RunFolder:
    """A training run's folder: log.jsonl, checkpoint-latest.pth, checkpoint-NNNN.pth, curves.png.
    An epoch is logged before its checkpoint; a resume drops the log's lines past the checkpoint.
    Only the main process (rank 0) writes, and it alone decides whether to resume. The newest
    checkpoint (a ViT-B's is 1.1 GB with its optimizer, more than a short epoch) is written with each
    numbered one, else once `latest_every` seconds have passed since its last write (0: each epoch)."""

    def __init__(self, output_dir, main=True, latest_every=0, clock=time.monotonic):
        self.dir, self.main = output_dir, main
        self.log_path = os.path.join(output_dir, "log.jsonl")
        self.latest = os.path.join(output_dir, "checkpoint-latest.pth")
        self.latest_every, self.clock = latest_every, clock
        self.latest_written = clock()  # (the run's start)

    def resume_path(self, resume=None):
        """`resume` (--resume), else the newest checkpoint here; None for a fresh run. Rank 0's
        answer, for every process: on several nodes the others may not see its disk."""
        path = error = None
        if self.main:
            path = resume or (self.latest if os.path.exists(self.latest) else None)
            if path and not os.path.exists(path):
                error = f"{path} is not a file; give a checkpoint file (.pth or .safetensors)"
        path, error = from_main((path, error))
        if error:  # one line, from rank 0; the others stop without a word
            raise CheckpointError(error) if self.main else SystemExit(2)
        return path

    def restore(self, path, net, optimizer, scaler, say=print):
        """Load a checkpoint into model, optimizer and scaler; returns the epoch to start at. A process
        that cannot see `path` (another node's disk) gets rank 0's copy; an fp16 run resumed from
        another starts its loss scale afresh; a file of another model, or no run's, is a CheckpointError."""
        ckpt = read_file(path) if os.path.exists(path) else None
        if dist.is_initialized():
            seen = [None] * dist.get_world_size()
            dist.all_gather_object(seen, ckpt is not None)
            if not all(seen):
                ckpt = from_main(ckpt)
        if ckpt is None:
            read_file(path)  # the one line that says why
        if not {"model", "optimizer", "scaler", "epoch"} <= ckpt.keys():
            raise CheckpointError(f"{path} holds no run's state (optimizer, epoch) to resume; "
                                  f"fine-tune from its weights: finetune.py --finetune {path}")
        theirs, ours = ckpt["model"], net.state_dict()
        if ("mask_token" in theirs) != ("mask_token" in ours):  # a VideoMAE's, a VideoViT's
            raise CheckpointError(f"{path}: pre-training and fine-tuning do not resume each "
                                  f"other; to fine-tune pre-trained weights, give them --finetune")
        differ = [k for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape]
        if differ:  # a run's own checkpoint (the newest in --output_dir) or --resume
            why = size_mismatch(path, theirs, ours) or f"{path}: tensor '{differ[0]}' differs"
            raise CheckpointError(f"{why}; resume it with the flags of its run, or start a new run "
                                  f"in another --output_dir")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and not ckpt["scaler"]:  # saved with the scaler off
            say(f"{path} holds no fp16 loss scale (a bf16 or fp32 run's): it starts at {scaler.get_scale():g}")
        else:
            scaler.load_state_dict(ckpt["scaler"])
        return ckpt["epoch"] + 1

    def start(self, config, start_epoch=None):
        """A run begins, fresh (start_epoch None) or resumed: a killed run's half-written files go,
        and so do the log's lines of epochs past the checkpoint (run and logged again)."""
        if not self.main:
            return
        os.makedirs(self.dir, exist_ok=True)
        for name in os.listdir(self.dir):
            if ".tmp" in name:
                os.remove(os.path.join(self.dir, name))
        old = []
        if start_epoch is not None and os.path.exists(self.log_path):
            old = Path(self.log_path).read_text().splitlines(keepends=True)
        keep = [line for line in old if _logged_epoch(line) < (start_epoch or 0)]
        text = "".join(keep) + json.dumps({**config, "resumed_at_epoch": start_epoch}) + "\n"
        atomic_write(self.log_path, lambda tmp: Path(tmp).write_text(text))

    def log(self, record):
        if self.main:
            os.makedirs(self.dir, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, ckpt, numbered=False):
        """With `numbered`, checkpoint-NNNN.pth of its epoch first; then the newest, when due or numbered:
        killed in between, the run resumes at this epoch again and writes both anew."""
        if not self.main:
            return
        if numbered:
            path = os.path.join(self.dir, f"checkpoint-{ckpt['epoch']:04d}.pth")
            atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
        if numbered or self.clock() - self.latest_written >= self.latest_every:
            atomic_write(self.latest, lambda tmp: torch.save(ckpt, tmp))
            self.latest_written = self.clock()

    def draw_curves(self):
        """curves.png: the log's figures against the epoch (plots.curves)."""
        if self.main:
            lines = Path(self.log_path).read_text().splitlines()
            records = [r for r in map(json.loads, lines) if "epoch" in r]
            write_png(os.path.join(self.dir, "curves.png"), plots.curves(records))


def from_main(obj):
    """`obj` as the main process (rank 0) holds it, on every process (each must call this)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _logged_epoch(line):
    """A log line's epoch: -1 for other lines, inf for half a line (a killed write; dropped)."""
    try:
        return json.loads(line).get("epoch", -1)
    except json.JSONDecodeError:
        return math.inf


# ------------------------------------------------------------------ writing: the HuggingFace layout

# A preset's sizes -> the names of HuggingFace's config.json (the decoder's: the same, prefixed).
_HF_SIZES = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads"}
_HF_SIZES.update({f"decoder_{k}": f"decoder_{v}" for k, v in _HF_SIZES.items()})


def checkpoint_config(path):
    """The run configuration a checkpoint carries: this project's 'config', else what HuggingFace's
    config.json beside it says (preset, input size, frames, loss target, class names), else {}."""
    saved = read_file(path).get("config")
    beside = Path(path).parent / "config.json"
    if saved or not beside.is_file():
        return saved or {}
    hf = json.loads(beside.read_text())
    labels = hf.get("id2label", {})
    encoder = ("embed_dim", "depth", "num_heads")
    preset = next((name for name, sizes in PRESETS.items()
                   if all(hf.get(_HF_SIZES[k]) == sizes[k] for k in encoder)), None)
    config = {"model": preset, "input_size": hf.get("image_size"),
              "num_frames": hf.get("num_frames"),
              "no_norm_pix_loss": hf.get("norm_pix_loss") is False,  # pre-training's loss target
              "classes": [labels[str(i)] for i in range(len(labels))]}
    return {k: v for k, v in config.items() if v}


def export_huggingface(path, out_dir):
    """Write a checkpoint (any format load_checkpoint reads) to out_dir as transformers'
    VideoMAEForPreTraining or, with a head, VideoMAEForVideoClassification saves itself: config.json
    and model.safetensors (pytorch_model.bin without safetensors). Returns the paths written."""
    config = checkpoint_config(path)
    sd = canonical_weights(read_file(path))
    preset = config.get("model") or encoder_size(sd)[0]
    if preset not in PRESETS:
        raise CheckpointError(f"{path}: no encoder of a --model preset ({encoder_size(sd)[1]})")
    classifier = "head.weight" in sd
    img_size = config.get("input_size", 224)
    num_frames = config.get("num_frames", 16)
    norm_pix_loss = not config.get("no_norm_pix_loss")
    if classifier:
        kind, extra = "finetune", {"num_classes": len(sd["head.bias"])}
    else:
        kind, extra = "pretrain", {"norm_pix_loss": norm_pix_loss}
    net = build_model(kind, preset, img_size=img_size, num_frames=num_frames, **extra)
    if load_checkpoint(net, sd, verbose=False)[0]:  # checks every shape against the preset
        raise CheckpointError(f"{path} has no fc_norm; only a whole model can be exported")
    sizes = PRESETS[preset]
    architecture = "VideoMAEForVideoClassification" if classifier else "VideoMAEForPreTraining"
    hf = dict(architectures=[architecture], model_type="videomae", image_size=img_size,
              num_frames=num_frames, patch_size=PATCH_SIZE, tubelet_size=TUBELET_SIZE,
              intermediate_size=4 * sizes["embed_dim"], layer_norm_eps=1e-6,
              decoder_intermediate_size=4 * sizes["decoder_embed_dim"],
              norm_pix_loss=norm_pix_loss, use_mean_pooling=classifier)
    hf.update({hf_name: sizes[k] for k, hf_name in _HF_SIZES.items()})
    if classifier:  # classifiers pool into fc_norm; pre-training models end in a layernorm
        names = config.get("classes") or [f"class {i}" for i in range(len(sd["head.bias"]))]
        hf.update(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
    weights = _convert(canonical_weights(net.state_dict()), to_hf=True)
    try:
        from safetensors.torch import save_file
        name, save = "model.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"})
    except ImportError:  # transformers reads either file
        name, save = "pytorch_model.bin", lambda tmp: torch.save(weights, tmp)
    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.join(out_dir, "config.json"), os.path.join(out_dir, name)]
    atomic_write(files[0], lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2) + "\n"))
    atomic_write(files[1], save)
    classes = f", {len(names)} classes" if classifier else ""
    print(f"wrote {' and '.join(files)}: {architecture}, {preset}, {img_size} px, "
          f"{num_frames} frames{classes}")
    return files


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Export a checkpoint in the layout of HuggingFace transformers.")
    parser.add_argument("--export", nargs=2, metavar=("CHECKPOINT", "OUT_DIR"), required=True,
                        help="write OUT_DIR/config.json and the weights, for from_pretrained(OUT_DIR)")
    source, out = parser.parse_args().export
    if unwritable(out):
        parser.error(f"--export {source} {out}: {unwritable(out)}")
    try:
        export_huggingface(source, out)
    except CheckpointError as error:
        parser.error(str(error))
