"""Every config group composes, and typos or wrong types fail at compose time."""

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from sketchsweep.config import PROJECT_ROOT, MLflowConfig, register_configs
from tests.conftest import compose_config, train_cli

GROUPS = {
    group: sorted(p.stem for p in (PROJECT_ROOT / "conf" / group).glob("*.yaml"))
    for group in ("data", "model", "optimizer", "scheduler", "experiment")
}


def test_groups_have_the_designed_options():
    assert GROUPS["data"] == ["quickdraw", "synthetic"]
    assert GROUPS["model"] == ["sketchcnn"]
    assert GROUPS["optimizer"] == ["adam", "adamw", "sgd"]
    assert GROUPS["scheduler"] == ["cosine", "none", "onecycle", "steplr"]
    assert "quickstart" in GROUPS["experiment"]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_resolves(group, option):
    extra = ["data.root=/somewhere"] if (group, option) == ("data", "quickdraw") else []
    cfg = compose_config([f"{group}={option}", *extra])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_defaults_are_the_seed_recipe():
    cfg = compose_config([])
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-3, 1e-4)
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert (cfg.scheduler.step_size, cfg.scheduler.gamma) == (10, 0.5)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.data.val_fraction) == (20, 256, 0.1)
    assert cfg.model.width == 64 and cfg.trainer.device.value == "auto"
    # The model-quality knobs are off.
    assert (cfg.trainer.label_smoothing, cfg.trainer.ema_decay) == (0.0, 0.0)
    assert (cfg.data.mix.mixup_alpha, cfg.data.mix.cutmix_alpha, cfg.data.augment.enabled) == (0.0, 0.0, False)
    # What a run ships: evaluation and the ONNX model; the pt2 model (0.9 s, 1.5 MB a run) is opt-in.
    assert (cfg.mlflow.log_evaluation, cfg.mlflow.log_onnx, cfg.mlflow.log_model) == (True, True, False)
    assert (cfg.mlflow.register, cfg.sweep.deliverables.value) == (False, "best")


def test_cosine_follows_the_epoch_count():
    cfg = compose_config(["scheduler=cosine", "trainer.epochs=7"])
    assert OmegaConf.to_container(cfg, resolve=True)["scheduler"]["T_max"] == 7


@pytest.mark.parametrize(
    "override",
    ["model.widht=128", "model.width=abc", "optimizer.lr=fast", "trainer.device=tpu", "optimizer=rmsprop"],
)
def test_bad_overrides_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_sgd_has_no_betas():
    with pytest.raises(ConfigCompositionException):
        compose_config(["optimizer=sgd", "optimizer.betas=[0.9,0.99]"])


def test_cli_typo_fails_before_anything_is_created(tmp_path):
    store = tmp_path / "mlruns" / "mlflow.db"
    proc = train_cli(["model.widht=128", f"mlflow.tracking_uri=sqlite:///{store}"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "widht" in proc.stderr
    assert not store.exists()
    assert not (tmp_path / "outputs").exists()


def leaves(node, prefix: str = "") -> dict:
    return {
        f"{prefix}{k}": v
        for k, v in node.items()
        for k, v in (leaves(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(k, v)])
    }


@pytest.mark.parametrize(
    "path",
    sorted(
        p
        for g in ("data", "model", "optimizer", "scheduler", "tracking")
        for p in (PROJECT_ROOT / "conf" / g).glob("*.yaml")
    ),
)
def test_group_options_state_only_what_differs_from_their_schema(path):
    """Defaults are stated once, in the dataclasses: an option's YAML keeps a value only where it
    differs from its schema (presets under experiment/ and hparams_search/ state their choices)."""
    register_configs()
    raw = OmegaConf.to_container(OmegaConf.load(path))
    [schema_name] = [d for d in raw.pop("defaults", ["/schema/tracking/mlflow@_here_"]) if "schema" in d]
    if path.parent.name == "tracking":  # @package _global_: mlflow.* keys against MLflowConfig
        schema = {"mlflow": OmegaConf.to_container(OmegaConf.structured(MLflowConfig))}
    else:
        group, name = schema_name.split("@")[0].strip("/").split("/")[1:]
        node = ConfigStore.instance().load(f"schema/{group}/{name}.yaml").node
        schema = OmegaConf.to_container(node)
    defaults = leaves(schema)
    repeated = {k: v for k, v in leaves(raw).items() if k in defaults and defaults[k] == v}
    assert not repeated, f"{path.name} repeats schema defaults: {repeated}"
    assert set(leaves(raw)) <= set(defaults), f"{path.name}: keys the schema does not have"
