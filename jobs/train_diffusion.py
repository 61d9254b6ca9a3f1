"""Train the ADM diffusion on Ray Train: `python jobs/train_diffusion.py --config YAML [...]`
(see `adm.train.cli` for the options)."""
from adm.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main("diffusion"))
