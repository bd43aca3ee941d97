"""Train / valid / test assignment: the source's own splits where it has them, deterministic ones where it does not.

Rule: images the source puts in a split stay there. The *pool* — images without a source split, plus the source's
train images when the source has no validation split — is divided by the ratios (the test share is 0 when the
source has its own test split). The pool is ordered by sha256("<seed>:<key>") of each image's path relative to the
source root; the first round(n·valid) go to valid, the next round(n·test) to test, the rest to train. So the
assignment depends only on the file names and the seed (not on listing order or machine), the counts follow the
ratios, and adding images moves only images near the cut.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sam3_lora.convert.common import SourceImage

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitRatios:
    """Shares of the pool that go to train / valid / test (normalised by their sum)."""

    train: float = 0.8
    valid: float = 0.1
    test: float = 0.1

    def __post_init__(self) -> None:
        if min(self.train, self.valid, self.test) < 0 or self.train <= 0 or self.valid <= 0:
            raise ValueError(f"split ratios train={self.train}, valid={self.valid}, test={self.test}: all must be "
                             "≥ 0, and train and valid > 0 (training needs both)")

    @classmethod
    def parse(cls, text: str) -> SplitRatios:
        """"0.8,0.1,0.1" (train,valid,test; test may be omitted = 0) → SplitRatios.

        Raises:
            ValueError: not two or three numbers, or invalid ratios.
        """
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            values = []
        if len(values) not in (2, 3):
            raise ValueError(f"split ratios {text!r} must be 'train,valid[,test]' numbers, e.g. 0.8,0.1,0.1")
        return cls(*values, *[0.0] * (3 - len(values)))

    def __str__(self) -> str:
        return f"{self.train:g}/{self.valid:g}/{self.test:g}"


def split_order_key(key: str, seed: int) -> str:
    """The position of an image in the deterministic order: sha256 of "<seed>:<key>" (Python's hash() is salted)."""
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()


def assign_splits(images: list[SourceImage], ratios: SplitRatios, seed: int) -> tuple[dict[str, list[SourceImage]],
                                                                                      str]:
    """Group images by split (see the module docstring for the rule).

    Returns:
        (split → images in key order, a sentence saying where the splits came from).
    """
    given = {image.split for image in images if image.split}
    pool = [i for i in images if i.split is None or ("valid" not in given and i.split == "train")]
    pooled = {id(i) for i in pool}
    splits: dict[str, list[SourceImage]] = {name: [i for i in images if i.split == name and id(i) not in pooled]
                                            for name in SPLITS}
    test_share = 0.0 if "test" in given else ratios.test
    counts = _pool_counts(len(pool), ratios.train, ratios.valid, test_share)
    ordered = sorted(pool, key=lambda i: split_order_key(i.key, seed))
    splits["valid"] += ordered[:counts["valid"]]
    splits["test"] += ordered[counts["valid"]:counts["valid"] + counts["test"]]
    splits["train"] += ordered[counts["valid"] + counts["test"]:]
    for name in SPLITS:
        splits[name].sort(key=lambda i: i.key)
    return splits, _describe(given, len(pool), counts, ratios, test_share, seed)


def _pool_counts(n: int, train: float, valid: float, test: float) -> dict[str, int]:
    total = train + valid + test
    n_valid, n_test = round(n * valid / total), round(n * test / total)
    if n >= 2 and n_valid == 0:
        n_valid = 1  # a tiny dataset still gets a validation image
    while n_valid + n_test >= n and n_test > 0:
        n_test -= 1  # train keeps at least one image
    while n_valid >= n and n_valid > 0 and n >= 2:
        n_valid -= 1
    return {"train": n - n_valid - n_test, "valid": n_valid, "test": n_test}


def _describe(given: set[str], pooled: int, counts: dict[str, int], ratios: SplitRatios, test_share: float,
              seed: int) -> str:
    kept = "/".join(s for s in SPLITS if s in given)
    if not pooled:
        return f"splits from the source ({kept})"
    shares = f"{ratios.train:g}/{ratios.valid:g}" + (f"/{test_share:g}" if test_share else "")
    made = (f"{pooled} image(s) split by ratios {shares} (seed {seed}) into "
            + "/".join(f"{counts[s]} {s}" for s in SPLITS if s != "test" or test_share))
    return made if not given else f"splits from the source ({kept}); {made}"
