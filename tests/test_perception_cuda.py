"""The shipped perception models on CUDA: they load there by default and agree with the CPU.

Skipped where torch sees no GPU (CI never has one); run on a GPU machine with
``pytest tests/test_perception_cuda.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from agent.perception import tip_net
from agent.perception.registry import ModelCard, load_model, pick_device
from agent.perception.tasks import defects, sr

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS: dict[str, Callable[[ModelCard], nn.Module]] = {
    "tip": tip_net.build,
    "sr": sr.build,
    "defects": defects.build,
}


def _outputs(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.float().cpu()]
    assert isinstance(value, tuple | list)
    return [t for v in value for t in _outputs(v)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_loads_on_cuda_and_matches_cpu(name: str) -> None:
    assert pick_device().type == "cuda"
    gpu, card = load_model(name, MODELS[name])
    assert next(gpu.parameters()).device.type == "cuda"
    cpu, _ = load_model(name, MODELS[name], device="cpu")
    height, width = card.input_size
    # the tip card names the instrument channel; its network sees two derived from it
    channels = int(card.architecture.get("in_channels", len(card.channels)))
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    # TF32 convolutions (cuDNN's default) differ from float32 in the fourth digit; compare in
    # full float32 precision.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            expected = _outputs(cpu(x))
            got = _outputs(gpu(x.to("cuda")))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_task_entry_points_run_on_cuda() -> None:
    rng = np.random.default_rng(3)
    tip = tip_net.TipModel.load()
    assert tip.device.type == "cuda"
    topo = 1e-10 * rng.standard_normal((256, 256))
    result = tip.predict(topo, 0.05)
    assert abs(sum(result["frame"]["probabilities"].values()) - 1.0) < 1e-4

    image = rng.poisson(20.0, size=(256, 256)).astype(np.float32)
    recovered = sr.recover(image, 0.025)
    assert recovered.image.shape == image.shape
    assert np.isfinite(recovered.image).all() and np.isfinite(recovered.sigma).all()

    found = defects.find_defects(image, 0.025)
    assert found.class_map.shape == image.shape
