"""Several adapters on one SAM3 base: `Sam3Predictor(base).add_adapter(name, dir)`, then `predict`.

The adapters are loaded onto one PEFT model with PEFT's multi-adapter API (`add_adapter` through
`sam3_lora.lora.inject_lora`, `load_adapter`, `set_adapter`). Where no adapter touches the image backbone
(ViT + neck: no LoRA target and no modules_to_save there), each image goes through it once and every adapter
reuses the features (`compat.reuse_image_features`); otherwise the backbone runs per adapter, as it must.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict
from safetensors.torch import load_file
from sam3.model.utils.misc import copy_data_to_device
from sam3.train.data.collator import collate_fn_api

from sam3_lora import compat
from sam3_lora.adapter import read_adapter_dir
from sam3_lora.checkpoint_io import readable_version
from sam3_lora.data.images import read_image_rgb
from sam3_lora.data.transforms import eval_image_tensor
from sam3_lora.evaluation.postprocess import final_predictions, predictions_to_coco
from sam3_lora.lora import inject_lora
from sam3_lora.model import build_sam3
from sam3_lora.predict import move_model, prompt_datapoint

log = logging.getLogger(__name__)

IMAGE_BACKBONE = "backbone.vision_backbone."
# Model-config keys that may differ between adapters sharing a base (where the weights come from, not sizes).
NOT_DIMENSIONS = {"checkpoint", "bpe_path", "activation_checkpointing", "dropout", "attention_dropout", "drop_path"}


class Sam3Predictor:
    """One SAM3 base in memory, any number of named LoRA adapters on it.

    Example:
        predictor = Sam3Predictor("builtin:tiny").add_adapter("cracks", "runs/cracks/adapter")
        results = predictor.predict(["a.jpg"], {"cracks": ["crack"]})
    """

    def __init__(self, base: str | None, device: str | torch.device | None = None) -> None:
        """Args:
            base: what `model.checkpoint` accepts: a path, "hub", "builtin:tiny" (None: random init, for tests).
            device: where to run (default: cuda when available). The model is built on the first adapter,
                whose model config gives the dimensions.
        """
        self.base = base
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: PeftModel | None = None
        self.model_config: dict | None = None
        self.adapters: dict[str, Path] = {}
        self.adapts_image_backbone: dict[str, bool] = {}

    def add_adapter(self, name: str, adapter_dir: str | Path) -> "Sam3Predictor":
        """Load an adapter directory under `name` (strictly: every tensor must fit).

        Raises:
            ValueError: the name is taken or invalid, or the adapter was trained on other dimensions.
        """
        if name in self.adapters or not name.isidentifier():
            raise ValueError(f"adapter name {name!r} is {'taken' if name in self.adapters else 'not an identifier'}: "
                             "use a unique name of letters, digits and _")
        adapter_dir = readable_version(adapter_dir)
        _, model_config = read_adapter_dir(adapter_dir)
        self._check_dimensions(name, adapter_dir, model_config)
        config = LoraConfig.from_pretrained(str(adapter_dir))
        config.inference_mode = True
        if self.model is None:
            self.model_config = {**model_config, "checkpoint": self.base}
            base = build_sam3(**self.model_config)
            self.model = inject_lora(base, config, adapter_name=name)
        else:
            self.model = inject_lora(self.model, config, adapter_name=name)
        self._load_weights(name, adapter_dir)
        self.model = move_model(self.model, self.device).eval()
        self.adapters[name] = Path(adapter_dir)
        self.adapts_image_backbone[name] = _touches_image_backbone(self.model, name)
        if self.adapts_image_backbone[name]:
            log.info("adapter %s changes the image backbone (ViT/neck): images go through it once per adapter "
                     "that does", name)
        return self

    def _check_dimensions(self, name, adapter_dir, model_config: dict) -> None:
        if self.model_config is None:
            return
        differences = [f"{k}: {model_config.get(k)} vs {self.model_config.get(k)}"
                       for k in sorted(set(model_config) | set(self.model_config))
                       if k not in NOT_DIMENSIONS and model_config.get(k) != self.model_config.get(k)]
        if differences:
            first = next(iter(self.adapters))
            raise ValueError(f"adapter {name} ({adapter_dir}/sam3_model_config.json) was trained on other SAM3 "
                             f"dimensions than adapter {first}: {'; '.join(differences)}. Adapters sharing a base "
                             "need the same model config; run them with separate predictors")

    def _load_weights(self, name: str, adapter_dir) -> None:
        """A strict check (the file's tensors are exactly the adapter's), then PEFT's `load_adapter`.

        (`load_adapter` reports missing LoRA tensors only and raises a bare KeyError on missing
        modules_to_save ones.) On failure the half-added adapter is deleted, so the predictor stays usable.
        """
        stored = set(load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
        expected = set(get_peft_model_state_dict(self.model, adapter_name=name))
        problems = [f"missing {k}" for k in sorted(expected - stored)] + [f"unexpected {k}"
                                                                         for k in sorted(stored - expected)]
        if not problems:
            problems = list(self.model.load_adapter(str(adapter_dir), adapter_name=name).unexpected_keys)
        if problems:
            if self.adapters:
                self.model.delete_adapter(name)
            else:
                self.model, self.model_config = None, None
            raise ValueError(f"adapter {adapter_dir} does not fit the base {self.base}: {len(problems)} tensors "
                             f"differ, e.g. {problems[:5]}")

    @torch.inference_mode()
    def predict(self, image_paths: Sequence[str | Path], prompts: Mapping[str, Sequence[str]], topk: int = 100,
                batch_size: int = 4) -> list[dict]:
        """Predict each adapter's prompts on every image (unthresholded COCO results, sorted per image).

        Args:
            image_paths: image files.
            prompts: adapter name → noun phrases run with that adapter.
            topk: detections per (image, prompt).
            batch_size: images per forward pass.

        Returns:
            COCO results (`image_id` = position in `image_paths`) with `adapter`, `category_name` (the phrase),
            `file_name`; `category_id` numbers the (adapter, phrase) pairs from 1 in the order given.

        Raises:
            ValueError: no adapter loaded, or a prompt names an unknown adapter.
        """
        unknown = sorted(set(prompts) - set(self.adapters))
        if self.model is None or unknown:
            raise ValueError(f"prompts for unknown adapters {unknown} (loaded: {sorted(self.adapters)}); "
                             "call add_adapter(name, dir) first")
        categories = [(name, phrase) for name, phrases in prompts.items() for phrase in phrases]
        results = []
        for start in range(0, len(image_paths), batch_size):
            chunk = list(enumerate(image_paths[start:start + batch_size], start=start))
            results += self._predict_chunk(chunk, prompts, categories, topk)
        return results

    def _predict_chunk(self, chunk, prompts, categories, topk) -> list[dict]:
        resolution = self.model_config.get("resolution", 1008)
        images = {i: read_image_rgb(Path(p)) for i, p in chunk}
        tensors = {i: eval_image_tensor(images[i], resolution) for i in images}
        names = [n for n in prompts if prompts[n]]
        shared = [n for n in names if not self.adapts_image_backbone[n]]
        features = self._shared_features(shared[0], torch.stack([tensors[i] for i, _ in chunk])) if shared else None
        results = []
        for name in names:
            datapoints = [prompt_datapoint(tensors[i], i, images[i].shape[:2], prompts[name]) for i, _ in chunk]
            reused = features if name in shared else None
            for result in self._run_adapter(name, datapoints, reused, topk):
                phrase = prompts[name][result["category_id"] - 1]
                result.update(adapter=name, category_name=phrase, category_id=categories.index((name, phrase)) + 1,
                              file_name=str(chunk[result["image_id"] - chunk[0][0]][1]))
                results.append(result)
        return sorted(results, key=lambda r: (r["image_id"], r["category_id"], -r["score"]))

    def _shared_features(self, name: str, images: torch.Tensor) -> dict:
        """Image-backbone features under adapter `name`, which leaves the backbone as the base has it."""
        self.model.set_adapter(name)
        return self.model.get_base_model().backbone.forward_image(images.to(self.device))

    def _run_adapter(self, name: str, datapoints, features: dict | None, topk: int) -> list[dict]:
        self.model.set_adapter(name)
        batch = collate_fn_api(datapoints, "all", with_seg_masks=False)["all"]
        batch = copy_data_to_device(batch, self.device, non_blocking=True)
        backbone = self.model.get_base_model().backbone
        with compat.reuse_image_features(backbone, features):
            outputs = final_predictions(self.model(batch))
        return predictions_to_coco(outputs, batch.find_metadatas[0], topk=topk, with_masks="pred_masks" in outputs)


def _touches_image_backbone(model: PeftModel, name: str) -> bool:
    """Whether adapter `name` has a LoRA layer or a fully trained module in (or above) the ViT/neck."""
    for module_name, module in model.get_base_model().named_modules():
        inside = module_name.startswith(IMAGE_BACKBONE) or IMAGE_BACKBONE.startswith(module_name + ".")
        if not inside:
            continue
        if isinstance(module, LoraLayer) and name in module.lora_A:
            return True
        if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            return True
    return False


def parse_named(values: Sequence[str], separator: str, option: str) -> list[tuple[str, str]]:
    """"NAME<sep>VALUE" strings → (NAME, VALUE) pairs.

    Raises:
        ValueError: a value without the separator or with an empty side (the message names the option).
    """
    pairs = []
    for value in values:
        name, found, rest = value.partition(separator)
        if not found or not name.strip() or not rest.strip():
            raise ValueError(f"{option} {value!r}: expected NAME{separator}VALUE, e.g. cracks{separator}"
                             f"{'runs/cracks/adapter' if separator == '=' else 'crack'}")
        pairs.append((name.strip(), rest.strip()))
    return pairs


def multi_adapter_main(args) -> int:
    """`sam3-lora predict BASE --adapter NAME=DIR ... --prompt NAME:phrase ... IMAGES --out DIR`.

    Writes `predictions.json` (results with `adapter` and `category_name`, score >= --threshold) and one PNG
    overlay per image with every adapter's detections.

    Raises:
        ValueError: malformed --adapter/--prompt, a prompt for an adapter not given, --box or --base used.
    """
    from sam3_lora.predict import PREDICTIONS_FILE, _overlay_names, find_images

    if args.box or args.base:
        raise ValueError("sam3-lora predict --adapter: --box and --base do not apply (give BASE as the first path)")
    adapters = parse_named(args.adapter, "=", "--adapter")
    prompts: dict[str, list[str]] = {}
    for name, phrase in parse_named(args.prompt, ":", "--prompt"):
        prompts.setdefault(name, []).append(phrase)
    unknown = sorted(set(prompts) - {name for name, _ in adapters})
    if unknown:
        raise ValueError(f"--prompt names adapters that no --adapter NAME=DIR gives: {unknown}")
    if not prompts or len(args.paths) < 2:
        raise ValueError("sam3-lora predict BASE IMAGES --adapter NAME=DIR ... --prompt NAME:phrase ...: give the "
                         "base, then images, and at least one --prompt NAME:phrase")
    image_paths = find_images(args.paths[1:])
    predictor = Sam3Predictor(args.paths[0], device=args.device)
    for name, adapter_dir in adapters:
        predictor.add_adapter(name, adapter_dir)
    kept = [r for r in predictor.predict(image_paths, prompts, batch_size=args.batch_size)
            if r["score"] >= args.threshold]
    _write_outputs(kept, image_paths, Path(args.out), _overlay_names(image_paths), PREDICTIONS_FILE)
    return 0


def _write_outputs(results, image_paths, out_dir: Path, overlay_names, predictions_file: str) -> None:
    import json

    from PIL import Image as PILImage

    from sam3_lora.visualize import draw_detections

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {r["category_id"]: f"{r['adapter']}: {r['category_name']}" for r in results}
    for index, path in enumerate(image_paths):
        mine = [r for r in results if r["image_id"] == index]
        PILImage.fromarray(draw_detections(read_image_rgb(Path(path)), mine, labels)).save(out_dir / overlay_names[index])
    (out_dir / predictions_file).write_text(json.dumps(results))
    log.info("%d images, %d detections → %s", len(image_paths), len(results), out_dir)
