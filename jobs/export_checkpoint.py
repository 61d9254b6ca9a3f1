"""Export a training run's latest checkpoint in the reference's file names:

    python jobs/export_checkpoint.py RUN_URI OUT_DIR

writes OUT_DIR/model%06d.pt, OUT_DIR/ema_<rate>_%06d.pt and OUT_DIR/flags.json (plain state
dicts: they load in guided-diffusion and with adm.compat.openai.load_checkpoint).
"""
import argparse
import sys

from adm.train.checkpoint import export_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN_URI", help="the run folder: <storage>/<name>")
    p.add_argument("out", metavar="OUT_DIR", help="folder (or s3:// URI) to write to")
    args = p.parse_args(argv)
    try:
        for uri in export_run(args.run, args.out):
            print(uri)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
