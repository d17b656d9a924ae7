"""The registries and Config's fields say each fact once: the datasets (DatasetSpec),
the built-in models (ModelSpec) and every setting of `gpucnn train` (its option,
help, choices, check and whether it defines a run)."""
import argparse
import dataclasses

import numpy
import pytest

from gpucnn.app import cli, config, data, models, train


def _subparsers():
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_setting_is_a_train_option_with_help():
    options = {a.dest: a for a in _subparsers()["train"]._actions if a.dest != "help"}
    assert list(options) == [f.name for f in config.FIELDS]
    for f in config.FIELDS:
        assert options[f.name].help == f.metadata["help"]
    assert options["resume"].metavar == "CHECKPOINT" and options["warmup"].metavar == "STEPS"
    assert options["model"].choices == tuple(models.MODELS)
    assert options["dataset"].choices == tuple(data.DATASETS)


def test_every_option_of_every_command_has_help():
    for name, sub in _subparsers().items():
        bare = [a.dest for a in sub._actions if not a.help]
        assert not bare, f"gpucnn {name}: {bare} have no help"


def test_the_command_line_gives_the_config():
    args = cli._parser().parse_args(["train"])
    assert cli.training.Config(**{f.name: getattr(args, f.name) for f in config.FIELDS}) == \
        train.Config()
    args = cli._parser().parse_args(
        ["train", "--dataset", "mnist", "--batch-size", "16", "--lr", "0.5", "--nesterov",
         "--no-cuda-graph", "--no-progress", "--overwrite", "--limit", "7",
         "--label-smoothing", "0.1", "--resume", "r/checkpoint.npz"])
    got = {f.name: getattr(args, f.name) for f in config.FIELDS}
    assert got == dict(dataclasses.asdict(train.Config()), dataset="mnist", batch_size=16,
                       lr=0.5, nesterov=True, cuda_graph=False, progress=False, overwrite=True,
                       limit=7, label_smoothing=0.1, resume="r/checkpoint.npz")


def test_run_keys_are_the_run_defining_fields():
    assert set(config.RUN_KEYS) == {
        "dataset", "model", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "seed",
        "limit", "nesterov", "schedule", "augment", "label_smoothing", "warmup", "val_split",
        "channels", "image_size", "sync_bn"}
    for f in config.FIELDS:  # "not given" must be tellable from any value given
        if f.metadata["run"]:
            assert f.default is None, f.name


def test_precedence_user_then_recipe_then_dataset_then_fallback():
    c = train.Config(dataset="fashion-mnist", model="resnet", batch_size=32).filled()
    recipe = models.MODELS["resnet"].recipe
    assert c.batch_size == 32 and c.epochs == recipe["epochs"] and c.optimizer == "sgd"
    c = train.Config(dataset="mnist").filled()
    assert (c.model, c.epochs, c.lr) == tuple(data.DATASETS["mnist"].defaults[k]
                                              for k in ("model", "epochs", "lr"))
    assert (c.momentum, c.seed, c.warmup, c.schedule) == (0.9, 0, 0, "none")


@pytest.mark.parametrize("field, value, needle", [
    ("epochs", True, "epochs must be a positive int, got True"),
    ("limit", 0, "limit must be a positive number of samples, got 0"),
    ("warmup", -1, "warmup must be a number of steps >= 0, got -1"),
    ("label_smoothing", 1.5, "label_smoothing must be in [0, 1], got 1.5"),
    ("momentum", 1, "momentum must be in [0, 1), got 1 (SGD diverges from 1 on)"),
    ("lr", float("inf"), "lr must be a positive number, got inf"),
    ("optimizer", "rmsprop", "optimizer must be one of ('sgd', 'adam'), got 'rmsprop'"),
    ("model", "vgg", "model must be one of ('digits', 'lenet', 'resnet'), got 'vgg'"),
    ("dataset", "imagenet", "dataset must be one of ('digits', 'fashion-mnist', 'mnist', "
     "'cifar10', 'cifar100', 'folder')"),
])
def test_bad_settings_name_the_setting_the_value_and_the_need(field, value, needle):
    with pytest.raises(ValueError) as caught:
        train.Config(**{field: value}).filled()
    assert needle in str(caught.value)


def test_the_dataset_registry_matches_the_data():
    ds = data.load("digits")
    spec = data.DATASETS["digits"]
    assert ds.image_shape == spec.input_shape and ds.classes == spec.classes
    for name, spec in data.DATASETS.items():
        assert spec.name == name and spec.help
        assert spec.num_classes == {"cifar100": 100, "folder": 0}.get(name, 10)  # folder: by data
        assert spec.defaults["model"] in models.MODELS
        assert set(spec.defaults) == {"model", "epochs", "batch_size", "optimizer", "lr"}
    assert [n for n, s in data.DATASETS.items() if not s.flip] == ["digits", "mnist"]


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_each_model_builds_for_its_input_shape(name):
    spec = models.MODELS[name]
    net = spec.build(num_classes=7, in_channels=spec.input_shape[0])
    assert net(numpy.zeros((2, *spec.input_shape), numpy.float32)).shape == (2, 7)
    assert set(spec.recipe) <= {f.name for f in config.FIELDS}


def test_the_train_description_states_the_registries_defaults():
    text = " ".join(cli.TRAIN_DESCRIPTION.split())
    for name, spec in data.DATASETS.items():
        d = spec.defaults
        assert name in text and f"{d['epochs']} epochs, batch {d['batch_size']}, " \
            f"{d['optimizer']} lr {d['lr']:.0e}".replace("e-0", "e-") in text, name
    recipe = models.MODELS["resnet"].recipe
    assert f"{recipe['epochs']} epochs, batch {recipe['batch_size']}, SGD momentum " \
        f"{recipe['momentum']} Nesterov, lr {recipe['lr']} cosine" in text
