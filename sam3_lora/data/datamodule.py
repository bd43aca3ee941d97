"""`CocoDataModule`: train / valid / test loaders of sam3 `BatchedDatapoint`s from a COCO export.

Reads and validates every split in `setup` (fatal problems raise `DataValidationError` before training; repairs
are logged), writes each split's repaired ground truth for evaluation, and serves:
train = one item per image (augmented, positives + sampled negatives); valid/test = one item per (image, chunk
of categories), square-resized only.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import cv2
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from sam3.model.data_misc import BatchedDatapoint
from sam3.train.data.collator import collate_fn_api

from sam3_lora.data.coco import CocoSplit, SplitPaths, read_splits, resolve_split_paths
from sam3_lora.data.dataset import DatasetSettings, EpochSampler, EvalDataset, SkipCounter, TrainDataset
from sam3_lora.data.queries import EXTRA_PHRASE_CATEGORY_ID, QuerySpec, SharedPromptError, resolve_prompts
from sam3_lora.data.report import DataValidationError, Problem
from sam3_lora.data.resumable import LoaderPosition, ResumableDataLoader
from sam3_lora.data.shapes import write_shapes_dataset
from sam3_lora.data.transforms import META_SCALE_RANGE, build_eval_transform, build_train_transform

log = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test")


def collate_batch(batch: list, with_masks: bool) -> BatchedDatapoint:
    """sam3's own collate, unwrapped from its {"all": ...} dict."""
    return collate_fn_api(batch, "all", with_seg_masks=with_masks)["all"]


def _single_threaded_opencv() -> None:
    """One OpenCV thread, set in the parent BEFORE DataLoader workers fork.

    One worker process per core: OpenCV's own thread pool inside each worker would oversubscribe the CPUs.
    Setting it inside a forked worker (worker_init_fn) deadlocks when the parent had already used OpenCV's
    thread pool (its lock is copied held into the child); forked workers inherit the setting instead.
    (No RNG to seed in workers: every random draw is derived from (seed, epoch, index) in the dataset.)
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


class CocoDataModule(LightningDataModule):
    """COCO / Roboflow export → sam3 batches. Every argument is a plain value (config only via `instantiate`).

    Args:
        root: dataset root in Roboflow layout (ROOT/{train,valid,test}/_annotations.coco.json + images).
        resolution: model input side (`model.resolution`).
        batch_size: training images per batch.
        eval_batch_size: (image, category-chunk) items per evaluation batch (default: batch_size).
        num_workers: DataLoader worker processes.
        num_negatives: negative queries sampled per training image; "all" (or None / -1) asks every absent one.
        extra_negative_prompts: phrases that are never in the data, added to the negative pool in training.
        prompts: category id or name → prompt phrase (default: the category name).
        eval_categories_per_chunk: categories asked per evaluation item (bounds evaluation memory).
        max_queries_per_image: cap on training queries per image (None = no cap).
        drop_background_category: drop Roboflow's empty category with supercategory "none".
        scale_range: training random square side as fractions of resolution (None = no scale/pad augmentation).
        hflip: horizontal flip probability in training (0 = off).
        color_jitter: brightness/contrast/saturation jitter strength in training (0 = off).
        seed: base of every data random draw (order, augmentation, negatives).
        with_masks: serve instance masks: True, False or "auto" (= the train split has segmentations).
        generate_shapes: None, or `write_shapes_dataset` kwargs to generate the dataset at `root` if absent.
        train_ann, train_images, valid_ann, valid_images, test_ann, test_images: explicit split paths (an
            annotation file without an image folder means the images sit next to it).
        decode_images_on_setup: fully decode every image during setup (slow; default: headers only).
        cache_dir: where the repaired ground-truth jsons are written (default: a new temporary folder).
        pin_memory / persistent_workers: DataLoader options.
        exemplar_prob: training chance that a positive query also carries the box of one of its instances
            (sam3's box-exemplar prompt through the geometry encoder); 0 = text prompts only.
        exemplar_text_prob: chance that an exemplar query keeps its text ("text+box"); else box only.
        eval_exemplars: evaluation also asks every positive with "box" and "text+box" prompts (AP per prompt
            type, keys `...@box`); None = whenever `exemplar_prob` > 0.
    """

    def __init__(self, root: str = "data", resolution: int = 1008, batch_size: int = 1,
                 eval_batch_size: int | None = None, num_workers: int = 2,
                 num_negatives: int | str | None = 3, extra_negative_prompts: Sequence[str] = (),
                 prompts: Mapping[Any, str] | None = None, eval_categories_per_chunk: int = 16,
                 max_queries_per_image: int | None = 16, drop_background_category: bool = True,
                 scale_range: Sequence[float] | None = META_SCALE_RANGE, hflip: float = 0.5,
                 color_jitter: float = 0.1, seed: int = 0, with_masks: bool | Literal["auto"] = "auto",
                 generate_shapes: Mapping[str, Any] | None = None,
                 train_ann: str | None = None, train_images: str | None = None,
                 valid_ann: str | None = None, valid_images: str | None = None,
                 test_ann: str | None = None, test_images: str | None = None,
                 decode_images_on_setup: bool = False, cache_dir: str | None = None,
                 pin_memory: bool = False, persistent_workers: bool = True, exemplar_prob: float = 0.0,
                 exemplar_text_prob: float = 0.5, eval_exemplars: bool | None = None):
        super().__init__()
        for key, value in (("exemplar_prob", exemplar_prob), ("exemplar_text_prob", exemplar_text_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"data.{key}={value}: a probability must be in [0, 1]")
        self.exemplar_prob, self.exemplar_text_prob = float(exemplar_prob), float(exemplar_text_prob)
        self.eval_exemplars = exemplar_prob > 0 if eval_exemplars is None else bool(eval_exemplars)
        self.root = Path(root)
        self.resolution = resolution
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.num_negatives = _negatives(num_negatives)
        self.extra_negative_prompts = list(extra_negative_prompts)
        self.prompts = dict(prompts or {})
        self.eval_categories_per_chunk = eval_categories_per_chunk
        self.max_queries_per_image = max_queries_per_image
        self.drop_background_category = drop_background_category
        self.scale_range = tuple(scale_range) if scale_range is not None else None
        self.hflip, self.color_jitter, self.seed = hflip, color_jitter, seed
        self.with_masks_setting = with_masks
        self.generate_shapes = dict(generate_shapes) if generate_shapes is not None else None
        self.explicit = {"train": (train_ann, train_images), "valid": (valid_ann, valid_images),
                         "test": (test_ann, test_images)}
        self.decode_images_on_setup = decode_images_on_setup
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.splits: dict[str, CocoSplit] = {}
        self._skipped_train, self._skipped_eval = SkipCounter(), SkipCounter()
        self._datasets: dict[str, Any] = {}
        self._train_position = LoaderPosition()  # shared with the training loader; saved in checkpoints

    # ----- preparation ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the shapes dataset at `root` if configured and absent (Lightning: once per node)."""
        self._generate_if_needed()

    def setup(self, stage: str | None = None) -> None:
        """Read and validate all splits, then build the datasets (idempotent).

        Raises:
            DataValidationError: any split has fatal problems (the message lists each with file, id and field).
        """
        if self._datasets:
            return
        self._generate_if_needed()
        self.splits = read_splits(self.split_paths(), self.drop_background_category, self.decode_images_on_setup)
        fatal = [p for split in self.splits.values() for p in split.report.fatal]
        if fatal:
            raise DataValidationError(fatal)
        self._refuse_shared_prompts()
        self._write_ground_truth()
        self._build_datasets()

    def _refuse_shared_prompts(self) -> None:
        try:
            self.category_names
        except SharedPromptError as err:  # a data problem: reported like the validator's, naming the field
            problem = Problem("fatal", "duplicate_category_name", str(self.split_paths()["train"].annotation_file),
                              f"categories field 'name': {err}")
            raise DataValidationError([problem]) from err

    def split_paths(self) -> dict[str, SplitPaths]:
        """Paths of the splits to read: train and valid always, test when present or given explicitly."""
        return resolve_split_paths(self.root, self.explicit)

    def _generate_if_needed(self) -> None:
        if self.generate_shapes is None or SplitPaths.roboflow(self.root, "train").annotation_file.exists():
            return
        own_folder = f"shapes_{self.generate_shapes.get('style', 'source')}"  # the demo's default data.root
        if self.root.name != own_folder:
            # never write synthetic images into a user's path (e.g. `experiment=demo data.root=/my/export`)
            raise FileNotFoundError(f"data.root={self.root} has no train/_annotations.coco.json; the synthetic "
                                    f"dataset is only generated into a folder named '{own_folder}' (the demo's "
                                    "default data.root): point data.root at a COCO export, or leave it unset")
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()  # an empty folder (e.g. made by a launcher) is as good as absent
        log.info("generating the synthetic shapes dataset at %s", self.root)
        write_shapes_dataset(self.root, **self.generate_shapes)

    def _write_ground_truth(self) -> None:
        folder = self.cache_dir or Path(tempfile.mkdtemp(prefix="sam3_lora_gt_"))
        self._ground_truth = {name: split.write_clean_json(folder / f"{name}.json") for name, split in
                              self.splits.items()}

    def _build_datasets(self) -> None:
        phrases = self._phrases()
        with_masks = self.with_masks
        train = DatasetSettings(phrases, build_train_transform(self.resolution, self.scale_range, self.hflip,
                                                               self.color_jitter),
                                with_masks, self.seed, self._skipped_train, exemplar_prob=self.exemplar_prob,
                                exemplar_text_prob=self.exemplar_text_prob)
        evaluation = DatasetSettings(phrases, build_eval_transform(self.resolution), with_masks, self.seed,
                                     self._skipped_eval, eval_exemplars=self.eval_exemplars)
        self._datasets["train"] = TrainDataset(self.splits["train"].records, train, self.num_negatives,
                                               self.max_queries_per_image)
        for name in EVAL_SPLITS:
            if name in self.splits:
                self._datasets[name] = EvalDataset(self.splits[name].records, evaluation,
                                                   self.eval_categories_per_chunk)

    def _phrases(self) -> list[QuerySpec]:
        names = self.category_names
        clash = sorted(set(self.extra_negative_prompts) & set(names.values()))
        if clash:
            raise ValueError(f"data.extra_negative_prompts {clash} are also category prompts; remove them")
        phrases = [QuerySpec(names[i], i, slot) for slot, i in enumerate(self.category_ids)]
        offset = len(phrases)
        return phrases + [QuerySpec(t, EXTRA_PHRASE_CATEGORY_ID, offset + k)
                          for k, t in enumerate(self.extra_negative_prompts)]

    # ----- what evaluation and the model need ----------------------------------------------------------------
    def annotation_file(self, split: str) -> Path:
        """The repaired ground-truth COCO json of a split (what evaluation must score against).

        Without a test split, "test" means valid, as in `test_dataloader`.
        """
        self._require_setup()
        split = "valid" if split == "test" and "test" not in self._ground_truth else split
        if split not in self._ground_truth:
            raise KeyError(f"split '{split}' was not read; available: {sorted(self._ground_truth)}")
        return self._ground_truth[split]

    @property
    def category_ids(self) -> list[int]:
        """Kept original COCO category ids, in query order."""
        self._require_setup()
        return list(self.splits["train"].categories)

    @property
    def category_names(self) -> dict[int, str]:
        """Category id → the prompt text actually used."""
        self._require_setup()
        return resolve_prompts(self.splits["train"].categories, self.prompts)

    @property
    def has_masks(self) -> bool:
        """Whether any non-crowd training annotation has a segmentation."""
        self._require_setup()
        return any(i.segmentation is not None for r in self.splits["train"].records for i in r.targets)

    @property
    def with_masks(self) -> bool:
        """Whether batches carry instance masks (resolves "auto")."""
        return self.has_masks if self.with_masks_setting == "auto" else bool(self.with_masks_setting)

    @property
    def skipped_images(self) -> int:
        """Images that failed to decode while loading (training and evaluation, over all workers, so far)."""
        return self._skipped_train.value + self._skipped_eval.value

    @property
    def skipped_train_images(self) -> int:
        """Training images skipped because they failed to decode (each time met; over all workers, so far)."""
        return self._skipped_train.value

    def _require_setup(self) -> None:
        if not self.splits:
            raise RuntimeError("CocoDataModule.setup() has not run yet; call it (Lightning does) first")

    # ----- resume (Lightning saves this in checkpoints and restores it before building the loaders) ----------
    def state_dict(self) -> dict[str, Any]:
        """The training loader's position in its epoch (exact mid-epoch resume, see data/resumable.py)."""
        return {"train_position": self._train_position.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training loader where the checkpointed run was."""
        if "train_position" in state_dict:
            self._train_position.load_state_dict(state_dict["train_position"])

    # ----- loaders ------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches (`BatchedDatapoint`)."""
        dataset = self._datasets["train"]
        return self._loader(dataset, self.batch_size, EpochSampler(len(dataset), self.seed, shuffle=True),
                            position=self._train_position)

    def val_dataloader(self) -> DataLoader:
        """Validation batches: every category per image, in chunks."""
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        """Test batches (falls back to valid when the export has no test split)."""
        if "test" not in self._datasets:
            log.warning("no test split under %s: testing on the valid split", self.root)
            return self._eval_loader("valid")
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        # evaluation is deterministic and in order: a plain sequential loader, which Lightning shards under DDP
        return self._loader(self._datasets[name], self.eval_batch_size, sampler=None)

    def _loader(self, dataset, batch_size: int, sampler: EpochSampler | None,
                position: LoaderPosition | None = None) -> DataLoader:
        # training resumes mid-epoch exactly: its loader's position is saved in checkpoints (data/resumable.py)
        loader_class, extra = (ResumableDataLoader, {"position": position}) if position is not None \
            else (DataLoader, {})
        if self.num_workers > 0:
            _single_threaded_opencv()
        return loader_class(
            dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=self.num_workers,
            collate_fn=functools.partial(collate_batch, with_masks=self.with_masks),
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0, **extra,
        )


def _negatives(value: int | str | None) -> int | None:
    if value is None or value == "all" or value == -1:
        return None
    if isinstance(value, int) and value >= 0:
        return value
    raise ValueError(f"data.num_negatives must be an integer >= 0 or 'all', got {value!r}")
