"""Train the ADM upsampler on Ray Train: `python jobs/train_upsampler.py --config YAML [...]`
(see `adm.train.cli` for the options)."""
from adm.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main("upsampler"))
