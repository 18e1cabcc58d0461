"""Pack image-caption datasets (MS-COCO, CUHK-PEDES, folders, the synthetic demo) into sharded TFRecords."""
