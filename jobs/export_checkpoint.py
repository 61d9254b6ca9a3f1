"""Export a training run's latest checkpoint in the reference's file names:

    python jobs/export_checkpoint.py RUN_URI OUT_DIR

writes OUT_DIR/model%06d.pt, OUT_DIR/ema_<rate>_%06d.pt and OUT_DIR/flags.json (plain state
dicts: they load in guided-diffusion and with adm.compat.openai.load_checkpoint), and beside
each .pt the same weights as .safetensors, with the flags in its metadata. No Ray. A
missing run, a run without checkpoints or an OUT_DIR that cannot be written ends the job with one
`error: ...` line on stderr and exit status 2.
"""
import argparse

from adm import storage
from adm.config import UserError
from adm.runtime import run_job


def check_inputs(run: str, out: str) -> str | None:
    """What is wrong with the arguments, or None (cheap checks, before torch is loaded)."""
    try:
        if not storage.is_dir(run):
            return (f"RUN_URI {run} holds no training checkpoint: there is no folder there "
                    "(expected <storage>/<run name>)")
        why = storage.why_not_writable(out)
    except (OSError, ValueError) as e:  # an unsupported scheme, S3 unreachable
        return f"cannot check {run} and {out}: {e}"
    return f"OUT_DIR {out} cannot be written: {why}" if why else None


@run_job
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN_URI", help="the run folder: <storage>/<name>")
    p.add_argument("out", metavar="OUT_DIR", help="folder (or s3:// URI) to write to")
    args = p.parse_args(argv)
    problem = check_inputs(args.run, args.out)
    if problem:
        raise UserError(problem)
    from adm.train.checkpoint import export_run  # imports torch: only once the inputs are fine

    try:  # (no checkpoint in the run folder: a FileNotFoundError, reported as it is)
        for uri in export_run(args.run, args.out):
            print(uri)
    except ValueError as e:  # a checkpoint whose meta.json is not JSON
        raise UserError(f"the latest checkpoint of {args.run} cannot be read: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
