"""The model-source plugin in examples/: found through its entry point, builds a working model.

CI installs only bitplan with its `dev` and `bench` extras, not the example, so each test makes the
example look installed: its folder on sys.path plus a dist-info whose entry points are read from
the example's own pyproject.toml, so a broken declaration there fails here too.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import allocator.zoo as zoo
from allocator.data.evaluate import EvalSet, evaluate
from allocator.data.readers import load_dataset
from allocator.errors import UnknownModel

pytest.importorskip(
    "efficientnet_lite_pytorch",
    reason="the example needs the `bench` extra: pip install -e '.[bench]'",
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "bitplan-efficientnet-lite"
IMAGENET_SAMPLE = (
    Path(os.environ.get("BITPLAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
    / "imagenet-sample"
    / "dev500_224.npz"
)
FIRST_50_TOP1 = 84.0
"""FP32 top-1 of effnetlite:lite1 on the first 50 images of dev500_224.npz, measured once."""


@pytest.fixture
def example_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example importable and registered as if pip-installed; registry and modules restored."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist_info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entry_points = project["entry-points"][zoo.ENTRY_POINT_GROUP]
    (dist_info / "entry_points.txt").write_text(
        f"[{zoo.ENTRY_POINT_GROUP}]\n"
        + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    monkeypatch.setattr(zoo, "_SOURCES", dict(zoo._SOURCES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("bitplan_efficientnet_lite"):
            del sys.modules[name]


@pytest.mark.usefixtures("example_installed")
def test_effnetlite_lite1_builds_with_its_packaged_weights_and_native_preprocessing() -> None:
    model = zoo.load_model("effnetlite:lite1")
    assert model.ref == "effnetlite:lite1"
    assert (model.task, model.image_size, model.num_classes) == ("classification", 240, 1000)
    # (x - 127) / 128 on 0..255, as the original TFLite model is fed.
    pixels = model.prepare_images(np.array([[[[0, 127, 255]]]], dtype=np.uint8))
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([-127 / 128, 0.0, 1.0], abs=1e-6)
    groups = [m.groups for m in model.module.modules() if getattr(m, "groups", 1) > 1]
    assert groups, "EfficientNet-Lite is the depthwise model of the benchmarks"


@pytest.mark.usefixtures("example_installed")
def test_unknown_effnetlite_name_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(UnknownModel) as refused:
        zoo.load_model("effnetlite:lite9")
    message = str(refused.value)
    assert "\n" not in message
    assert "effnetlite:lite9" in message and "effnetlite:lite1" in message


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(
    not IMAGENET_SAMPLE.is_file(),
    reason=f"{IMAGENET_SAMPLE} not found; set BITPLAN_SHARED_DATA to the shared data folder",
)
@pytest.mark.usefixtures("example_installed")
def test_effnetlite_lite1_fp32_top1_on_the_first_50_imagenet_images() -> None:
    model = zoo.load_model("effnetlite:lite1")
    evalset = EvalSet(load_dataset(str(IMAGENET_SAMPLE)), model, limit=50)
    top1 = evaluate(model, evalset)["top1"]
    # One image is 2 points: allow one to flip on another machine's float arithmetic.
    assert abs(top1 - FIRST_50_TOP1) <= 2.0
