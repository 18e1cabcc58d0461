"""Model selection: `advance` against Keras' own ReduceLROnPlateau and EarlyStopping, and the
backup round trip (weights, optimizer, dropout generators, state)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from dualenc.training.selection import Schedule, SelectionState, advance, commit_backup, restore_backup


def _keras_reference(values, mode, lr_patience, stop_patience, factor=0.2, learning_rate=1.0):
    """(learning rate of each epoch run, epochs run) under Keras' callbacks, as the old training used them."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate))
    callbacks = [
        keras.callbacks.ReduceLROnPlateau(monitor="score", mode=mode, factor=factor, patience=lr_patience, min_delta=0.0),
        keras.callbacks.EarlyStopping(monitor="score", mode=mode, patience=stop_patience),
    ]
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    rates = []
    for epoch, value in enumerate(values):
        rates.append(float(model.optimizer.learning_rate))
        for callback in callbacks:
            callback.on_epoch_end(epoch, {"score": value})
        if model.stop_training:
            break
    return rates


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("seed", range(6))
def test_advance_cuts_the_rate_and_stops_as_keras_callbacks_do(mode, seed):
    rng = np.random.default_rng(seed)
    # Plateaus and repeats, so that ties and waits both happen; one NaN.
    values = np.round(rng.normal(size=30).cumsum() * 0.3, 1)
    values[rng.integers(30)] = np.nan
    schedule = Schedule(monitor="score", mode=mode, lr_patience=2, stop_patience=4)
    state = SelectionState(learning_rate=1.0)
    for value in values:
        state, _ = advance(state, {"score": float(value)}, schedule)
        if state.stopped:
            break
    expected = _keras_reference(values, mode, 2, 4)
    np.testing.assert_allclose(state.learning_rates, expected, rtol=1e-6)
    finite = [logs["score"] for logs in state.history]
    best = (np.nanargmin if mode == "min" else np.nanargmax)(finite)
    assert state.best_epoch == int(best) and state.best_value == finite[best]


def test_a_halted_epoch_stops_and_nan_never_becomes_the_best():
    schedule = Schedule.following("val_loss")
    state, improved = advance(SelectionState(1e-3), {"val_loss": float("nan")}, schedule, halted=True)
    assert state.stopped and not improved and state.best_epoch is None
    assert Schedule.following("val_t2i_r1").mode == "max"


def test_a_committed_backup_restores_weights_optimizer_generators_and_state(tmp_path):
    def make():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    keras.utils.set_random_seed(1)
    trained = make()
    trained.fit(np.ones((8, 3)), np.zeros((8, 1)), epochs=2, verbose=0)
    state = SelectionState(0.002, history=({"val_loss": 1.0, "learning_rate": 0.01},), best_epoch=0, best_value=1.0)
    commit_backup(tmp_path, trained, SelectionState(0.01))
    commit_backup(tmp_path, trained, state)
    assert [path.name for path in tmp_path.iterdir()] == ["epoch-0001"]

    fresh = make()
    assert restore_backup(tmp_path, fresh) == state
    for want, got in zip(trained.variables, fresh.variables):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=want.path)
    for want, got in zip(trained.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=want.path)
    assert restore_backup(tmp_path / "absent", fresh) is None
