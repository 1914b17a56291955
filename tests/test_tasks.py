import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from autolr import Task, TaskError
from autolr.tasks import BUILTIN, build_task, resolve
from autolr.tasks.cifar10 import FOLDER, TEST_FILE, TRAIN_FILES, resnet


def write_fake_cifar10(root, per_batch: int = 4) -> None:
    """A few random images in torchvision's python-pickle CIFAR-10 layout."""
    rng = np.random.default_rng(0)
    folder = root / FOLDER
    folder.mkdir(parents=True)
    for name in (*TRAIN_FILES, TEST_FILE):
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)


def first_batch(task: Task, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(DataLoader(task.train_set, batch_size=size)))


@pytest.mark.parametrize(
    ("name", "params", "input_shape", "optimizer"),
    [
        ("mnist1d", {"num_samples": 200}, (1, 40), "sgd"),
        ("mnist1d_mlp", {"num_samples": 200}, (1, 40), "adamw"),
        ("digits", {}, (1, 8, 8), "adamw"),
    ],
)
def test_builtin_task_builds_a_model_that_runs_on_its_own_data(
    name, params, input_shape, optimizer
):
    task = build_task(resolve(name), **params)
    assert task.name == name and task.optimizer == optimizer and task.epochs >= 1
    x, y = first_batch(task)
    assert x.shape == (4, *input_shape) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= y.min() and y.max() < 10
    torch.manual_seed(0)
    outputs = task.model_fn()(x)
    assert outputs.shape == (4, 10)
    assert torch.isfinite(task.loss_fn(outputs, y))


def test_mnist1d_keeps_the_papers_1000_test_examples_and_validates_on_a_fifth_of_its_4000():
    task = build_task(resolve("mnist1d"))
    assert (len(task.train_set), len(task.val_set), len(task.test_set)) == (3200, 800, 1000)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in task.model_fn().modules())


def rows(dataset) -> set[bytes]:
    """Each example's input, as bytes: equal inputs are the same example."""
    return {dataset[i][0].numpy().tobytes() for i in range(len(dataset))}


@pytest.mark.parametrize(
    ("name", "params", "total"),
    [
        ("mnist1d", {"num_samples": 500}, 500),
        ("mnist1d_mlp", {"num_samples": 500}, 500),
        ("digits", {}, 1797),
        ("cifar10", {"depth": 8}, 6 * 20),  # the fake folder below: 5 train batches + test
    ],
)
def test_builtin_tasks_split_train_validation_and_test_apart(name, params, total, tmp_path):
    # The search and selection read the validation split; the test split is
    # scored once, by the final model: no example may sit in two of them.
    if name == "cifar10":
        write_fake_cifar10(tmp_path, per_batch=20)
        params = {**params, "root": str(tmp_path), "augment": False}
    task = build_task(resolve(name), **params)
    train, val, test = (rows(d) for d in (task.train_set, task.val_set, task.test_set))
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert len(train) + len(val) + len(test) == total
    assert min(len(val), len(test)) >= 0.08 * total  # neither is a token split


def test_splits_are_seeded_and_hold_every_class_in_proportion():
    task = build_task(resolve("digits"))
    for split in (task.val_set, task.test_set):
        assert torch.bincount(split.tensors[1]).min() >= 28  # ~36 per class of 1797 / 10 / 5
    again = build_task(resolve("digits"), split_seed=0)
    other = build_task(resolve("digits"), split_seed=1)
    assert torch.equal(task.test_set.tensors[0], again.test_set.tensors[0])
    assert not torch.equal(task.test_set.tensors[0], other.test_set.tensors[0])
    with pytest.raises(
        TaskError, match="val_fraction must be in \\(0, 1\\), but got val_fraction=1"
    ):
        build_task(resolve("mnist1d"), num_samples=200, val_fraction=1)


def test_mnist1d_generation_leaves_numpys_global_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    build_task(resolve("mnist1d"), num_samples=300, data_seed=7)
    assert np.random.rand() == expected


def test_the_mlp_task_has_no_batchnorm():
    task = build_task(resolve("mnist1d_mlp"), num_samples=200)
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in task.model_fn().modules()
    )


def test_digits_holds_out_a_fifth_for_test_and_a_fifth_of_the_rest_for_validation():
    task = build_task(resolve("digits"))
    assert (len(task.train_set), len(task.val_set), len(task.test_set)) == (1151, 287, 359)


def test_cifar10_reads_a_local_folder_in_torchvision_layout(tmp_path):
    write_fake_cifar10(tmp_path)
    torch.manual_seed(0)
    task = build_task(resolve("cifar10"), root=str(tmp_path), depth=8, val_fraction=0.3)
    assert (len(task.train_set), len(task.val_set), len(task.test_set)) == (13, 7, 4)
    x, y = first_batch(task)
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)
    assert task.model_fn()(x).shape == (4, 10)
    # Validation and test images are not augmented: normalised pixels, same every time.
    for split in (task.val_set, task.test_set):
        v1, v2 = split[0][0], split[0][0]
        assert torch.equal(v1, v2) and v1.abs().max() < 3.0


def test_cifar10_training_images_are_randomly_cropped_and_flipped(tmp_path):
    write_fake_cifar10(tmp_path)
    task = build_task(resolve("cifar10"), root=str(tmp_path), depth=8, val_fraction=0.3)
    torch.manual_seed(0)
    views = torch.stack([task.train_set[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32)
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) > 1


def test_cifar10_without_the_data_says_where_to_put_it(tmp_path):
    with pytest.raises(TaskError) as info:
        build_task(resolve("cifar10"), root=str(tmp_path / "nowhere"))
    message = str(info.value)
    assert str(tmp_path / "nowhere" / FOLDER) in message
    assert "data_batch_1" in message and "test_batch" in message and "never downloads" in message


def test_resnet56_has_27_blocks_of_16_32_64_channels():
    model = resnet(56)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 1 + 54  # stem + 2 per block
    assert {c.out_channels for c in convs} == {16, 32, 64}
    with pytest.raises(TaskError, match="6n \\+ 2"):
        resnet(55)


def test_resolve_passes_references_through_and_lists_builtins_for_unknown_names():
    assert resolve("my_pkg.tasks:build") == "my_pkg.tasks:build"
    assert set(BUILTIN) >= {"mnist1d", "digits", "cifar10", "mnist1d_mlp"}
    with pytest.raises(TaskError, match="mnist1d, digits, mnist1d_mlp, cifar10"):
        resolve("imagenet")


def test_builder_params_are_checked_with_a_message():
    with pytest.raises(TaskError, match="channels must be an int >= 1"):
        build_task(resolve("mnist1d"), num_samples=200, channels=0)
    with pytest.raises(TaskError, match="rejected params"):
        build_task(resolve("digits"), colour=True)


def _mae(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs[:, 0] - targets).abs().mean().item()


def test_metric_direction_is_derived_for_builtin_names_and_required_for_a_callable():
    data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8))

    def task(**kwargs) -> Task:
        return Task(lambda: torch.nn.Linear(2, 1), data, data, **kwargs)

    assert (task().mode, task().higher_is_better) == ("max", True)
    assert (task(metric="loss").mode, task(metric="loss").higher_is_better) == ("min", False)
    # A callable was once always maximised: an MAE search kept its worst trial.
    assert not task(metric=_mae, mode="min").higher_is_better
    assert task(metric=_mae, mode="max").higher_is_better
    with pytest.raises(TaskError, match=r"metric \(_mae\) needs mode='max'.*got mode=None"):
        task(metric=_mae)
    with pytest.raises(TaskError, match="mode must be 'max' or 'min'.*got 'lower'"):
        task(metric=_mae, mode="lower")
    with pytest.raises(TaskError, match="'accuracy' is maximised; expected mode='max'"):
        task(metric="accuracy", mode="min")


class RunsCode:
    def __reduce__(self):
        return exec, ("open('code-ran', 'w').close()",)


def test_a_planted_cifar10_batch_is_refused_without_running_its_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default root: ./data
    write_fake_cifar10(tmp_path / "data")
    batch = tmp_path / "data" / FOLDER / TRAIN_FILES[0]
    batch.write_bytes(pickle.dumps({b"data": RunsCode(), b"labels": []}))
    with pytest.raises(TaskError, match="builtins.exec is not part of a CIFAR-10 batch"):
        build_task(resolve("cifar10"), depth=8)
    assert not (tmp_path / "code-ran").exists()
