"""Hydra entry point: python train.py [overrides]   (see README; the logic lives in sam3_lora.train)."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from sam3_lora.entry import expected_failure, failure_message, log_lightning_through_root, silence_known_warnings

silence_known_warnings()  # before sam3_lora.train imports sam3

from sam3_lora.memory import tune_glibc_malloc  # noqa: E402
from sam3_lora.train import run  # noqa: E402

log = logging.getLogger("train")
# Input side from which glibc's fixed malloc thresholds pay off: big activations go back to the OS when freed
# (peak RSS 6.8 -> 5.7 GB for a lean 1008 px CPU step, README); below it they only add mmap/munmap system time.
MALLOC_TUNING_MIN_RESOLUTION = 504


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    log_lightning_through_root()
    if cfg.model.resolution >= MALLOC_TUNING_MIN_RESOLUTION:
        tune_glibc_malloc()
    try:
        return run(cfg)
    except Exception as err:  # expected failures: one message; bugs keep Hydra's traceback
        reported = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else expected_failure(err)
        if reported is None:
            raise
        log.error("%s\n(set HYDRA_FULL_ERROR=1 for the traceback)", failure_message(reported))
        sys.exit(1)


if __name__ == "__main__":
    main()
