"""guided-diffusion's public names, for users who build models from the reference's flags:

    from adm.compat import openai
    model = openai.create_model("--image_size 128 --class_cond True ...")
    openai.load_checkpoint(model, "models/128x128_diffusion.pt")  # strict, weights_only

Nothing is defined here. The builders live in `adm.factory` and the checkpoint loading in
`adm.checkpoints`; this module only names them the way guided-diffusion's `script_util` does.
"""
from __future__ import annotations

from ..checkpoints import load_checkpoint
from ..factory import (ALL_DEFAULTS, CLASSIFIER_DEFAULTS, DIFFUSION_DEFAULTS, MODEL_DEFAULTS,
                       SCRIPT_DEFAULTS, SUPERRES_DEFAULTS, FlagError, create_classifier,
                       create_diffusion, create_model, create_superres_model, format_flags,
                       parse_flags)

__all__ = ["ALL_DEFAULTS", "CLASSIFIER_DEFAULTS", "DIFFUSION_DEFAULTS", "MODEL_DEFAULTS",
           "SCRIPT_DEFAULTS", "SUPERRES_DEFAULTS", "FlagError", "create_classifier",
           "create_diffusion", "create_model", "create_superres_model", "format_flags",
           "load_checkpoint", "parse_flags"]
