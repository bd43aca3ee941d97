"""Data pipeline: COCO / Roboflow exports → validated records → albumentations → sam3 `BatchedDatapoint`s.

Entry points: `CocoDataModule` (datamodule.py), `check_data_main` (check.py, `sam3-lora check-data`),
`write_shapes_dataset` / `make_shapes_main` (shapes.py, `sam3-lora make-shapes`),
`eval_image_tensor` (transforms.py, the evaluation preprocessing for `sam3-lora predict`).
"""
