"""Every config section checked before anything heavy: each bad input gives one line naming its key (or file), and a
property test over random ``--set`` overrides: the outcome is valid settings or such a line, never another exception."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.config_check import check_config_sections, check_inference_config
from tests.helpers import ROOT
from training.settings import split_settings
from training.state import TrainError
from utils.common import load_config
from utils.rules import SettingsError

ACCSAMP = ROOT / "configs" / "inference" / "stage2_accsamp.yaml"
DCP = ROOT / "configs" / "inference" / "dcp.yaml"
TRAIN2 = ROOT / "configs" / "train" / "stage2.yaml"

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    (root / "in").mkdir()
    (root / "file.png").write_bytes(b"x")
    return root


def _check(config: Path, script: str, overrides: list[str], root: Path):
    base = [f"inference.image_folder={root / 'in'}", f"inference.result_folder={root / 'out'}"]
    return check_inference_config(load_config(config, base + overrides), script)


@pytest.mark.parametrize("config, script, override, message", [
    (DCP, "inference_dcp", "dcp.pach=15", "unknown dcp.* key(s) pach (did you mean patch?)"),
    (DCP, "inference_dcp", "dcp.omega=2", "dcp.omega must be a number in (0, 1], got omega=2"),
    (ACCSAMP, "inference_accsamp", "guidance.params.scal=0.1",
     "unknown guidance.params.* key(s) scal (did you mean scale?)"),
    (ACCSAMP, "inference_accsamp", "guidance.params.repeat=0", "guidance.params.repeat must be an integer >= 1"),
    (ACCSAMP, "inference_accsamp", "inferense.tau=0.5", "unknown top-level key(s) inferense (did you mean inference?)"),
    (ACCSAMP, "inference_accsamp", "inference.tua=0.3", "unknown inference.* key(s) tua (did you mean tau?)"),
    (ACCSAMP, "inference_accsamp", "model.cldm.params.unet_cfg.params.model_chanels=3",
     "unknown model.cldm.params.unet_cfg.params.* key(s) model_chanels (did you mean model_channels?)"),
    (ACCSAMP, "inference_accsamp", "model.diffusion.target=model.nowhere.X", "model.diffusion.target: cannot import"),
    (ACCSAMP, "inference_accsamp", "model.cldm.params.text_processor=maybe",
     "model.cldm: model.cldm.params.text_processor must be true or false"),
    (ACCSAMP, "inference_accsamp", "inference.tau", "--set expects key=value with a dotted key path (e.g. inference.tau=0.7), got 'inference.tau'"),
    (ACCSAMP, "inference_accsamp", "=3", "--set expects key=value"),
])
def test_each_bad_setting_is_one_line_naming_its_key(folders, config, script, override, message):
    with pytest.raises(SettingsError) as err:
        _check(config, script, [override], folders)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_input_folder_that_is_a_file_or_missing_and_a_missing_config(folders):
    with pytest.raises(SettingsError, match="inference.image_folder is a file, not a folder of images: "):
        _check(DCP, "inference_dcp", [f"inference.image_folder={folders / 'file.png'}"], folders)
    with pytest.raises(SettingsError, match="inference.image_folder does not exist: "):
        _check(DCP, "inference_dcp", [f"inference.image_folder={folders / 'nothing'}"], folders)
    with pytest.raises(SettingsError, match="inference.result_folder is a file, not a folder: "):
        _check(DCP, "inference_dcp", [f"inference.result_folder={folders / 'file.png'}"], folders)
    with pytest.raises(FileNotFoundError, match="config file not found: "):
        load_config(folders / "absent.yaml")
    (folders / "broken.yaml").write_text("inference: [1, 2\n")
    with pytest.raises(SettingsError, match="is not valid YAML"):
        load_config(folders / "broken.yaml")


def test_shipped_configs_pass_the_door_check(folders):
    for name, script in (("stage2.yaml", "inference_stage2"), ("stage2_accsamp.yaml", "inference_accsamp"),
                         ("stage1.yaml", "inference_stage1"), ("dcp.yaml", "inference_dcp")):
        _check(ROOT / "configs" / "inference" / name, script, [], folders)
    for path in [TRAIN2, ROOT / "configs" / "train" / "stage1.yaml", *(ROOT / "configs" / "train" / "ablation").glob("*.yaml")]:
        split_settings(load_config(path))


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1", "unknown train.* key(s) lerning_rate (did you mean learning_rate?)"),
    ("trian.x=1", "unknown top-level key(s) trian (did you mean train?)"),
    ("dataset.params.crop_sise=3", "unknown dataset.params.* key(s) crop_sise (did you mean crop_size?)"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be a positive integer"),
])
def test_training_sections_are_checked_with_key_paths(override, message):
    with pytest.raises(TrainError) as err:
        split_settings(load_config(TRAIN2, [override]))
    assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- property-based test
KNOWN = ["inference.steps", "inference.tau", "inference.omega", "inference.sampler", "inference.eta",
         "inference.seed", "inference.tiled", "inference.batch_size", "inference.precision", "inference.device",
         "inference.max_pixels", "inference.vae_tile_size", "dcp.patch", "dcp.omega", "dcp.radius", "dcp.ties",
         "guidance.params.scale", "guidance.params.repeat", "guidance.params.tile_size", "guidance.params.space",
         "guidance.target", "model.cldm.params.latent_scale_factor", "model.diffusion.params.timesteps",
         "model.cldm.params.text_processor", "inference", "dcp"]
TRAIN_KNOWN = ["train.learning_rate", "train.batch_size", "train.keep_last", "train.max_nonfinite_steps",
               "train.max_bad_sample_fraction", "train.mixed_precision", "train.lr_schedule", "train.ema_decay",
               "train.cycle_weight", "train.use_dynamic_prompt", "dataset.params.crop_size", "dataset.target", "train"]
VALUES = st.one_of(st.integers(-5, 2000).map(str), st.floats(-2, 2).map(repr),
                   st.sampled_from(["true", "false", "null", "auto", "rgb", "ddim", "[1, 2]", "{a: 1}", "''", "[[0, 1e-4]]",
                                    "fp16", "topk", "1e12", "nan", "inf", "-inf", "x.y.Z"]),
                   st.text(min_size=0, max_size=6))


def _key(known: list[str]):
    typo = st.tuples(st.sampled_from(known), st.integers(0, 30)).map(lambda kv: kv[0][:kv[1]] + kv[0][kv[1] + 1:])
    return st.one_of(st.sampled_from(known), typo, st.text(min_size=0, max_size=8))


def _override(known: list[str]):
    return st.one_of(st.tuples(_key(known), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), _key(known))


def _one_line_naming_a_key(err: BaseException) -> None:
    text = str(err)
    assert text and "\n" not in text, text
    assert "." in text or "--set" in text or "key" in text, text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(_override(KNOWN), min_size=1, max_size=3))
def test_random_inference_overrides_give_settings_or_one_line(folders, overrides):
    try:
        _check(ACCSAMP, "inference_accsamp", overrides, folders)
        _check(DCP, "inference_dcp", [o for o in overrides if not o.startswith(("model", "guidance"))], folders)
    except (SettingsError, FileNotFoundError) as err:
        _one_line_naming_a_key(err)


@settings(max_examples=200, deadline=None)
@given(overrides=st.lists(_override(TRAIN_KNOWN), min_size=1, max_size=3))
def test_random_training_overrides_give_settings_or_one_line(overrides):
    try:
        split_settings(load_config(TRAIN2, overrides))
    except (SettingsError, TrainError) as err:
        _one_line_naming_a_key(err)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--set", "inference.tau"], "ERROR --set expects key=value"),
    (["--config", "nowhere.yaml"], "ERROR config file not found: nowhere.yaml"),
    (["--set", "dcp.pach=15"], "ERROR unknown dcp.* key(s) pach (did you mean patch?)"),
])
def test_script_prints_one_line_and_exits_2(args, message):
    proc = subprocess.run([sys.executable, "inference_dcp.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_app_check_needs_no_folders_but_checks_every_section():
    """app.py's check (no script, no folders): the shipped configs pass, a bad section is refused by key."""
    for name in ("dcp.yaml", "stage2_accsamp.yaml"):
        check_config_sections(load_config(ROOT / "configs" / "inference" / name, ["inference.image_folder=null"]))
    with pytest.raises(SettingsError, match=r"unknown dcp\.\* key\(s\) pach"):
        check_config_sections(load_config(DCP, ["dcp.pach=3"]))
