"""Large-scale sampling on Ray Data (`jobs/sample.py`): N samples, a guided base model then an
optional upsampler, each in its own pool of actors, written as resumable shards and merged into
the ADM evaluator's `samples.npz`.

    from adm.generate import load_sample_config, make_plan, generate
    plan = make_plan(load_sample_config("jobs/configs/sample/adm128_guided.yaml", [],
                                        model="models/128x128_diffusion.pt", ...))
    generate(plan)     # Ray running (adm.runtime.init_ray)

Every sample's label and random numbers come from (seed, index) alone, so the output does not
depend on batch sizes, actor counts or which worker ran what.
"""
from .config import DECISIVE, SampleConfig, load_sample_config
from .labels import labels_for, parse_classes
from .output import npz_bytes, read_npz
from .pipeline import generate
from .plan import Plan, make_plan

__all__ = ["SampleConfig", "DECISIVE", "load_sample_config", "make_plan", "Plan", "generate",
           "labels_for", "parse_classes", "npz_bytes", "read_npz"]
