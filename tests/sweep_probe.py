"""A Hydra callback for tests: records what each sweep job returned to the sweeper (its task function's value).

Used as `+hydra.callbacks.probe._target_=sweep_probe.ReturnValueProbe +hydra.callbacks.probe.path=<file>` with
tests/ on PYTHONPATH; one JSON line per job: job number, output directory, returned value.
"""
from __future__ import annotations

import json

from hydra.experimental.callback import Callback


class ReturnValueProbe(Callback):
    def __init__(self, path: str):
        self.path = path

    def on_job_end(self, config, job_return, **kwargs) -> None:
        record = {"job": int(config.hydra.job.num), "output_dir": str(job_return.hydra_cfg.hydra.runtime.output_dir),
                  "value": job_return.return_value if job_return.status.name == "COMPLETED" else None}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
