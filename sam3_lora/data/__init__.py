"""Data pipeline: COCO / Roboflow exports → validated records → albumentations → sam3 `BatchedDatapoint`s.

Entry points: `CocoDataModule` (datamodule.py), `check_data` / `check_data_report` (check.py, `sam3-lora
check-data`), `write_shapes_dataset` (shapes.py, `sam3-lora make-shapes`),
`eval_image_tensor` (transforms.py, the evaluation preprocessing for `sam3-lora predict`).
"""
