"""The 15 released checkpoints of guided-diffusion, with the flags and sampling settings its
README gives for each.

    from adm import factory
    from adm.compat import openai
    from adm.presets import preset
    p = preset("128x128_diffusion")
    model = openai.load_checkpoint(p.build(), "models/128x128_diffusion.pt")
    diffusion = factory.create_diffusion(
        {**p.model_flags, "timestep_respacing": p.sampling.timestep_respacing})

`model_flags` holds every flag of the preset's builder, reference defaults filled in (diffusion
flags included for diffusion models and upsamplers, as the README's flag strings do).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from . import factory

_BASE = ("--attention_resolutions 32,16,8 --diffusion_steps 1000 --learn_sigma True "
         "--noise_schedule linear --num_res_blocks 2 --resblock_updown True "
         "--use_scale_shift_norm True")
_256 = f"{_BASE} --image_size 256 --num_channels 256 --num_head_channels 64"

# name -> (kind, README model flags)
_README_FLAGS = {
    "64x64_diffusion": ("diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
        "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
        "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"),
    "128x128_diffusion": ("diffusion",
        f"{_BASE} --class_cond True --image_size 128 --num_channels 256 --num_heads 4 --use_fp16 True"),
    "256x256_diffusion": ("diffusion", f"{_256} --class_cond True --use_fp16 True"),
    "256x256_diffusion_uncond": ("diffusion", f"{_256} --class_cond False --use_fp16 True"),
    "512x512_diffusion": ("diffusion",
        f"{_BASE} --class_cond True --image_size 512 --num_channels 256 --num_head_channels 64 "
        "--use_fp16 False"),
    "64x64_classifier": ("classifier", "--image_size 64 --classifier_depth 4"),
    "128x128_classifier": ("classifier",
        "--image_size 128 --classifier_attention_resolutions 32,16,8 --classifier_depth 2 "
        "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
        "--classifier_use_scale_shift_norm True"),
    "256x256_classifier": ("classifier", "--image_size 256"),
    "512x512_classifier": ("classifier", "--image_size 512"),
    "64_256_upsampler": ("upsampler",
        f"{_BASE} --class_cond True --large_size 256 --small_size 64 --num_channels 192 "
        "--num_heads 4 --use_fp16 True"),
    "128_512_upsampler": ("upsampler",
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
        "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True"),
    "lsun_bedroom": ("diffusion", f"{_256} --class_cond False --dropout 0.1 --use_fp16 True"),
    "lsun_cat": ("diffusion", f"{_256} --class_cond False --dropout 0.1 --use_fp16 True"),
    "lsun_horse": ("diffusion", f"{_256} --class_cond False --dropout 0.1 --use_fp16 True"),
    "lsun_horse_nodropout": ("diffusion", f"{_256} --class_cond False --dropout 0.0 --use_fp16 True"),
}

# The flag groups each kind's builder reads.
_FLAG_GROUPS = {
    "diffusion": (factory.MODEL_DEFAULTS, factory.DIFFUSION_DEFAULTS),
    "upsampler": (factory.MODEL_DEFAULTS, factory.DIFFUSION_DEFAULTS, factory.SUPERRES_DEFAULTS),
    "classifier": (factory.CLASSIFIER_DEFAULTS,),
}


@dataclass(frozen=True)
class Sampling:
    """How the README samples a model: respacing, DDIM or ancestral, classifier guidance."""

    timestep_respacing: str
    use_ddim: bool = False
    classifier: str | None = None  # preset name of the guiding classifier
    classifier_scale: float = 0.0


@dataclass(frozen=True)
class Preset:
    name: str
    kind: str  # "diffusion", "classifier" or "upsampler"
    readme_flags: str  # the flag string as the README writes it
    sampling: Sampling | None = None  # None for classifiers (see `used_with`)
    alternatives: dict = field(default_factory=dict)  # other README samplings, by name
    used_with: tuple = ()  # classifiers: (diffusion preset, classifier_scale) pairs

    @property
    def file(self) -> str:
        """The released checkpoint's file name."""
        return f"{self.name}.pt"

    @property
    def model_flags(self) -> dict:
        """Every flag of this preset's builder, reference defaults filled in."""
        flags = factory.parse_flags(self.readme_flags)
        keys = set().union(*_FLAG_GROUPS[self.kind])
        if self.kind == "upsampler":
            keys -= {"image_size", "channel_mult", "use_new_attention_order"}
        return {k: v for k, v in flags.items() if k in keys}

    def build(self) -> nn.Module:
        """The model of this preset with random weights (load the released file into it)."""
        return factory.BUILDERS[self.kind](self.model_flags)


_SAMPLING = {
    "64x64_diffusion": Sampling("250", classifier="64x64_classifier", classifier_scale=1.0),
    "128x128_diffusion": Sampling("250", classifier="128x128_classifier", classifier_scale=0.5),
    "256x256_diffusion": Sampling("250", classifier="256x256_classifier", classifier_scale=1.0),
    "256x256_diffusion_uncond": Sampling("250", classifier="256x256_classifier",
                                         classifier_scale=10.0),
    "512x512_diffusion": Sampling("250", classifier="512x512_classifier", classifier_scale=4.0),
    "64_256_upsampler": Sampling("250"),
    "128_512_upsampler": Sampling("250"),
    # The README: "for these models, the best samples result from using 1000 timesteps".
    **{name: Sampling("1000") for name in
       ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout")},
}
_ALTERNATIVES = {
    # The README's 25-step DDIM command (used for the paper's FID at 50k samples; the
    # classifier runs with classifier_use_fp16 there).
    "128x128_diffusion": {"ddim25": Sampling("ddim25", use_ddim=True,
                                             classifier="128x128_classifier",
                                             classifier_scale=1.0)},
}

PRESETS: dict[str, Preset] = {}
for _name, (_kind, _flags) in _README_FLAGS.items():
    PRESETS[_name] = Preset(_name, _kind, _flags, _SAMPLING.get(_name),
                            _ALTERNATIVES.get(_name, {}))
for _name, _p in list(PRESETS.items()):
    if _p.kind == "classifier":
        pairs = tuple((d, s.classifier_scale) for d, s in _SAMPLING.items() if s.classifier == _name)
        PRESETS[_name] = Preset(_name, "classifier", _p.readme_flags, used_with=pairs)


def preset(name: str) -> Preset:
    """The preset of a released checkpoint, by its file's name (without `.pt`)."""
    if name.endswith(".pt"):
        name = name[:-3]
    if name not in PRESETS:
        raise KeyError(f"no preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def list_presets() -> list[str]:
    """Names of every preset, in the README's order."""
    return list(PRESETS)


def describe_presets() -> str:
    """A table of the presets for a command line to print."""
    rows = [f"{'name':26} {'kind':10} {'sampling':40}"]
    for p in PRESETS.values():
        if p.sampling is None:
            how = "guides " + ", ".join(f"{d} (scale {s})" for d, s in p.used_with)
        else:
            s = p.sampling
            how = f"{'DDIM' if s.use_ddim else 'DDPM'} {s.timestep_respacing}"
            if s.classifier:
                how += f", {s.classifier} scale {s.classifier_scale}"
        rows.append(f"{p.name:26} {p.kind:10} {how}")
    return "\n".join(rows)
