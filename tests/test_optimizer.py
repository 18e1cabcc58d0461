"""The run's optimiser: warm-up and cosine factors, AdamW with a rate per part, against NumPy."""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import pytest

from dualenc.core.config import TrainConfig
from dualenc.training.optimizer import PartwiseAdamW, StepSchedule


def reference_factor(step: int, kind: str, warmup: int, total: int, start: float) -> float:
    if step < warmup:
        return start + (1 - start) * step / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("kind, warmup, total, start", [("cosine", 7, 40, 0.1), ("cosine", 0, 25, 0.5),
                                                        ("constant", 5, 30, 0.0), ("constant", 0, 10, 1.0)])
def test_schedule_factor_matches_numpy(kind, warmup, total, start):
    schedule = StepSchedule(kind, warmup, total, start)
    for step in range(total + 3):
        assert float(schedule.factor(step)) == pytest.approx(reference_factor(step, kind, warmup, total, start), abs=1e-6)


def test_cosine_reaches_zero_at_the_last_step_and_warmup_covers_short_runs():
    config = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1.5, warmup_from=0.2)
    schedule = StepSchedule.for_run(config, steps_per_epoch=10)
    assert (schedule.warmup_steps, schedule.total_steps) == (15, 40)
    assert float(schedule.factor(0)) == pytest.approx(0.2)
    assert float(schedule.factor(15)) == pytest.approx(1.0)
    assert float(schedule.factor(40)) == pytest.approx(0.0, abs=1e-7)
    # A preset's 5 warm-up epochs in a 2-epoch smoke run: the warm-up is the whole run.
    short = StepSchedule.for_run(dataclasses.replace(config, epochs=2, warmup_epochs=5), steps_per_epoch=10)
    assert short.warmup_steps == short.total_steps == 20


def test_partwise_adamw_matches_a_numpy_adamw_with_per_part_rates():
    rng = np.random.default_rng(3)
    shapes = {"tower_kernel": (3, 4), "tower_bias": (4,), "head_kernel": (4, 2), "temperature": ()}
    initial = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    variables = {name: keras.Variable(value.astype("float32"), name=name) for name, value in initial.items()}
    base, decay, multiplier = 0.01, 0.1, 4.0
    optimizer = PartwiseAdamW(base, decay, tower_variables=[variables["tower_kernel"], variables["tower_bias"]],
                              head_lr_multiplier=multiplier)
    schedule = StepSchedule("cosine", warmup_steps=2, total_steps=6, warmup_from=0.25)
    optimizer.step_schedule = schedule
    steps = 6
    gradients = [{name: rng.normal(size=shape) for name, shape in shapes.items()} for _ in range(steps)]
    for step_gradients in gradients:
        optimizer.apply_gradients([(step_gradients[name].astype("float32"), variables[name]) for name in shapes])

    beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7
    for name in shapes:
        weights, m, v = initial[name].copy(), 0.0, 0.0
        rate_multiplier = 1.0 if name.startswith("tower") else multiplier
        for step in range(steps):
            rate = base * reference_factor(step, "cosine", 2, 6, 0.25) * rate_multiplier
            if len(shapes[name]) >= 2:  # no decay on biases and scalars
                weights = weights - weights * decay * rate
            gradient = gradients[step][name]
            m = beta_1 * m + (1 - beta_1) * gradient
            v = beta_2 * v + (1 - beta_2) * gradient**2
            alpha = rate * math.sqrt(1 - beta_2 ** (step + 1)) / (1 - beta_1 ** (step + 1))
            weights = weights - alpha * m / (np.sqrt(v) + epsilon)
        np.testing.assert_allclose(np.asarray(variables[name]), weights, rtol=2e-5, atol=2e-6, err_msg=name)


def test_an_unfrozen_pretrained_tower_moves_less_than_its_heads_in_one_step():
    from dualenc.models.model import TOKENS
    from dualenc.models.towers.vision import BACKBONE_LAYER_NAME
    from dualenc.training.loop import build_model
    from dualenc.training.presets import preset

    config = preset("demo")
    config = dataclasses.replace(
        config,
        head_lr_multiplier=5.0,
        model=dataclasses.replace(
            config.model,
            vision=dataclasses.replace(config.model.vision, trainable=False),
            text=dataclasses.replace(config.model.text, vocab_size=50, embedding_dim=8, lstm_units=8, max_tokens=12),
            projection_dim=16,
            dropout=0.0,
        ),
    )
    model = build_model(config)
    # Frozen when built (as a pretrained tower starts), unfrozen before the first step.
    model.vision_tower.get_layer(BACKBONE_LAYER_NAME).trainable = True
    before = {id(variable): np.array(variable) for variable in model.trainable_variables}
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, size=(8, *config.model.vision.image_size, 3), dtype=np.uint8),
        TOKENS: rng.integers(1, 50, size=(8, 12)).astype("int32"),
        "label": np.arange(8),
    }
    model.train_on_batch(batch)

    def median_step(variables) -> float:
        return float(np.median(np.concatenate([np.abs(np.array(v) - before[id(v)]).ravel() for v in variables])))

    tower = median_step(model.vision_tower.trainable_variables)
    heads = median_step(model.image_head.trainable_variables)
    rate = config.learning_rate * float(StepSchedule().factor(0))
    # Adam's first step moves each weight by about its rate (the gradient's sign, scaled).
    assert tower == pytest.approx(rate, rel=0.1)
    assert heads == pytest.approx(5 * rate, rel=0.1)


def test_recipe_flags_override_the_preset_and_bad_values_get_one_line():
    import train
    from dualenc.core.errors import DualEncError

    config = train.build_config(train.parse_args(
        ["--preset", "cuhk-pedes-clip", "--vision-preset", "dir", "--text-preset", "dir", "--schedule", "constant",
         "--warmup-epochs", "0.5", "--warmup-from", "0", "--head-lr-multiplier", "2", "--no-flip", "--erase", "0.25"]))
    assert (config.schedule, config.warmup_epochs, config.warmup_from, config.head_lr_multiplier) == ("constant", 0.5, 0.0, 2.0)
    # Flags change only what they name: the preset's pad-and-crop stays.
    assert (config.augment.flip, config.augment.translate, config.augment.erase) == (False, 0.045, 0.25)
    demo = train.build_config(train.parse_args(["--flip", "--translate", "0.1", "--token-dropout", "0.2"]))
    assert (demo.augment.flip, demo.augment.translate, demo.augment.token_dropout) == (True, 0.1, 0.2)
    for flags, field in ((["--erase", "1.5"], "erase"), (["--warmup-epochs", "-1"], "warmup_epochs"),
                         (["--warmup-epochs", "inf"], "warmup_epochs"),
                         (["--head-lr-multiplier", "0"], "head_lr_multiplier"), (["--warmup-from", "2"], "warmup_from"),
                         (["--text", "bert", "--token-dropout", "0.1"], "--token-dropout")):
        with pytest.raises(DualEncError, match=field) as raised:
            train.build_config(train.parse_args(flags))
        assert "\n" not in str(raised.value)
