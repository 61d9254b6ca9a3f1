"""The quickstart, end to end on the embedded default (local Ray, local files, CPU, the digits):

    python jobs/quickstart.py [--config jobs/configs/quickstart/quickstart.yaml] [--quick]
        [--out DIR] [--address ADDR]

prepares the digits as shards; trains with Ray Train the class-conditional diffusion model, the
noisy classifier that guides it, a clean classifier that judges the samples and the 4x
upsampler; samples at each classifier scale with jobs/sample.py and upsamples one; evaluates
each scale with jobs/evaluate.py (the judge's features: FID, precision, recall, and its
accuracy on the labels the samples were drawn for); serves serve_configs/local.yaml, asks it
for an upsampled image over HTTP and saves it; then prints a summary and writes it as
OUT/summary.json. Every stage keeps its output under OUT, and a stage whose output is there
is not run again. `--quick` runs the same stages at a fraction of the size (its own OUT).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
import urllib.request
from dataclasses import field, fields, replace
from pathlib import Path

from adm.config import ConfigError, config_class, from_dict, load_yaml
from adm.runtime import run_job

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROLES = ("diffusion", "classifier", "judge", "upsampler")
KINDS = {"diffusion": "diffusion", "classifier": "classifier", "judge": "classifier",
         "upsampler": "upsampler"}


@config_class(frozen=True)
class QuickstartConfig:
    """The pipeline's settings (jobs/configs/quickstart/quickstart.yaml)."""

    out: str = "runs/quickstart"
    image_size: int = 32
    trainings: dict = field(default_factory=dict)  # role -> training config file (relative to
    #                                               this file's folder)
    train_workers: int = 2
    max_steps: int | None = None  # None: each training config's own
    scales: list = field(default_factory=lambda: [0, 1, 2, 4, 8])
    sampler: str = "ddim"
    steps: int = 25
    num_samples: int = 1000
    batch_size: int = 100
    upsample_scale: float = 2
    upsample_samples: int = 64
    upsampler_steps: int = 25
    seed: int = 0
    quick: dict = field(default_factory=dict)  # overrides of the fields above for --quick


def load_config(path: str, quick: bool, out: str | None) -> QuickstartConfig:
    cfg = from_dict(QuickstartConfig, load_yaml(path))
    cfg = replace(cfg, trainings={role: str(Path(path).resolve().parent / file)
                                  for role, file in cfg.trainings.items()})
    if quick:
        known = {f.name for f in fields(cfg)} - {"quick"}
        unknown = set(cfg.quick) - known
        if unknown:
            raise ConfigError(f"quick: unknown setting(s) {sorted(unknown)}")
        cfg = replace(cfg, out=cfg.out + "-quick", **cfg.quick)
    return replace(cfg, out=out) if out else cfg


def _job(name: str):
    """The `main` of jobs/<name>.py (run in this process: one Ray for every stage)."""
    spec = importlib.util.spec_from_file_location(f"adm_job_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise SystemExit(f"quickstart: {what} failed (exit status {status}); see above")


class Quickstart:
    def __init__(self, cfg: QuickstartConfig, address: str | None):
        self.cfg, self.address = cfg, address
        self.out = Path(cfg.out).resolve()
        self.data = self.out / "data" / "digits"
        self.models = self.out / "models"
        self.timings: dict[str, float] = {}

    def _ray(self) -> list[str]:
        return ["--address", self.address] if self.address else []

    def _begin(self, title: str) -> float:
        """A stage that has work to do: its header, and Ray (started or joined once, for every
        stage; a rerun whose stages are all done starts none)."""
        from adm.runtime import init_ray

        start = _stage(title)
        init_ray(self.address)
        return start

    def model(self, role: str) -> str:
        return str(self.models / role / "model.pt")

    def prepare(self) -> None:
        if (self.data / "val" / "manifest.json").exists():
            return
        start = _stage("preparing the digits")
        _check(_job("prepare_digits")(["--out", str(self.data), "--image-size",
                                       str(self.cfg.image_size), *self._ray()]), "prepare")
        self.timings["prepare"] = time.time() - start

    def train(self, role: str) -> None:
        """Train `role` with its config (resuming a partial run) and publish its EMA weights as
        models/<role>/model.pt and model.safetensors with flags.json and classes.json beside
        them."""
        if Path(self.model(role)).exists():
            return
        from adm.train.cli import main as train_main

        start = self._begin(f"training the {role} ({KINDS[role]}) on Ray Train, "
                       f"{self.cfg.train_workers} workers")
        config = Path(self.cfg.trainings[role])
        argv = ["--config", str(config), "--data", str(self.data), "--storage",
                str(self.out / "train"), "--num-workers", str(self.cfg.train_workers),
                *self._ray()]
        if self.cfg.max_steps is not None:
            argv += ["--max-steps", str(self.cfg.max_steps)]
        _check(train_main(KINDS[role], argv), f"training the {role}")
        self._publish(role, config)
        self.timings[f"train {role}"] = time.time() - start

    def _publish(self, role: str, config: Path) -> None:
        from adm.train.cli import parse_args, resolve_config
        from adm.train.trainer import run_uri

        args = parse_args(KINDS[role], ["--config", str(config), "--storage",
                                        str(self.out / "train")])
        export = Path(run_uri(resolve_config(KINDS[role], args))) / "export"
        emas = sorted(export.glob("ema_*.pt"), key=lambda p: p.stat().st_mtime)
        dest = self.models / role
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("flags.json", "classes.json"):
            shutil.copyfile(export / name, dest / name)
        # model.pt is written last, under its final name: its presence means "this stage is
        # done"; its .safetensors sibling (the same weights) goes before it.
        for source, name in ((emas[-1].with_suffix(".safetensors"), "model.safetensors"),
                             (emas[-1], "model.pt")):
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(source, tmp)
            tmp.replace(dest / name)
        print(f"[{role}] {emas[-1].name} -> {dest / 'model.pt'} (and model.safetensors)")

    def samples_dir(self, scale) -> Path:
        return self.out / "samples" / f"scale_{scale:g}"

    def sample(self, scale: float) -> None:
        out = self.samples_dir(scale)
        if (out / "samples.npz").exists():
            return
        start = self._begin(f"sampling {self.cfg.num_samples} digits at classifier scale "
                            f"{scale:g}")
        argv = ["--model", self.model("diffusion"), "--sampler", self.cfg.sampler,
                "--steps", str(self.cfg.steps), "--num-samples", str(self.cfg.num_samples),
                "--batch-size", str(self.cfg.batch_size), "--classes", "balanced",
                "--seed", str(self.cfg.seed), "--out", str(out), *self._ray()]
        if scale:  # scale 0 is unguided: no classifier (its gradient would be thrown away)
            argv += ["--classifier", self.model("classifier"), "--classifier-scale", str(scale)]
        _check(_job("sample")(argv), f"sampling at scale {scale:g}")
        self.timings[f"sample {scale:g}"] = time.time() - start

    def upsample(self) -> Path:
        out = self.out / "samples" / "upsampled"
        if not (out / "samples.npz").exists():
            start = self._begin(f"{self.cfg.upsample_samples} samples at scale "
                           f"{self.cfg.upsample_scale:g}, upsampled to "
                           f"{self.cfg.image_size} px")
            argv = ["--model", self.model("diffusion"), "--classifier",
                    self.model("classifier"), "--classifier-scale",
                    str(self.cfg.upsample_scale), "--upsampler", self.model("upsampler"),
                    "--upsampler-steps", str(self.cfg.upsampler_steps), "--sampler",
                    self.cfg.sampler, "--steps", str(self.cfg.steps), "--num-samples",
                    str(self.cfg.upsample_samples), "--batch-size",
                    str(min(self.cfg.batch_size, self.cfg.upsample_samples)), "--classes",
                    "balanced", "--seed", str(self.cfg.seed), "--out", str(out), *self._ray()]
            _check(_job("sample")(argv), "upsampling")
            self.timings["upsample"] = time.time() - start
        return out

    def evaluate(self, scale: float) -> dict:
        result = self.out / "eval" / f"scale_{scale:g}.json"
        if not result.exists():
            start = self._begin(f"evaluating scale {scale:g} with the judge's features")
            result.parent.mkdir(parents=True, exist_ok=True)
            _check(_job("evaluate")([str(self.data), str(self.samples_dir(scale)),
                                     "--features", f"classifier:{self.model('judge')}",
                                     "--out", str(result), *self._ray()]),
                   f"evaluating scale {scale:g}")
            self.timings[f"evaluate {scale:g}"] = time.time() - start
        return json.loads(result.read_text())

    def serve(self) -> Path:
        """serve_configs/local.yaml with this run's models: one upsampled PNG over HTTP."""
        image = self.out / "served.png"
        if image.exists():
            return image
        start = self._begin("serving serve_configs/local.yaml and requesting an upsampled "
                            "image")
        from adm.serve.local import run_config_app

        with run_config_app(ROOT / "serve_configs" / "local.yaml",
                            {"base": self.model("diffusion"),
                             "classifier": self.model("classifier"),
                             "upsampler": self.model("upsampler")}) as url:
            body = json.dumps({"class_name": "7", "num_images": 1, "guidance_scale":
                               self.cfg.upsample_scale, "seed": self.cfg.seed,
                               "upsample": True, "response": "png"}).encode()
            request = urllib.request.Request(f"{url}/v1/generate", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                image.write_bytes(response.read())
        self.timings["serve"] = time.time() - start
        return image


def summarize(q: Quickstart, results: dict, upsampled: Path, served: Path) -> dict:
    rows = []
    for scale, r in results.items():
        rows.append({"scale": scale, "fid": r["fid"], "precision": r["precision"],
                     "recall": r["recall"], "sample_accuracy": r.get("sample_accuracy"),
                     "grid": str(q.samples_dir(scale) / "grid.png")})
    summary = {"scales": rows, "upsampled_grid": str(upsampled / "grid.png"),
               "served_image": str(served), "config": q.cfg.__dict__,
               "stage_seconds": {k: round(v, 1) for k, v in q.timings.items()}}
    (q.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n scale    FID   precision  recall  sample accuracy")
    for r in rows:
        acc = "-" if r["sample_accuracy"] is None else f"{r['sample_accuracy']:.3f}"
        print(f" {r['scale']:>5g} {r['fid']:>7.2f} {r['precision']:>10.3f} "
              f"{r['recall']:>7.3f} {acc:>16}")
    print("\nsample grids:", *(r["grid"] for r in rows), sep="\n  ")
    print(f"upsampled grid: {upsampled / 'grid.png'}\nserved image:   {served}")
    print(f"summary:        {q.out / 'summary.json'}")
    return summary


@run_job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(HERE / "configs" / "quickstart" / "quickstart.yaml"))
    p.add_argument("--quick", action="store_true", help="the same stages at a fraction of "
                   "the size (for checking the pipeline)")
    p.add_argument("--out", help="run folder (default: the config's out, -quick for --quick)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.quick, args.out)
    q = Quickstart(cfg, args.address)
    q.prepare()
    for role in ROLES:
        q.train(role)
    for scale in cfg.scales:
        q.sample(scale)
    upsampled = q.upsample()
    results = {scale: q.evaluate(scale) for scale in cfg.scales}
    served = q.serve()
    summarize(q, results, upsampled, served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
