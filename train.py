"""Hydra entry point: python train.py [overrides]   (see README; the logic lives in sam3_lora.train)."""

import hydra
from omegaconf import DictConfig

from sam3_lora.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
