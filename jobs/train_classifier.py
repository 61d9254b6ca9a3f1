"""Train the ADM classifier on Ray Train: `python jobs/train_classifier.py --config YAML [...]`
(see `adm.train.cli` for the options)."""
from adm.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main("classifier"))
