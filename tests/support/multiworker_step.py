"""One training step of a stand-in dual encoder on a fixed global batch, in this process or as one worker.

    python tests/support/multiworker_step.py OUT.json

With `TF_CONFIG` (started by `python -m dualenc.launch`) it runs under placement "multi-worker", each
worker taking its slice of the batch by data sharding; without, in one process. Writes
(chief or single process only) the step's loss, the embeddings before the step and every
weight after it, so the test compares the two runs and a NumPy reference; each worker also
writes which of two files it reads when sharding by file.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dualenc.distribute.placement import make_placement  # noqa: E402  (after the path)
from dualenc.models.placement import Placement  # noqa: E402
from dualenc.distribute.cluster import cluster_from_environment  # noqa: E402

GLOBAL_BATCH = 8


def files_seen(placement: Placement, directory: Path) -> list[int]:
    """Which of two TFRecord files this worker reads when the input is sharded by file.

    Each worker writes its own copy of the files (same names, so the same order); record
    contents name their file.
    """
    import tensorflow as tf

    from dualenc.distribute.multiworker import SHARD_BY_FILE, shard_inputs

    folder = directory / f"records-{placement.cluster.rank}"
    folder.mkdir(exist_ok=True)
    paths = [str(folder / f"part-{index}.tfrecord") for index in range(2)]
    for index, path in enumerate(paths):
        with tf.io.TFRecordWriter(path) as writer:
            for _ in range(4):
                writer.write(str(index).encode())
    records = tf.data.Dataset.from_tensor_slices(paths).interleave(tf.data.TFRecordDataset)
    batches = records.map(lambda record: tf.strings.to_number(record, tf.int32)).batch(2)
    distributed = placement.strategy.experimental_distribute_dataset(shard_inputs(batches, SHARD_BY_FILE))
    strategy = placement.strategy
    return sorted({int(value) for batch in distributed for value in strategy.experimental_local_results(batch)[0].numpy()})


def main(out: str) -> None:
    # The strategy first: no TensorFlow op may run before MultiWorkerMirroredStrategy exists.
    placement = make_placement("multi-worker") if cluster_from_environment() else Placement()
    import keras
    import numpy as np
    import tensorflow as tf

    from dualenc.core.config import ModelConfig
    from dualenc.models.model import DualEncoder
    from dualenc.distribute.multiworker import SHARD_BY_DATA, shard_inputs
    from tests.support.stand_ins import matching_batch, stand_in_towers

    labels = np.arange(GLOBAL_BATCH)
    batch = matching_batch(labels)
    config = ModelConfig(projection_dim=8, dropout=0.0, loss="clip", learn_temperature=True)
    with placement.scope():
        model = DualEncoder(config, *stand_in_towers(seed=3), placement=placement)
        model(batch)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    captions, images = model(batch, training=False)
    data = tf.data.Dataset.from_tensor_slices(batch).batch(GLOBAL_BATCH)
    if placement.cluster is not None:
        data = shard_inputs(data, SHARD_BY_DATA)
    loss = model.fit(data, verbose=0, shuffle=False).history["loss"][0]
    if placement.cluster is not None:
        Path(f"{out}.files-seen-by-{placement.cluster.rank}").write_text(json.dumps(files_seen(placement, Path(out).parent)))
    if placement.cluster is None or placement.cluster.is_chief:
        Path(out).write_text(json.dumps({
            "loss": loss,
            "replicas": placement.num_replicas,
            "temperature": float(config.temperature),
            "caption_embeddings": np.asarray(captions).tolist(),
            "image_embeddings": np.asarray(images).tolist(),
            "weights": [np.asarray(weight).ravel().tolist() for weight in model.get_weights()],
        }))


if __name__ == "__main__":
    main(sys.argv[1])
