"""The factory: guided-diffusion's flags -> the ADM models and their Gaussian diffusions.

Every builder takes the reference scripts' flag names, as a dict or as the README's flag string
(``"--image_size 64 --class_cond True ..."``). Missing flags take the reference defaults; one
dict may hold model, diffusion, classifier and sampling flags together (as the README's
commands do) and each builder takes its own; a flag no reference script knows is an error.

Extensions to the reference's flags (all default to the reference's behaviour):

- ``num_classes`` (1000): classes of a class-conditional U-Net / upsampler and of the
  classifier's output.
- ``channel_mult`` for the upsampler too, and ``classifier_channel_mult`` for the classifier:
  "" picks the multipliers by image size as the reference does (which supports only
  64/128/256/512); an explicit comma string ("1,2,2") builds the small models the quickstart
  and the tests train at 16-32 px.
- ``classifier_num_head_channels`` (64, the reference's fixed value).
- ``class_dropout_prob`` (0.0): classifier-free guidance. Training replaces a label by the
  null class (label ``num_classes``) with this probability, and a class-conditional U-Net /
  upsampler gets one more label-embedding row for it, only when it is above 0 (so released
  checkpoints, at 0, load unchanged). Needs ``class_cond``.

``use_fp16=True`` (how every README command is written) keeps the state-dict keys and dtypes
unchanged; the model runs its torso under float16 autocast on CUDA (see
`adm.models.unet.fp16_autocast`) instead of converting its weights.
"""
from __future__ import annotations

import argparse
import functools
import shlex
from typing import Annotated, Any, Mapping

import pydantic

from .config import UserError
from .models import Classifier, SuperResUNet, UNet
from .models.classifier import POOLS

MODEL_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, num_classes=1000, class_dropout_prob=0.0,
)
DIFFUSION_DEFAULTS = dict(
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)
CLASSIFIER_DEFAULTS = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention", classifier_channel_mult="",
    classifier_num_head_channels=64, num_classes=1000,
)
SUPERRES_DEFAULTS = dict(large_size=256, small_size=64)
# Flags of the reference's sampling and training scripts: known (so a pasted command line is
# accepted) but not used to build anything.
SCRIPT_DEFAULTS = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="",
    classifier_path="", classifier_scale=1.0, base_samples="", data_dir="", val_data_dir="",
    schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, microbatch=-1,
    ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="",
    fp16_scale_growth=1e-3, iterations=150000, anneal_lr=False, noised=True, eval_interval=5,
)
ALL_DEFAULTS = {**SCRIPT_DEFAULTS, **SUPERRES_DEFAULTS, **CLASSIFIER_DEFAULTS,
                **DIFFUSION_DEFAULTS, **MODEL_DEFAULTS}


class FlagError(UserError, ValueError):
    """A flag that is unknown or has a value its builder cannot use."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read True as 1
        raise ValueError("a bool is not a number")
    return value


def _flag_text(value: Any) -> Any:
    """String flags as YAML may give them: `timestep_respacing: 250`, or resolutions as a list."""
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Each flag takes the type of its reference default; strings are read as the reference's
# scripts read them ("64" -> 64, "True"/"yes"/"1" -> True, "1e-4" -> 1e-4).
_FLAG_TYPES = {bool: bool, int: Annotated[int, pydantic.BeforeValidator(_not_bool)],
               float: Annotated[float, pydantic.BeforeValidator(_not_bool)],
               str: Annotated[str, pydantic.BeforeValidator(_flag_text)]}


@functools.lru_cache(maxsize=1)
def _typed_flags() -> type[pydantic.BaseModel]:
    """A pydantic model of every known flag, typed by its reference default."""
    return pydantic.create_model("Flags", **{name: (_FLAG_TYPES[type(default)], default)
                                             for name, default in ALL_DEFAULTS.items()})


@functools.lru_cache(maxsize=1)
def _flag_parser() -> argparse.ArgumentParser:
    """An argparse parser of every known flag as ``--name VALUE`` (strings, typed later by
    `parse_flags`); flags not given stay absent. No abbreviations, no help, no exit on errors."""
    parser = argparse.ArgumentParser(prog="adm flags", add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    for name in ALL_DEFAULTS:
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS)
    return parser


def _parse_flag_string(text: str) -> dict[str, str]:
    """``"--image_size 64 --class_cond=True"`` -> {"image_size": "64", "class_cond": "True"}
    (shell quoting as `shlex.split` reads it). Unknown flags are collected here and reported by
    `parse_flags`, as for dicts.

    :raises FlagError: naming a flag without a value, or a token that is not a --flag."""
    try:
        known, extra = _flag_parser().parse_known_args(shlex.split(text))
    except argparse.ArgumentError as e:  # the only per-flag error: a missing value
        raise FlagError(f"flag {e.argument_name} has no value ({e.message})") from None
    unknown = [token[2:].split("=", 1)[0] for token in extra if token.startswith("--")]
    if extra and not unknown:
        raise FlagError(f"expected a --flag in the flag string, got {extra[0]!r}")
    return {**vars(known), **dict.fromkeys(unknown)}  # unknown ones: named by parse_flags


def parse_flags(flags: Mapping[str, Any] | str | None = None) -> dict:
    """Every known flag, typed: the reference defaults updated with `flags`.

    :param flags: a dict, or a flag string as the reference README writes it
        (``"--image_size 64 --class_cond True"``; ``--name=value`` works too).
    :raises FlagError: naming an unknown flag, a flag without a value, or a bad value.
    """
    if flags is None:
        flags = {}
    if isinstance(flags, str):
        flags = _parse_flag_string(flags)
    unknown = sorted(set(flags) - set(ALL_DEFAULTS))
    if unknown:
        raise FlagError(f"unknown flag(s): {', '.join(unknown)} (not a flag of guided-diffusion's "
                        "scripts or of adm's documented extensions)")
    try:
        return _typed_flags().model_validate(dict(flags)).model_dump()
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        name = err["loc"][0]
        default = ALL_DEFAULTS[name]
        raise FlagError(f"flag {name}={err['input']!r}: expected a {type(default).__name__} "
                        f"(default {default!r})") from None


def format_flags(flags: Mapping[str, Any]) -> str:
    """The README-style flag string of a flag dict (inverse of `parse_flags` for known flags)."""
    return " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items())


def parse_channel_mult(channel_mult: str | tuple, image_size: int, flag: str = "channel_mult"):
    """Per-level channel multipliers: a comma string ("1,2,2"), a tuple, or "" for the
    reference's choice by image size."""
    if isinstance(channel_mult, (tuple, list)):
        return tuple(channel_mult)
    if channel_mult == "":
        by_size = {
            512: (0.5, 1, 1, 2, 2, 4, 4),
            256: (1, 1, 2, 2, 4, 4),
            128: (1, 1, 2, 3, 4),
            64: (1, 2, 3, 4),
        }
        if image_size not in by_size:
            raise ValueError(
                f"{flag}='' picks the multipliers by image size, which the reference defines only "
                f"for {sorted(by_size)}; image size {image_size} needs an explicit {flag} "
                "(e.g. '1,2,2')"
            )
        return by_size[image_size]
    try:
        mult = tuple(float(m) if "." in m else int(m) for m in str(channel_mult).split(","))
    except ValueError:
        raise ValueError(f"{flag}={channel_mult!r} is not a comma-separated list of numbers")
    if not mult or any(m <= 0 for m in mult):
        raise ValueError(f"{flag}={channel_mult!r} must list positive multipliers")
    if image_size % 2 ** (len(mult) - 1):
        raise ValueError(
            f"{flag}={channel_mult!r} has {len(mult)} levels, so image size {image_size} must be "
            f"divisible by {2 ** (len(mult) - 1)}"
        )
    return mult


def attention_downsample_rates(attention_resolutions: str | tuple, image_size: int, flag: str):
    """Turn the flag's resolutions ("32,16,8") into the downsample rates the blocks use."""
    if isinstance(attention_resolutions, (tuple, list)):
        return tuple(attention_resolutions)
    rates = []
    for res in str(attention_resolutions).split(","):
        res = res.strip()
        if not res:
            continue
        if not res.isdigit() or int(res) == 0 or image_size % int(res):
            raise ValueError(
                f"{flag}={attention_resolutions!r}: {res!r} is not a resolution that divides "
                f"image size {image_size}"
            )
        rates.append(image_size // int(res))
    return tuple(rates)


def _check_positive(f: dict, *names: str) -> None:
    for name in names:
        if f[name] <= 0:
            raise FlagError(f"flag {name}={f[name]} must be positive")


def _check_widths(base: int, mult: tuple, flag: str) -> None:
    """Every level's width must split into the 32 groups of the group norms."""
    for m in mult:
        if int(m * base) % 32:
            raise FlagError(f"{flag}: width {int(m * base)} (= {m} x {base}) is not divisible by "
                            "the 32 groups of GroupNorm")


def _check_depth(f: dict, name: str) -> None:
    """Residual blocks per level: 0 is valid (the reference then keeps only the resampling
    blocks in the encoder and one block per level in the decoder); a negative count is not."""
    if f[name] < 0:
        raise FlagError(f"flag {name}={f[name]} must be 0 or more (residual blocks per level)")


def _unet_kwargs(f: dict, image_size: int, channel_mult: tuple) -> dict:
    _check_positive(f, "num_channels", "num_classes")
    _check_depth(f, "num_res_blocks")
    # nn.Dropout's range: the reference builds (and runs) p = 1 too.
    if not 0.0 <= f["dropout"] <= 1.0:
        raise FlagError(f"flag dropout={f['dropout']} must be in [0, 1]")
    if f["num_head_channels"] == -1:
        # Head counts are used only without a fixed head width (the reference ignores them
        # otherwise, so e.g. num_heads=0 with num_head_channels=64 builds there and here).
        _check_positive(f, "num_heads")
        if f["num_heads_upsample"] != -1 and f["num_heads_upsample"] <= 0:
            raise FlagError(f"flag num_heads_upsample={f['num_heads_upsample']} must be -1 "
                            "(= num_heads) or positive")
    elif f["num_head_channels"] <= 0:
        raise FlagError(f"flag num_head_channels={f['num_head_channels']} must be -1 or positive")
    _check_widths(f["num_channels"], channel_mult, "num_channels/channel_mult")
    if not 0.0 <= f["class_dropout_prob"] < 1.0:
        raise FlagError(f"flag class_dropout_prob={f['class_dropout_prob']} must be in [0, 1)")
    if f["class_dropout_prob"] > 0 and not f["class_cond"]:
        raise FlagError(f"flag class_dropout_prob={f['class_dropout_prob']} needs class_cond=True "
                        "(label dropout trains a class-conditional model's null class)")
    return dict(
        model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=attention_downsample_rates(
            f["attention_resolutions"], image_size, "attention_resolutions"),
        dropout=f["dropout"],
        channel_mult=channel_mult,
        num_classes=f["num_classes"] if f["class_cond"] else None,
        null_class=f["class_cond"] and f["class_dropout_prob"] > 0,
        use_checkpoint=f["use_checkpoint"],
        use_fp16=f["use_fp16"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
    )


def _flag_errors(builder):
    """Report the ValueErrors of parsing and of layer-level checks (which name their flag
    already) as FlagErrors."""

    @functools.wraps(builder)
    def wrapped(flags=None):
        try:
            return builder(flags)
        except FlagError:
            raise
        except ValueError as e:
            raise FlagError(str(e)) from None

    return wrapped


@_flag_errors
def create_model(flags: Mapping[str, Any] | str | None = None) -> UNet:
    """The ADM U-Net of `flags` (reference `create_model`), random weights."""
    f = parse_flags(flags)
    _check_positive(f, "image_size")
    mult = parse_channel_mult(f["channel_mult"], f["image_size"])
    return UNet(f["image_size"], 3, **_unet_kwargs(f, f["image_size"], mult))


SUPERRES_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


@_flag_errors
def create_superres_model(flags: Mapping[str, Any] | str | None = None) -> SuperResUNet:
    """The ADM upsampler of `flags` (reference `sr_create_model`): `large_size` output from
    `small_size` input, random weights."""
    f = parse_flags(flags)
    _check_positive(f, "large_size", "small_size")
    large, small = f["large_size"], f["small_size"]
    if small > large:
        raise FlagError(f"flag small_size={small} is larger than large_size={large}")
    if f["channel_mult"] == "":
        if large not in SUPERRES_CHANNEL_MULT:
            raise FlagError(f"large_size={large}: the reference defines upsampler multipliers "
                            f"only for {sorted(SUPERRES_CHANNEL_MULT)}; pass channel_mult "
                            "explicitly (e.g. '1,2,2')")
        mult = SUPERRES_CHANNEL_MULT[large]
    else:
        mult = parse_channel_mult(f["channel_mult"], large)
    return SuperResUNet(large, 3, **_unet_kwargs(f, large, mult))


@_flag_errors
def create_classifier(flags: Mapping[str, Any] | str | None = None) -> Classifier:
    """The noisy-image classifier of `flags` (reference `create_classifier`), random weights."""
    f = parse_flags(flags)
    _check_positive(f, "image_size", "classifier_width", "num_classes")
    _check_depth(f, "classifier_depth")
    if f["classifier_pool"] not in POOLS:
        raise FlagError(f"flag classifier_pool={f['classifier_pool']!r} is not one of {POOLS}")
    size = f["image_size"]
    mult = parse_channel_mult(f["classifier_channel_mult"], size, "classifier_channel_mult")
    _check_widths(f["classifier_width"], mult, "classifier_width/classifier_channel_mult")
    return Classifier(
        image_size=size,
        in_channels=3,
        model_channels=f["classifier_width"],
        out_channels=f["num_classes"],
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=attention_downsample_rates(
            f["classifier_attention_resolutions"], size, "classifier_attention_resolutions"),
        channel_mult=mult,
        use_fp16=f["classifier_use_fp16"],
        num_head_channels=f["classifier_num_head_channels"],
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
    )


# What each kind of network is built by, from its flags.
BUILDERS = {"diffusion": create_model, "upsampler": create_superres_model,
            "classifier": create_classifier}


@_flag_errors
def create_diffusion(flags: Mapping[str, Any] | str | None = None):
    """The (respaced) Gaussian diffusion of `flags` (reference `create_gaussian_diffusion`)."""
    from .diffusion import create_gaussian_diffusion

    f = parse_flags(flags)
    return create_gaussian_diffusion(
        steps=f["diffusion_steps"], learn_sigma=f["learn_sigma"],
        noise_schedule=f["noise_schedule"], use_kl=f["use_kl"],
        predict_xstart=f["predict_xstart"], rescale_timesteps=f["rescale_timesteps"],
        rescale_learned_sigmas=f["rescale_learned_sigmas"],
        timestep_respacing=f["timestep_respacing"],
    )
