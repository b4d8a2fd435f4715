"""The ``inference.*`` section read once, validated at the door (pipelines.settings), and runner.start's result."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipelines.runner import DiffusionRunner, SamplingStart
from pipelines.settings import KEYS, RULES, SCRIPT_KEYS, InferenceSettings, InferenceSettingsError
from tests.helpers import ROOT, build_tiny, tiny_config, write_release_checkpoints
from utils.common import load_config

CONFIGS = {"stage1.yaml": "inference_stage1", "stage2.yaml": "inference_stage2",
           "stage2_accsamp.yaml": "inference_accsamp", "stage2_accsamp_fast.yaml": "inference_accsamp",
           "dcp.yaml": "inference_dcp", "stage2_onestep.yaml": "inference_onestep"}


def settings_of(config: str = "stage2_accsamp.yaml", *overrides: str) -> InferenceSettings:
    return InferenceSettings.from_config(load_config(ROOT / "configs" / "inference" / config, list(overrides)))


# ------------------------------------------------------------------------------------------------ keys
def test_unknown_key_is_refused_with_the_valid_keys_and_the_closest():
    with pytest.raises(InferenceSettingsError) as err:
        settings_of("stage2_accsamp.yaml", "inference.tua=0.3")
    message = str(err.value)
    assert "tua (did you mean tau?)" in message and "\n" not in message
    assert all(key in message.split("valid keys:")[1] for key in KEYS)


def test_published_configs_are_valid_and_use_only_their_scripts_keys():
    for name, script in CONFIGS.items():
        cfg = load_config(ROOT / "configs" / "inference" / name)
        InferenceSettings.from_config(cfg).check_script(script)
        assert InferenceSettings.ignored_keys(cfg, script) == [], name
    assert set().union(*SCRIPT_KEYS.values()) == set(KEYS)  # every key is read by some script
    assert {key for keys, _, _ in RULES for key in keys} == set(KEYS)  # and has a validity rule


def test_published_values_are_read_and_absent_keys_take_the_defaults():
    accsamp = settings_of("stage2_accsamp.yaml")
    assert (accsamp.steps, accsamp.tau, accsamp.omega, accsamp.seed, accsamp.prompt) == (50, 0.8, 0.6, 231,
                                                                                        "remove dense fog")
    fast = settings_of("stage2_accsamp_fast.yaml")  # its own keys over the published AccSamp config (base:)
    assert (fast.sampler, fast.steps, fast.spacing, fast.guidance_every, fast.guidance_pullback, fast.tau) == (
        "ddim", 10, "logsnr", 2, "linear", 0.8)
    dcp = settings_of("dcp.yaml")  # no diffusion keys in the file: the defaults
    assert (dcp.steps, dcp.sampler, dcp.batch_size, dcp.sd_path) == (50, "spaced", 1, None)
    assert InferenceSettings.from_config(OmegaConf.create({})) == InferenceSettings()
    as_float = settings_of("stage2_accsamp.yaml", "inference.eta=0", "inference.w=1")
    assert isinstance(as_float.eta, float) and isinstance(as_float.w, float)


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("key,value", [
    ("tau", 1.5), ("tau", 0), ("omega", 0), ("omega", 1.5), ("steps", 0), ("steps", 1), ("steps", 2.5), ("steps", 2000),
    ("sampler", "ddpm"), ("eta", -0.1), ("eta", 2), ("w", -1), ("batch_size", 0), ("num_samples", 0),
    ("seed", 1.5), ("min_short_side", 0), ("pad_multiple", 60), ("max_pixels", 0), ("tiled", "sometimes"),
    ("tile_threshold", -1), ("latent_tile_size", 0), ("latent_tile_stride", 65), ("vae_tile_size", 500),
    ("vae_tile_stride", 520), ("dynamic_prompt", "yes please"), ("compile", 1), ("device", "gpu"),
    ("precision", "fp8"), ("guidance_every", 0), ("guidance_pullback", "exact"), ("airlight_ties", "first"),
    ("max_memory_gb", 0), ("prompt", 3), ("spacing", "cosine"),
])
def test_bad_value_is_refused_naming_the_key(key, value):
    with pytest.raises(InferenceSettingsError, match=rf"^inference\.{key} must be .*got {key}="):
        InferenceSettings.from_config(OmegaConf.merge(load_config(ROOT / "configs/inference/stage2_accsamp.yaml"),
                                                      {"inference": {key: value}}))


def test_spacing_is_a_setting_of_the_few_step_solvers_only():
    for sampler in ("ddim", "dpmpp_2m"):
        for spacing in ("uniform", "logsnr", "karras"):
            assert settings_of("stage2.yaml", f"inference.sampler={sampler}", f"inference.spacing={spacing}").spacing \
                == spacing
    assert settings_of("stage2.yaml").spacing == "uniform"  # the published respacing is the default
    with pytest.raises(InferenceSettingsError, match=r"^inference\.spacing=logsnr needs a few-step solver .*ddim, "
                                                     r"dpmpp_2m.*published spaced sampler"):
        settings_of("stage2.yaml", "inference.spacing=logsnr")


def test_script_requirements_and_accsamp_phases():
    settings_of("stage2.yaml", "inference.sd_path=null").check_script("inference_dcp")  # DCP needs no weights
    with pytest.raises(InferenceSettingsError, match=r"inference\.sd_path is required by inference_stage2\.py"):
        settings_of("stage2.yaml", "inference.sd_path=null").check_script("inference_stage2")
    # tau = 0.8 with 2 steps leaves no phase-1 step ((1-0.8)*2 rounds to 0): AccSamp refuses, stage 2 ignores tau
    two_steps = settings_of("stage2_accsamp.yaml", "inference.steps=2")
    with pytest.raises(InferenceSettingsError, match="inference.tau/omega/steps: .*no phase-1 step"):
        two_steps.check_script("inference_accsamp")
    two_steps.check_script("inference_stage2")


def test_key_of_another_script_is_validated_then_ignored():
    cfg = load_config(ROOT / "configs" / "inference" / "stage2.yaml", ["inference.tau=0.5", "inference.w=1.0"])
    assert InferenceSettings.ignored_keys(cfg, "inference_stage2") == ["tau", "w"]
    with pytest.raises(InferenceSettingsError, match="inference.tau"):
        settings_of("stage2.yaml", "inference.tau=1.5")


@pytest.mark.parametrize("script,override,key", [
    ("inference_accsamp.py", "inference.tau=1.5", "inference.tau"),
    ("inference_stage2.py", "inference.sampler=ddpm", "inference.sampler"),
    ("inference_stage1.py", "inference.steps=0", "inference.steps"),
    ("inference_stage2.py", "inference.tua=0.3", "tua (did you mean tau?)"),
    ("inference_dcp.py", "inference.save_transmission=maybe", "inference.save_transmission"),
])
@pytest.mark.faults
@pytest.mark.slow
def test_script_refuses_a_bad_setting_before_looking_for_weights(tmp_path, script, override, key):
    """The real script, with weight files and an image folder that do not exist: one line naming the key, exit 2."""
    missing = tmp_path / "absent"
    proc = subprocess.run([sys.executable, script, "--set", f"inference.sd_path={missing}/sd.ckpt",
                           f"inference.controlnet_path={missing}/cn.pt", f"inference.image_folder={missing}/in",
                           f"inference.result_folder={tmp_path}/out", "inference.device=cpu", override],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR") and key in lines[0], proc.stderr
    assert str(missing) not in proc.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ one place
def _inference_reads(path: Path) -> list[str]:
    """``file:line`` of every read of the inference section outside the settings object: ``X.get("inference")``,
    ``X.inference.get(...)``, ``X.inference.key``, ``X.inference[key]``, also through a name bound to
    ``X.inference`` (``inf = cfg.inference``). Key tests (``"tau" in cfg.inference``) and ``.pop`` (editing a preset)
    are not reads."""
    tree = ast.parse(path.read_text(), str(path))

    def is_section(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "inference") or (
            isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "inference")

    aliases = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and is_section(node.value)
               for target in node.targets if isinstance(target, ast.Name)}
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Load):
            inner = node.value
            if is_section(inner) or (isinstance(inner, ast.Name) and inner.id in aliases):
                if not (isinstance(node, ast.Attribute) and node.attr == "pop"):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "inference"):
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(hits), key=lambda hit: int(hit.rsplit(":", 1)[1]))


def test_the_inference_section_is_read_only_by_the_settings_object():
    sources = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
               and p.relative_to(ROOT).parts[0] != "tests" and p != ROOT / "pipelines" / "settings.py"]
    assert len(sources) > 20 and ROOT / "pipelines" / "runner.py" in sources
    reads = [hit for path in sources for hit in _inference_reads(path)]
    assert reads == [], f"inference.* read around pipelines.settings (defaults would live twice): {reads}"


def test_the_read_finder_sees_each_form(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    code = tmp_path / "probe.py"
    code.write_text("a = cfg.inference.get('tau', 0.8)\nb = cfg.inference.steps\ninf = cfg['inference']\n"
                    "c = inf['seed']\nd = cfg.get('inference', {})\ne = 'tau' in cfg.inference\n"
                    "cfg.inference.pop('seed', None)\n")
    assert _inference_reads(code) == ["probe.py:1", "probe.py:2", "probe.py:4", "probe.py:5"]


# ------------------------------------------------------------------------------------------------ runner.start
@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    sd_path, cn_path = write_release_checkpoints(build_tiny(seed=5), tmp_path_factory.mktemp("w"))
    cfg = tiny_config("configs/inference/stage2.yaml", **{"inference.sd_path": sd_path,
                                                         "inference.controlnet_path": cn_path,
                                                         "inference.device": "cpu", "inference.min_short_side": 64})
    return DiffusionRunner(cfg, InferenceSettings.from_config(cfg))


def test_runner_start_is_a_named_batch_with_per_image_seeded_noise(runner):
    images = [torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    start = runner.start_batch(images, stage=2, seed=7)
    assert isinstance(start, SamplingStart)
    # 40x48 -> short side 64: 64x76 (torchvision truncation) -> padded to 64x128
    assert start.inputs.shape == (2, 3, 64, 128) and start.x_T.shape == (2, 4, 8, 16)
    assert [g.padded_hw for g in start.geoms] == [(64, 128)] * 2 and len(start.generators) == 2
    assert start.cond["c_img"].shape == (2, 4, 8, 16) and start.cond["c_txt"].shape[0] == 2
    alone = torch.randn((1, 4, 8, 16), generator=torch.Generator().manual_seed(7))
    assert torch.equal(start.x_T[0:1], alone) and torch.equal(start.x_T[1:2], alone)
    single = runner.start(images[1], stage=2, seed=7)
    assert single.inputs.shape == (1, 3, 64, 128) and len(single.geoms) == len(single.generators) == 1
    assert torch.equal(single.inputs[0], start.inputs[1]) and torch.equal(single.cond["c_img"][0], start.cond["c_img"][1])
    # the same condition with the noise of another seed (HazeGen's variant k)
    again = runner.reseed(start, 8)
    assert again.cond is start.cond and again.geoms is start.geoms
    assert torch.equal(again.x_T[1:2], torch.randn((1, 4, 8, 16), generator=torch.Generator().manual_seed(8)))
    # each generator continues after its x_T draw, as the sampler's per-step noise needs
    fresh = torch.Generator().manual_seed(8)
    torch.randn((1, 4, 8, 16), generator=fresh)
    assert torch.equal(torch.randn(3, generator=again.generators[0]), torch.randn(3, generator=fresh))
