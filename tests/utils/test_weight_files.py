"""The weight-file door check: missing, empty, truncated, wrong-format and wrong-key-set files are each named in one
line with their size and what was expected, all at once, from the header only; the scripts exit 2 on them."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from losses.vgg import vgg_weight_file
from model.builder import controlnet_weight_file, sd_weight_file
from tests.helpers import ROOT, build_tiny, write_release_checkpoints
from utils.checkpoint import (CheckpointError, check_weight_files, load_state_dict, save_state_dict_atomic,
                              weight_file_problem)

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    sd, cn = write_release_checkpoints(build_tiny(seed=3), tmp_path_factory.mktemp("w"))
    return sd, cn


def test_good_release_files_pass(good):
    sd, cn = good
    check_weight_files([sd_weight_file("inference.sd_path", str(sd)),
                        controlnet_weight_file("inference.controlnet_path", str(cn))])


def test_each_fault_is_named_with_size_and_expectation(good, tmp_path):
    sd, cn = good
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(sd.read_bytes()[: sd.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    png = tmp_path / "image.ckpt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    tensors = {"a.weight": torch.ones(4, 4)}
    safe = tmp_path / "cut.safetensors"
    save_file(tensors, str(safe))
    safe.write_bytes(safe.read_bytes()[:-10])
    cases = {
        tmp_path / "absent.ckpt": "missing",
        empty: "empty (0 bytes)",
        truncated: f"{truncated.stat().st_size} bytes, truncated or corrupt",
        png: f"{png.stat().st_size} bytes, not a PyTorch checkpoint (zip or pickle) or a .safetensors file",
        safe: f"{safe.stat().st_size} bytes, truncated: the tensors need",
        cn: f"{cn.stat().st_size} bytes, wrong key set: ",  # a ControlNet where the SD checkpoint belongs
    }
    for path, problem in cases.items():
        found = weight_file_problem(sd_weight_file("inference.sd_path", str(path)))
        assert found is not None and found.startswith(problem), (path, found)
    assert "has ['model.diffusion_model.']" in weight_file_problem(controlnet_weight_file("k", str(sd)))
    assert "none under ['features.']" in weight_file_problem(vgg_weight_file("train.vgg_path", str(cn)))


def test_all_missing_files_are_named_in_one_line(tmp_path):
    with pytest.raises(CheckpointError) as err:
        check_weight_files([sd_weight_file("inference.sd_path", str(tmp_path / "sd.ckpt")),
                            controlnet_weight_file("inference.controlnet_path", str(tmp_path / "stage2.pt"))])
    message = str(err.value)
    assert "\n" not in message and message.startswith("2 weight file(s) not usable: ")
    assert f"inference.sd_path {tmp_path / 'sd.ckpt'}: missing; expected the SD-2.1-base checkpoint" in message
    assert f"inference.controlnet_path {tmp_path / 'stage2.pt'}: missing; expected a ControlNet" in message
    assert "weights/README.md" in message


@pytest.mark.slow
def test_script_names_every_bad_weight_file_in_one_line_exit_2(good, tmp_path):
    """inference_stage2.py with an empty SD checkpoint and a missing ControlNet: one ERROR line, exit 2."""
    empty = tmp_path / "sd.ckpt"
    empty.write_bytes(b"")
    images = tmp_path / "in"
    images.mkdir()
    proc = subprocess.run([sys.executable, "inference_stage2.py", "--set", f"inference.sd_path={empty}",
                           f"inference.controlnet_path={tmp_path}/stage2.pt", f"inference.image_folder={images}",
                           f"inference.result_folder={tmp_path}/out", "inference.device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{empty}: empty (0 bytes)" in lines[0] and f"{tmp_path}/stage2.pt: missing" in lines[0]


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_one_loadable(tmp_path, monkeypatch):
    path = tmp_path / "0000002.pt"
    save_state_dict_atomic({"w": torch.ones(3)}, path)

    def full(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        save_state_dict_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_state_dict(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["0000002.pt"]
    assert "wrong key set" in weight_file_problem(controlnet_weight_file("k", str(path)))  # complete, readable
