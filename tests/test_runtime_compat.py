"""The guard under what users do to a pipeline for speed (issue #15): ``torch.compile`` on the
denoiser, model CPU offload, ``pipe.to(dtype)`` after ``wrap``. Each guarded run must decide and
draw as the plain guarded run, on the Shapes backbone with the demo policy (a red circle is
redirected, a blue square is not)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from saferedir_shapes.pipeline import load_shapes_pipeline
from torch._dynamo.utils import counters

from saferedir_sdk import SafeRedirGuard

PROMPTS = ["a red circle", "a blue square"]
STEPS = 15  # few enough to be quick, enough for every rule of shapes:demo to decide (its policy says)


def run(pipe, guard):
    out = pipe(
        PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="np"
    )
    return np.asarray(out.images, dtype=np.float32), [s.action for s in guard.last_report.samples]


@pytest.fixture(scope="module")
def reference():
    pipe = load_shapes_pipeline()
    guard = SafeRedirGuard.from_policy("shapes:demo")
    guard.wrap(pipe)
    images, actions = run(pipe, guard)
    assert actions == ["redirected", "none"]
    return images, actions


@pytest.mark.parametrize("how", ["in place before wrap", "wrapper before wrap", "wrapper after wrap"])
def test_compiled_denoiser_is_guarded_in_one_graph(reference, how):
    """``pipe.unet.compile()`` or ``pipe.unet = torch.compile(pipe.unet)``, before or after wrap: the
    hook runs outside the compiled graph (it is ``torch.compiler.disable``d), the UNet compiles to
    one graph with no graph break, and the result is the eager guarded run's."""
    pipe = load_shapes_pipeline()
    guard = SafeRedirGuard.from_policy("shapes:demo")
    torch._dynamo.reset()
    counters.clear()
    if how == "wrapper after wrap":
        guard.wrap(pipe)
    if how.startswith("in place"):
        pipe.unet.compile(backend="aot_eager")
    else:
        pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    if how != "wrapper after wrap":
        guard.wrap(pipe)
    images, actions = run(pipe, guard)
    assert actions == reference[1]
    np.testing.assert_allclose(images, reference[0], atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("order", ["offload then wrap", "wrap then offload"])
def test_model_cpu_offload(reference, order):
    """diffusers' model offload (accelerate hooks that move each model to the execution device for its
    forward; the CPU stands in for the accelerator here)."""
    pipe = load_shapes_pipeline()
    guard = SafeRedirGuard.from_policy("shapes:demo")
    if order == "wrap then offload":
        guard.wrap(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")
    if order == "offload then wrap":
        guard.wrap(pipe)
    images, actions = run(pipe, guard)
    assert actions == reference[1]
    np.testing.assert_allclose(images, reference[0], atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-4), (torch.bfloat16, 0.06)])
def test_pipe_to_dtype_after_wrap(reference, dtype, atol):
    """The redirectors keep computing in float32 (their inputs are cast) and their deltas are cast to
    the pipeline's dtype: same decisions; the image within the dtype's own rounding."""
    pipe = load_shapes_pipeline()
    guard = SafeRedirGuard.from_policy("shapes:demo")
    guard.wrap(pipe)
    pipe.to(dtype)
    images, actions = run(pipe, guard)
    assert actions == reference[1]
    np.testing.assert_allclose(images, reference[0], atol=atol)
    unguarded = load_shapes_pipeline().to(dtype)
    plain = unguarded(
        PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="np"
    )
    assert np.abs(np.asarray(plain.images, dtype=np.float32)[0] - images[0]).max() > 10 * atol, (
        "the redirection still changes the red circle in this dtype"
    )
