"""`maml-run`: thin Hydra entry point. Bad input ends with one line on stderr and exit code 2."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import UserError

log = logging.getLogger("maml_runner")
CONFIG_PATH = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from .train import StopRequested, run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        row = run(cfg, run_dir)
    except UserError as exc:
        print(f"maml-run: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as exc:
        print(f"maml-run: {exc}", file=sys.stderr)
        sys.exit(130)
    return float(row["mean"])  # the sweep objective


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
